"""unilora_hf: Uni-LoRA (arXiv 2506.00799) adapters for the Hugging Face stack.

One trained vector θ_d per model; every adapted layer's LoRA matrices are read out of it through a
fixed, seeded, isometric projection, so an adapter is θ_d plus a seed.

Importing the package is cheap: every public name is imported from its module on first use (torch,
transformers' ``Trainer``, trl and datasets only load when a name that needs them is used).
"""

from __future__ import annotations

import importlib

from .version import __version__

# public name -> module that defines it
_EXPORTS = {
    "UniLoraAutoModel": "auto",
    "UniLoraConfig": "config",
    "gather_adapter_state": "distributed",
    "load_adapter_state": "distributed",
    "AdapterFormatError": "errors",
    "AdapterIntegrityError": "errors",
    "AdapterStateError": "errors",
    "BaseModelError": "errors",
    "HubAuthError": "errors",
    "HubConnectionError": "errors",
    "HubError": "errors",
    "HubPushError": "errors",
    "InvalidArgumentError": "errors",
    "InvalidConfigError": "errors",
    "LayoutMismatchError": "errors",
    "MissingDependencyError": "errors",
    "SaveError": "errors",
    "UniLoraError": "errors",
    "UnsafeAdapterError": "errors",
    "AdapterNotCachedError": "hub",
    "AdapterRepoNotFoundError": "hub",
    "AdapterRevisionNotFoundError": "hub",
    "load_adapter": "loading",
    "UniLoraLinear": "layer",
    "UniLoraAdapter": "model",
    "get_adapter": "model",
    "has_adapter": "model",
    "inject_adapter": "model",
    "export_lora": "peft_export",
    "Projection": "projection",
    "push_adapter": "push",
    "AdapterState": "serialization",
    "read_adapter": "serialization",
    "save_adapter": "serialization",
    "UniLoraTrainer": "trainer",
    "UniLoraSFTMixin": "sft_trainer",  # needs trl
    "UniLoraSFTTrainer": "sft_trainer",  # needs trl
}
_NEEDS_TRL = ("UniLoraSFTMixin", "UniLoraSFTTrainer")


def _has_trl() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("trl") is not None
    except (ImportError, ValueError):
        return False


__all__ = sorted(n for n in _EXPORTS if n not in _NEEDS_TRL) + ["__version__"]
if _has_trl():  # so that `from unilora_hf import *` works without trl
    __all__ += sorted(_NEEDS_TRL)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
