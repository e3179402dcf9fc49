"""unilora_hf: Uni-LoRA (arXiv 2506.00799) adapters for the Hugging Face stack.

One trained vector θ_d per model; every adapted layer's LoRA matrices are read out of it through a
fixed, seeded, isometric projection, so an adapter is θ_d plus a seed.
"""

from .auto import UniLoraAutoModel
from .config import UniLoraConfig
from .distributed import gather_adapter_state, load_adapter_state
from .errors import (
    AdapterFormatError, AdapterIntegrityError, AdapterStateError, BaseModelError, HubAuthError, HubConnectionError, HubError,
    HubPushError, InvalidConfigError, LayoutMismatchError, UniLoraError, UnsafeAdapterError,
)
from .hub import AdapterNotCachedError, AdapterRepoNotFoundError, AdapterRevisionNotFoundError
from .loading import load_adapter
from .layer import UniLoraLinear
from .model import UniLoraAdapter, get_adapter, has_adapter, inject_adapter
from .peft_export import export_lora
from .projection import Projection
from .push import push_adapter
from .serialization import AdapterState, read_adapter, save_adapter
from .trainer import UniLoraTrainer
from .version import __version__

__all__ = [
    "AdapterFormatError",
    "AdapterIntegrityError",
    "AdapterNotCachedError",
    "AdapterRepoNotFoundError",
    "AdapterRevisionNotFoundError",
    "AdapterState",
    "AdapterStateError",
    "BaseModelError",
    "HubAuthError",
    "HubConnectionError",
    "HubError",
    "HubPushError",
    "InvalidConfigError",
    "LayoutMismatchError",
    "Projection",
    "UniLoraAdapter",
    "UniLoraAutoModel",
    "UniLoraConfig",
    "UniLoraError",
    "UniLoraLinear",
    "UniLoraTrainer",
    "UnsafeAdapterError",
    "__version__",
    "export_lora",
    "gather_adapter_state",
    "get_adapter",
    "has_adapter",
    "inject_adapter",
    "load_adapter",
    "load_adapter_state",
    "push_adapter",
    "read_adapter",
    "save_adapter",
]

# trl is optional: the SFT trainer is imported on first use (module __getattr__), never at package import.
_LAZY = {"UniLoraSFTMixin": "sft_trainer", "UniLoraSFTTrainer": "sft_trainer"}


def _has_trl() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("trl") is not None
    except (ImportError, ValueError):
        return False


if _has_trl():  # so that `from unilora_hf import *` works without trl
    __all__ += sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
