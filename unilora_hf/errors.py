"""The errors of unilora_hf: one hierarchy, every class also the built-in type it stands for.

Every refusal a user can meet is a `UniLoraError`; catching the built-in type (``ValueError``,
``OSError``, ``RuntimeError``, ``PermissionError`` ...) keeps working too. Each message names the file,
field or module at fault and the fix, on one line.

    UniLoraError
    ├── InvalidConfigError (ValueError)      a config value, or targets that do not fit the model
    ├── InvalidArgumentError (TypeError)     an argument of the wrong kind (a path where a model is needed ...)
    ├── AdapterFormatError (ValueError)      adapter files that are missing, malformed or of an unknown version
    │   ├── AdapterIntegrityError            files changed since they were written (digest or checksum), NaN/inf
    │   └── UnsafeAdapterError               what would run code or escape the folder: pickles, symlinks
    │                                        out of the folder, FIFOs/devices, loader options that run code
    ├── LayoutMismatchError (ValueError)     the base model's adapted layers differ from the adapter's
    ├── AdapterStateError (RuntimeError)     the operation does not fit the adapter's state (merged, absent ...)
    ├── BaseModelError (OSError)             the base model cannot be loaded (missing, needs remote code ...)
    ├── SaveError (OSError)                  files cannot be written where asked
    ├── MissingDependencyError (ImportError) an optional dependency (trl, triton) is not installed
    └── HubError (OSError)                   talking to the Hugging Face Hub
        ├── HubConnectionError (ConnectionError)   the Hub cannot be reached (and the cache cannot serve)
        ├── HubAuthError (PermissionError)         the token is missing, wrong, or may not do this
        ├── HubPushError                           an upload failed; nothing of it was left behind
        └── (in ``unilora_hf.hub``) AdapterRepoNotFoundError, AdapterRevisionNotFoundError and
            AdapterNotCachedError, which are also huggingface_hub's RepositoryNotFoundError,
            RevisionNotFoundError and LocalEntryNotFoundError
"""


class UniLoraError(Exception):
    """Base class of every unilora_hf error."""


class InvalidConfigError(UniLoraError, ValueError):
    """A configuration value is invalid, or the configured targets do not fit the model."""


class InvalidArgumentError(UniLoraError, TypeError):
    """An argument of the wrong kind, e.g. a path where a loaded model is needed."""


class AdapterFormatError(UniLoraError, ValueError):
    """An adapter folder or file is missing, malformed, of an unknown version, or not a Uni-LoRA adapter."""


class AdapterIntegrityError(AdapterFormatError):
    """An adapter file was changed after it was written (its recorded digest or checksum does not match), or
    holds NaN/inf values."""


class UnsafeAdapterError(AdapterFormatError):
    """Reading the adapter as given could run code or reach outside its folder: pickle files, symlinks that
    leave the folder, FIFOs or device files, loader options that execute code."""


class LayoutMismatchError(UniLoraError, ValueError):
    """The base model's adapted layers differ from the ones the adapter was trained on."""


class AdapterStateError(UniLoraError, RuntimeError):
    """The operation does not fit the model's current adapter state (already injected, merged, ...)."""


class BaseModelError(UniLoraError, OSError):
    """The base model cannot be loaded (a wrong id or folder, remote code that was not allowed, ...)."""


class SaveError(UniLoraError, OSError):
    """The adapter (or an exported or merged model) cannot be written where asked."""


class MissingDependencyError(UniLoraError, ImportError):
    """An optional dependency is missing; the message gives the install command."""


class HubError(UniLoraError, OSError):
    """A Hugging Face Hub operation failed."""


class HubConnectionError(HubError, ConnectionError):
    """The Hub cannot be reached (or offline mode is on) and the local cache cannot serve the request."""


class HubAuthError(HubError, PermissionError):
    """The Hub refused the token (missing, wrong, or without the right to do this)."""


class HubPushError(HubError):
    """A push to the Hub failed; the repo was left as it was (a repo the push created was removed)."""
