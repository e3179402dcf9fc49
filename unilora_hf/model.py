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
        self._slot = {spec.offset: i for i, spec in enumerate(layers)}
        self._split_sizes = [n for spec in layers for n in spec.split_sizes]
        self._forward_depth = 0
        self._training_pass = False
        self._first_layer: UniLoraLinear | None = None
        self._theta_D: torch.Tensor | None = None
        self._pairs: dict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self._pairs_version: tuple | None = None
        self._hooks: list = []

    # -- θ_D for one forward pass ------------------------------------------------------------------
    # The root's forward pre-hook opens a pass; the first adapted layer to run reads θ_D = P θ_d out
    # once (one kernel on CUDA), casts it to the activation dtype and splits it into every layer's
    # (A, B) views; the post-hook drops them (the autograd graph keeps what backward needs, and the
    # θ_D gradient flows back through one split and one Pᵀ g). Under torch.no_grad the views are kept
    # between passes (unmerged inference) while θ_d is unchanged. Layers called outside a root pass, or
    # re-run by activation checkpointing inside backward, read their own slice instead.
    def _open_pass(self, module, args):
        if self._forward_depth == 0:
            self._training_pass = torch.is_grad_enabled()
            if self._training_pass or self._pairs_version != self._theta_version():
                self._drop_pass_cache()
        self._forward_depth += 1
        if self._forward_depth == 1 and self._training_pass and self.enabled:
            # Read out now, outside any activation-checkpointed block, in the dtype the layers will ask for.
            if self._first_layer is None:
                self._first_layer = next((m for _, m in self.wrapped_layers()), None)
            layer = self._first_layer if self._first_layer is not None and not self._first_layer.merged else None
            if layer is not None:
                weight = layer.base_layer.weight
                if torch.is_autocast_enabled(weight.device.type):
                    self.lora_pair(layer.spec, weight.device, torch.get_autocast_dtype(weight.device.type))
                elif weight.is_floating_point():  # a quantized base reads out lazily, in its compute dtype
                    self.lora_pair(layer.spec, weight.device, weight.dtype)

    def _close_pass(self, module, args, output):
        self._forward_depth = max(0, self._forward_depth - 1)
        if self._forward_depth == 0:
            self._theta_D = None
            if self._training_pass:
                self._drop_pass_cache()

    def _drop_pass_cache(self) -> None:
        self._theta_D = None
        self._pairs = {}
        self._pairs_version = None

    def _theta_version(self) -> tuple:
        theta = self.theta_d
        return (theta._version, theta.data_ptr(), theta.device)

    def _install_hooks(self) -> None:
        self._hooks = [
            self.model.register_forward_pre_hook(self._open_pass),
            self.model.register_forward_hook(self._close_pass, always_call=True),
        ]

    def lora_pair(self, spec: LayerSpec, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(A, B) of the layer with ``spec`` for the current root pass, in ``dtype`` on ``device``
        (read out in float32, rounded once), or None outside a root pass or inside backward."""
        if self._forward_depth == 0 or torch._C._current_graph_task_id() != -1:
            return None
        grad = torch.is_grad_enabled()
        key = (device, dtype, grad)
        pairs = self._pairs.get(key)
        if pairs is None:
            from .kernels import project_theta

            theta_D = self._theta_D
            if theta_D is None or (grad and theta_D.grad_fn is None and self.theta_d.requires_grad):
                theta_D = self._theta_D = project_theta(self.theta_d, self.projection)
            if not grad:
                self._pairs_version = self._theta_version()
            parts = torch.split(theta_D.to(device=device, dtype=dtype), self._split_sizes)
            pairs = [
                (parts[2 * i].view(s.r, s.in_features), parts[2 * i + 1].view(s.out_features, s.r))
                for i, s in enumerate(self.layers)
            ]
            self._pairs[key] = pairs
        return pairs[self._slot[spec.offset]]

    def _theta_D_now(self) -> torch.Tensor:
        """θ_D in float32, not differentiable (for merging)."""
        from .kernels import readout

        return readout(self.theta_d.detach(), self.projection)

    def _layer_pair(self, theta_D: torch.Tensor, layer: UniLoraLinear, device) -> tuple[torch.Tensor, torch.Tensor]:
        s = layer.spec
        return s.lora_views(theta_D[s.offset : s.offset + s.size].to(device))

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
        from .kernels import merge_delta_

        for name, layer in self.wrapped_layers():
            if not layer.base_layer.weight.is_floating_point():
                raise AdapterStateError(
                    f"{name!r} has a quantized weight ({type(layer.base_layer).__name__}); ΔW cannot be merged into "
                    "it. Run the adapter unmerged, or load the base in bf16/fp16 to merge."
                )
        theta_D = self._theta_D_now()
        with torch.no_grad():
            for name, layer in self.wrapped_layers():
                if layer.merged:
                    continue
                weight = layer.base_layer.weight
                A, B = self._layer_pair(theta_D, layer, weight.device)
                fifo = layer.spec.fan_in_fan_out
                if safe_merge:
                    merged = merge_delta_(weight, A, B, fan_in_fan_out=fifo, out=torch.empty_like(weight))
                    if not torch.isfinite(merged).all():
                        raise ValueError(f"merging into {name!r} gives NaN/inf weights; nothing was changed there")
                    weight.data.copy_(merged)
                else:
                    merge_delta_(weight.data, A, B, fan_in_fan_out=fifo)
                layer.merged = True

    def unmerge(self) -> None:
        """Subtract ΔW again (exact up to the rounding of the weight's dtype)."""
        from .kernels import merge_delta_

        if not any(layer.merged for _, layer in self.wrapped_layers()):
            return
        theta_D = self._theta_D_now()
        for _, layer in self.wrapped_layers():
            if layer.merged:
                weight = layer.base_layer.weight
                A, B = self._layer_pair(theta_D, layer, weight.device)
                merge_delta_(weight.data, A, B, sign=-1.0, fan_in_fan_out=layer.spec.fan_in_fan_out)
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
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        self._drop_pass_cache()
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
    adapter._install_hooks()
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
