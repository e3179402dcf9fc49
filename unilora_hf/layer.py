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
from .layout import LayerSpec, lora_views


def layer_constants(layer: "UniLoraLinear") -> tuple[int, int, int, int, int, bool]:
    """(slot, offset, r, in_features, out_features, has_dropout) of an adapted layer: its place in the adapter's
    layer list, its slice of θ_D, its shape, and whether it holds a dropout module (a slice of ``layer._state``)."""
    return layer._state[3:]


class UniLoraLinear(nn.Module):
    def __init__(self, base_layer: nn.Module, spec: LayerSpec, root: nn.Module, dropout: float, slot: int):
        super().__init__()
        self.base_layer = base_layer
        self.unilora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.spec = spec
        # What the forward reads of the layer, as one tuple of constants: (merged, sibling group or -1, index in
        # the group, then `layer_constants`). Under torch.compile each read is a guard evaluated at every call of the
        # compiled model (the host time of a decoded token): one equality guard on this tuple instead of a dozen
        # on the spec's fields, the flags and the dropout module. `merged` and `siblings` rebuild it.
        self.__dict__["_state"] = (False, -1, 0, slot, spec.offset, spec.r, spec.in_features, spec.out_features,
                                   dropout > 0)
        # A plain reference, not a submodule: the root owns θ_d and must not become our child.
        self.__dict__["_unilora_root"] = root
        self.train(base_layer.training)  # a model in eval mode stays so: no dropout switched on by injection

    @property
    def merged(self) -> bool:
        """Whether ΔW is merged into the base weight."""
        return self._state[0]

    @merged.setter
    def merged(self, value: bool) -> None:
        self.__dict__["_state"] = (bool(value),) + self._state[1:]

    @property
    def siblings(self) -> tuple[int, int] | None:
        """(index of its group in ``UniLoraAdapter._groups``, index in the group) when layers that read this layer's
        input share one launch with it (`siblings.SiblingGroup`), else None."""
        group, index = self._state[1:3]
        return None if group < 0 else (group, index)

    @siblings.setter
    def siblings(self, value: tuple[int, int] | None) -> None:
        self.__dict__["_state"] = (self._state[0],) + (value or (-1, 0)) + self._state[3:]

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

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        base = self._modules["base_layer"]
        state = self._state
        if state[0]:  # merged: ΔW is in the base weight (the root is not read: one guard less per layer)
            return base(x, *args, **kwargs)
        adapter = self._unilora_root.unilora_adapter
        if not adapter.enabled:
            return base(x, *args, **kwargs)
        if adapter._mixed is not None:
            return self._mixed_forward(adapter._mixed, base, x, *args, **kwargs)
        constants = state[3:]
        plain = None if args or kwargs else frozen_plain_weights(self, constants, base, x)
        if plain is not None:
            if state[1] >= 0:  # in a sibling group
                y = adapter._groups[state[1]].forward(state[2], x, adapter)
                if y is not None:
                    return y
            A, B = layer_pair(self, constants, adapter, x.device, x.dtype)
            return lora_linear.frozen_linear_lora(x, plain[0], plain[1], A, B)
        result = base(x, *args, **kwargs)
        A, B = layer_pair(self, constants, adapter, result.device, result.dtype)
        return lora_linear.add_lora(result, self.unilora_dropout(x), A, B)

    def _mixed_forward(self, mixed, base: nn.Module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Each batch row with its own adapter (`UniLoraAdapter.mixed_batch`)."""
        result = base(x, *args, **kwargs)
        A, B = mixed.layer_pair(self.spec, result.device, result.dtype)
        return lora_linear.add_mixed_lora(result, self.unilora_dropout(x), mixed.token_slots(x), A, B)

    def extra_repr(self) -> str:
        s = self.spec
        return f"r={s.r}, in={s.in_features}, out={s.out_features}, theta_D[{s.offset}:{s.offset + s.size}]"


def layer_pair(layer: UniLoraLinear, constants: tuple, adapter, device: torch.device, dtype: torch.dtype):
    """(A, B) of ``layer`` in ``dtype`` on ``device``: from the root pass's readout, or outside a root pass (or
    inside backward) from the layer's own slice of θ_D."""
    pair = adapter.lora_pair(constants, device, dtype)
    if pair is None:
        _, offset, r, n_in, n_out, _ = constants
        flat = project_slice(layer._unilora_root.unilora_theta_d, adapter.projection, offset, r * (n_in + n_out))
        pair = lora_views(flat.to(device, dtype), r, n_in, n_out)
    return pair


def plain_pairs(layers: list[UniLoraLinear], adapter, x: torch.Tensor):
    """``(weights, biases, As, Bs)`` of layers that each have a frozen plain ``nn.Linear`` base for input x
    (`frozen_plain_weights`), with their (A, B) in x's dtype and device, or None where one of them has not."""
    weights, biases, As, Bs = [], [], [], []
    for layer in layers:
        constants = layer_constants(layer)
        plain = frozen_plain_weights(layer, constants, layer._modules["base_layer"], x)
        if plain is None:
            return None
        A, B = layer_pair(layer, constants, adapter, x.device, x.dtype)
        weights.append(plain[0])
        biases.append(plain[1])
        As.append(A)
        Bs.append(B)
    return weights, biases, As, Bs


def frozen_plain_weights(layer: UniLoraLinear, constants: tuple, base: nn.Module, x: torch.Tensor):
    """(W, b) when ``base`` is a plain nn.Linear with frozen W, b matching x's dtype and device (and no active
    dropout, no autocast to another dtype than x's), else None. Module attributes are read from their dicts, and
    the layer's own state only where it matters (``training`` with a dropout module): this runs once per layer
    call, on the CPU critical path of a training step, and each read is a guard of a compiled model."""
    if type(base) is not nn.Linear:
        return None
    weight, bias = base._parameters["weight"], base._parameters["bias"]
    if (
        weight.requires_grad
        or (bias is not None and bias.requires_grad)
        or x.dtype != weight.dtype
        or x.device != weight.device
        or (torch.is_autocast_enabled(x.device.type) and torch.get_autocast_dtype(x.device.type) != x.dtype)
        or (constants[5] and layer.training)
    ):
        return None
    return weight, bias


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
        if adapter is not None and adapter._mixed is not None:
            return self._mixed_forward(adapter, adapter._mixed, *args, **kwargs)
        return self.modules_to_save(*args, **kwargs)

    def _mixed_forward(self, adapter, mixed, x: torch.Tensor, *args, **kwargs):
        """Each batch row through its own adapter's copy of the head (the original for ``__base__`` rows). Each
        head runs on the whole batch and gives its rows, so a row is computed exactly as with that adapter alone
        (heads are small; this costs one head pass per adapter present)."""
        from torch.func import functional_call

        if x.shape[0] != mixed.batch:
            raise RuntimeError(f"a mixed batch of {mixed.batch} rows met a head input of shape {tuple(x.shape)}")
        name = next(n for n, m in adapter.model.named_modules() if m is self)
        slots = mixed.slots.to(x.device)
        result = None
        for p in [-1] + list(range(len(mixed.present))):
            rows = (slots == p).nonzero().flatten()
            if rows.numel() == 0:
                continue
            if p < 0:
                out = self.original_module(x, *args, **kwargs)
            else:
                own = {k[len(name) + 1:]: v for k, v in mixed.heads[mixed.present[p]].items()
                       if k.startswith(name + ".")}
                out = functional_call(self.modules_to_save, own, (x, *args), kwargs, strict=False)
            result = out.clone() if result is None else result
            result[rows] = out[rows]
        return result

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
