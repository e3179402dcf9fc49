"""Attaching a Uni-LoRA adapter to a model instance, and the handle that merges, unloads and saves it.

``inject_adapter(model, config)`` works in place: each target module is replaced on its parent by a
`UniLoraLinear` holding it as ``base_layer``; heads named in ``modules_to_save`` become trainable copies;
θ_d becomes ONE ``nn.Parameter`` registered on the root as ``unilora_theta_d``; everything else is
frozen. The model keeps its class (a ``PreTrainedModel`` stays one). The returned `UniLoraAdapter` is
also reachable as ``model.unilora_adapter`` and through `get_adapter`.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch
import torch.nn as nn

from .config import UniLoraConfig
from .errors import AdapterStateError
from .layer import ModulesToSave, UniLoraLinear
from .layout import LayerSpec, build_layout, compact, fingerprint, resolve_targets
from .projection import Projection

THETA_NAME = "unilora_theta_d"


def unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside DDP / torch.compile / accelerate wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def get_adapter(model: nn.Module) -> "UniLoraAdapter":
    """The adapter attached to ``model``; raises AdapterStateError when it has none."""
    adapter = unwrap(model).__dict__.get("unilora_adapter")
    if adapter is None:
        raise AdapterStateError(
            f"{type(unwrap(model)).__name__} has no Uni-LoRA adapter: attach one with "
            "unilora_hf.inject_adapter(model, UniLoraConfig(...)) or load one with UniLoraAutoModel.from_pretrained"
        )
    return adapter


def has_adapter(model: nn.Module) -> bool:
    return "unilora_adapter" in unwrap(model).__dict__


def _has_peft_adapter(model: nn.Module) -> bool:
    return any(type(m).__module__.startswith("peft.") for m in model.modules())


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


class UniLoraAdapter:
    """The adapter on one model: its config, layout, projection and the operations on it."""

    def __init__(self, model: nn.Module, config: UniLoraConfig, layers: list[LayerSpec], projection: Projection):
        self.model = model
        self.config = config
        self.layers = layers
        self.projection = projection
        self.enabled = True
        self.base_model_revision = None

    # -- what it holds -------------------------------------------------------------------------
    @property
    def theta_d(self) -> nn.Parameter:
        return getattr(self.model, THETA_NAME)

    @property
    def D(self) -> int:
        return self.projection.D

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.layers)

    @property
    def compact_layout(self) -> list[dict]:
        return compact(self.layers)

    def wrapped_layers(self) -> Iterator[tuple[str, UniLoraLinear]]:
        for name, module in self.model.named_modules():
            if isinstance(module, UniLoraLinear):
                yield name, module

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Everything the adapter trains besides θ_d, under the base model's own parameter names
        (heads in ``modules_to_save``, biases per ``config.bias``)."""
        out = {}
        for name, param in self.model.named_parameters():
            if param.requires_grad and name != THETA_NAME:
                out[logical_name(name)] = param
        return out

    def num_trainable(self) -> int:
        return self.config.theta_d_length + sum(p.numel() for p in self.trainable_state().values())

    # -- switching the adapter on and off ------------------------------------------------------------
    @contextlib.contextmanager
    def disabled(self):
        """Run the base model alone inside this context (an unmerged adapter only)."""
        if any(m.merged for _, m in self.wrapped_layers()):
            raise AdapterStateError("the adapter is merged into the weights; unmerge() before disabling it")
        self.enabled = False
        try:
            yield
        finally:
            self.enabled = True

    def merge(self, safe_merge: bool = True) -> None:
        """Add ΔW = B A into every adapted base weight (computed in float32, rounded once to the weight's
        dtype). Refuses a θ_d with NaN/inf before touching any weight."""
        if not torch.isfinite(self.theta_d.detach()).all():
            bad = (~torch.isfinite(self.theta_d.detach())).sum().item()
            raise ValueError(
                f"θ_d holds {bad} NaN/inf value(s): merging would break the weights. Nothing was changed; "
                "load a healthy adapter (or checkpoint) and merge again."
            )
        with torch.no_grad():
            for name, layer in self.wrapped_layers():
                if layer.merged:
                    continue
                weight = layer.base_layer.weight
                merged = weight.float() + layer.delta_weight().to(weight.device)
                if safe_merge and not torch.isfinite(merged).all():
                    raise ValueError(f"merging into {name!r} gives NaN/inf weights; nothing was changed there")
                weight.data.copy_(merged.to(weight.dtype))
                layer.merged = True

    def unmerge(self) -> None:
        """Subtract ΔW again (exact up to the rounding of the weight's dtype)."""
        with torch.no_grad():
            for _, layer in self.wrapped_layers():
                if layer.merged:
                    weight = layer.base_layer.weight
                    weight.data.copy_((weight.float() - layer.delta_weight().to(weight.device)).to(weight.dtype))
                    layer.merged = False

    def unload(self, merge: bool = False) -> nn.Module:
        """Remove the adapter: put the original modules back (with ΔW merged in if ``merge``), keep the
        trained head copies in place when merging and the originals otherwise, drop θ_d."""
        if merge:
            self.merge()
        else:
            self.unmerge()
        for name, module in list(self.model.named_modules()):
            if isinstance(module, UniLoraLinear):
                _set_submodule(self.model, name, module.base_layer)
            elif isinstance(module, ModulesToSave):
                kept = module.modules_to_save if merge else module.original_module
                _set_submodule(self.model, name, kept)
        delattr(self.model, THETA_NAME)
        del self.model.__dict__["unilora_adapter"]
        return self.model

    def merge_and_unload(self) -> nn.Module:
        return self.unload(merge=True)

    # -- files ----------------------------------------------------------------------------------
    def save_adapter(self, save_directory: str | os.PathLike, **kwargs) -> list[str]:
        """Write the adapter files (config JSON + one safetensors file); returns the paths written."""
        from .serialization import save_adapter

        return save_adapter(self, save_directory, **kwargs)

    def lora_weights(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Materialised (A, B) in float32 for every adapted layer, by module name."""
        with torch.no_grad():
            return {name: tuple(t.detach() for t in layer.lora_matrices()) for name, layer in self.wrapped_layers()}


WRAPPER_SEGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def logical_name(param_name: str) -> str:
    """A live parameter name as the base model names it (our wrappers, and those of FSDP1, activation
    checkpointing and torch.compile, removed)."""
    for segment in WRAPPER_SEGMENTS:
        param_name = param_name.replace(segment, "")
    return param_name.replace(".base_layer.", ".").replace(".modules_to_save.", ".")


def inject_adapter(model: nn.Module, config: UniLoraConfig, theta_d: torch.Tensor | None = None) -> UniLoraAdapter:
    """Attach a Uni-LoRA adapter to ``model`` in place and return its handle.

    θ_d starts uniform in [-init_theta_d_bound, init_theta_d_bound] (drawn from torch's global RNG, as
    PEFT does), or is ``theta_d`` when given. Raises ValueError for targets that match nothing and
    AdapterStateError for a model that already carries a Uni-LoRA or PEFT adapter.
    """
    if not isinstance(config, UniLoraConfig):
        raise TypeError(f"config must be a UniLoraConfig, got {type(config).__name__}")
    model = unwrap(model)
    if has_adapter(model) or hasattr(model, THETA_NAME):
        raise AdapterStateError(
            "this model already has a Uni-LoRA adapter; injecting twice would stack two θ_d. "
            "Use the existing one (unilora_hf.get_adapter(model)) or call .unload() first."
        )
    if _has_peft_adapter(model):
        raise AdapterStateError(
            "this model already carries a PEFT adapter; Uni-LoRA goes on a plain base model. "
            "Call model.unload() / merge_and_unload() on the PEFT model first, or start from the base model."
        )
    targets = resolve_targets(model, config)
    layers = build_layout(targets, config.r)
    D = layers[-1].offset + layers[-1].size
    projection = Projection.build(config.projection, config.proj_seed, D, config.theta_d_length)

    model.requires_grad_(False)
    first_weight = targets[0][1].weight
    if theta_d is None:
        theta_d = torch.empty(config.theta_d_length, dtype=torch.float32)
        torch.nn.init.uniform_(theta_d, -config.init_theta_d_bound, config.init_theta_d_bound)
    elif tuple(theta_d.shape) != (config.theta_d_length,):
        raise ValueError(f"theta_d has shape {tuple(theta_d.shape)}; expected ({config.theta_d_length},)")
    device = first_weight.device if first_weight.device.type != "meta" else torch.device("cpu")
    model.register_parameter(THETA_NAME, nn.Parameter(theta_d.detach().to(device, torch.float32).clone()))

    adapter = UniLoraAdapter(model, config, layers, projection)
    model.__dict__["unilora_adapter"] = adapter
    for (name, module), spec in zip(targets, layers):
        _set_submodule(model, name, UniLoraLinear(module, spec, model, config.unilora_dropout))
    heads: list[str] = []
    for name, _ in model.named_modules():
        if name and config.modules_to_save and any(name == m or name.endswith("." + m) for m in config.modules_to_save):
            if not any(name.startswith(h + ".") for h in heads):
                heads.append(name)
    if config.modules_to_save and not heads:
        adapter.unload()
        raise ValueError(
            f"modules_to_save={config.modules_to_save!r} matched no module of {type(model).__name__}; "
            f"its top-level modules are {[n for n, _ in model.named_children()]}"
        )
    for name in heads:
        _set_submodule(model, name, ModulesToSave(model.get_submodule(name)))
    if config.bias == "all":
        for name, param in model.named_parameters():
            if (name.endswith(".bias") or name == "bias") and ".original_module." not in name:
                param.requires_grad_(True)
    elif config.bias == "unilora_only":
        for _, layer in adapter.wrapped_layers():
            if layer.base_layer.bias is not None:
                layer.base_layer.bias.requires_grad_(True)
    getattr(model, THETA_NAME).requires_grad_(True)
    return adapter
