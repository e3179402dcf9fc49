"""Exceptions raised by unilora_hf. Each message names the problem and the fix."""


class UniLoraError(Exception):
    """Base class of every unilora_hf error."""


class AdapterFormatError(UniLoraError, ValueError):
    """An adapter folder or file is missing, corrupt, of an unknown version, or not a Uni-LoRA adapter."""


class LayoutMismatchError(UniLoraError, ValueError):
    """The base model's adapted layers differ from the ones the adapter was trained on."""


class AdapterStateError(UniLoraError, RuntimeError):
    """The operation does not fit the model's current adapter state (already injected, merged, ...)."""


class HubPushError(UniLoraError, RuntimeError):
    """A push to the Hub failed; a Hub commit is all or nothing, so the repo is as it was before."""
