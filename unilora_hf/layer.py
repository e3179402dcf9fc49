"""`UniLoraLinear`: the wrapper that replaces an adapted nn.Linear / Conv1D on the model instance.

It holds the original module as ``base_layer`` (so unloading puts it back unchanged) and no parameter of
its own: θ_d is registered once on the model root, which the layer reaches at call time. Output:
``base_layer(x) + (dropout(x) Aᵀ) Bᵀ`` with (A, B) read out of θ_d through the projection, unless the
adapter is merged into the base weight or disabled. A and B come from the root's once-per-pass readout
(`UniLoraAdapter.lora_pair`) in the dtype of the base output, formed in float32 and rounded once; the
products run in that dtype (``kernels.lora_linear``): for a frozen ``nn.Linear`` on CUDA, one fused
Triton kernel with the base GEMM.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from . import reference
from .kernels import lora_linear, project_slice
from .layout import LayerSpec


class UniLoraLinear(nn.Module):
    def __init__(self, base_layer: nn.Module, spec: LayerSpec, root: nn.Module, dropout: float):
        super().__init__()
        self.base_layer = base_layer
        self.unilora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.spec = spec
        self.merged = False
        # A plain reference, not a submodule: the root owns θ_d and must not become our child.
        self.__dict__["_unilora_root"] = root

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    @property
    def in_features(self) -> int:
        return self.spec.in_features

    @property
    def out_features(self) -> int:
        return self.spec.out_features

    def lora_matrices(self) -> tuple[torch.Tensor, torch.Tensor]:
        root = self._unilora_root
        return reference.lora_matrices(root.unilora_theta_d, root.unilora_adapter.projection, self.spec)

    def delta_weight(self) -> torch.Tensor:
        """ΔW in float32, laid out like ``base_layer.weight``."""
        A, B = self.lora_matrices()
        return reference.delta_weight(A, B, self.spec.fan_in_fan_out)

    def _pair(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        root = self._unilora_root
        pair = root.unilora_adapter.lora_pair(self.spec, device, dtype)
        if pair is None:
            s = self.spec
            flat = project_slice(root.unilora_theta_d, root.unilora_adapter.projection, s.offset, s.size)
            pair = s.lora_views(flat.to(device, dtype))
        return pair

    def _frozen_plain_weights(self, base: nn.Module, x: torch.Tensor):
        """(W, b) when ``base`` is a plain nn.Linear with frozen W, b matching x's dtype and device (and
        no autocast, no active dropout), else None. Module attributes are read from their dicts: this
        runs once per layer call, on the CPU critical path of a training step."""
        if type(base) is not nn.Linear:
            return None
        weight, bias = base._parameters["weight"], base._parameters["bias"]
        if (
            weight.requires_grad
            or (bias is not None and bias.requires_grad)
            or x.dtype != weight.dtype
            or x.device != weight.device
            or torch.is_autocast_enabled(x.device.type)
            or (self.training and type(self._modules["unilora_dropout"]) is not nn.Identity)
        ):
            return None
        return weight, bias

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        base = self._modules["base_layer"]
        if self.merged or not self._unilora_root.unilora_adapter.enabled:
            return base(x, *args, **kwargs)
        plain = None if args or kwargs else self._frozen_plain_weights(base, x)
        if plain is not None:
            A, B = self._pair(x.device, x.dtype)
            return lora_linear.frozen_linear_lora(x, plain[0], plain[1], A, B)
        result = base(x, *args, **kwargs)
        A, B = self._pair(result.device, result.dtype)
        return lora_linear.add_lora(result, self.unilora_dropout(x), A, B)

    def extra_repr(self) -> str:
        s = self.spec
        return f"r={s.r}, in={s.in_features}, out={s.out_features}, theta_D[{s.offset}:{s.offset + s.size}]"


class ModulesToSave(nn.Module):
    """A module trained in full: ``modules_to_save`` is a trainable copy, ``original_module`` the frozen
    original that runs while the adapter is disabled and that unloading puts back."""

    def __init__(self, module: nn.Module, root: nn.Module | None = None):
        super().__init__()
        import copy

        self.original_module = module
        self.modules_to_save = copy.deepcopy(module)
        self.original_module.requires_grad_(False)
        self.modules_to_save.requires_grad_(True)
        self.__dict__["_unilora_root"] = root

    def forward(self, *args, **kwargs):
        root = self.__dict__["_unilora_root"]
        adapter = None if root is None else root.__dict__.get("unilora_adapter")
        if adapter is not None and not adapter.enabled:
            return self.original_module(*args, **kwargs)
        return self.modules_to_save(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("modules_to_save"), name)


WRAPPER_SEGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def logical_name(param_name: str) -> str:
    """A live parameter name as the base model names it (our wrappers, and those of FSDP1, activation
    checkpointing and torch.compile, removed)."""
    for segment in WRAPPER_SEGMENTS:
        param_name = param_name.replace(segment, "")
    return param_name.replace(".base_layer.", ".").replace(".modules_to_save.", ".")
