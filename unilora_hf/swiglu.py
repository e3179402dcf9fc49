"""Adapted SwiGLU MLPs run as one op under ``torch.compile`` (``kernels.lora_mlp``).

An MLP block of the Llama family computes ``down_proj(act_fn(gate_proj(x)) * up_proj(x))`` with ``act_fn`` SiLU. When
its three projections are adapted, a compiled training step (or a prefill: more rows than
``lora_linear.COMPILED_FUSED_ROWS``) runs the block as ``lora_mlp.lora_swiglu_mlp``, whose pointwise pass adds the gate
and up LoRA terms and forms down's rank-r input, and in the backward adds down's rank-r term to the input gradient and
forms gate's and up's ``g B``: bytes that the layers one by one move through memory as M×F terms. A 1.1B training step
(``reduce-overhead``, H200) measured 1.0–1.1 ms shorter with it than with the three layers, in one process
(benchmarks/RESULTS.md, session 14).

Which modules: `find_mlps` takes a module whose children ``gate_proj``, ``up_proj`` and ``down_proj`` are adapted
layers, whose ``act_fn`` is a SiLU module (``torch.nn.SiLU`` or transformers' ``SiLUActivation``) and whose class's
``forward`` is, up to whitespace, one of the source texts in ``_KNOWN_FORWARDS`` (transformers' Llama, Mistral, Qwen2
and kin). Any other block keeps its own forward. `install` sets the instance attribute ``forward`` of each such module to
``functools.partial(swiglu_forward, module)`` (``copy.deepcopy`` of the model rebinds it to the copy; `uninstall` removes
it, and unloading the adapter does).

At every call ``swiglu_forward`` checks what the fused op needs, and otherwise calls the class's own forward (the layers
one by one, exactly as without this module): compiled, many rows, the adapter enabled with no mixed batch, no layer
merged or with forward hooks, each base a frozen ``nn.Linear`` without active dropout (``layer.frozen_plain_weights``),
gate and up of one rank, the triton backend for the device and a half-precision dtype (``lora_mlp.fused_applies``).
"""

from __future__ import annotations

import functools
import inspect

import torch
import torch.nn as nn

from .kernels import lora_linear, lora_mlp
from .layer import plain_pairs

NAMES = ("gate_proj", "up_proj", "down_proj")
# The class forwards taken, whitespace removed (transformers 4.4x–5.x: Llama, Mistral, Qwen2/3, Olmo, Granite, ...).
_KNOWN_FORWARDS = {
    "defforward(self,x):down_proj=self.down_proj(self.act_fn(self.gate_proj(x))*self.up_proj(x))returndown_proj",
    "defforward(self,x):returnself.down_proj(self.act_fn(self.gate_proj(x))*self.up_proj(x))",
}
_known: dict[type, bool] = {}


def _is_silu(module: nn.Module) -> bool:
    kind = type(module)
    if kind is nn.SiLU:
        return True
    return (kind.__name__ == "SiLUActivation" and kind.__module__ == "transformers.activations"
            and "forward" not in module.__dict__)


def _known_forward(kind: type) -> bool:
    known = _known.get(kind)
    if known is None:
        try:
            source = inspect.getsource(kind.forward)
        except (OSError, TypeError):
            source = ""
        known = _known[kind] = "".join(source.split()) in _KNOWN_FORWARDS
    return known


def is_swiglu(module: nn.Module, layer_type: type) -> bool:
    """Whether ``module`` is an MLP block `swiglu_forward` can run fused (module docstring)."""
    children = module._modules
    act = children.get("act_fn")
    return (all(isinstance(children.get(n), layer_type) for n in NAMES) and act is not None and _is_silu(act)
            and not act._forward_hooks and not act._forward_pre_hooks and _known_forward(type(module)))


def find_mlps(model: nn.Module, layer_type: type) -> list[nn.Module]:
    """The MLP blocks of ``model`` whose three projections are adapted layers of ``layer_type`` (`is_swiglu`)."""
    return [m for m in model.modules() if is_swiglu(m, layer_type)]


def install(mlps: list[nn.Module]) -> None:
    for mlp in mlps:
        mlp.forward = functools.partial(swiglu_forward, mlp)


def uninstall(mlps: list[nn.Module]) -> None:
    for mlp in mlps:
        forward = mlp.__dict__.get("forward")
        if isinstance(forward, functools.partial) and forward.func is swiglu_forward:
            del mlp.forward


def swiglu_forward(mlp: nn.Module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """The block's output: the fused op where it applies, else the class's own forward."""
    if not args and not kwargs and torch.compiler.is_compiling():
        y = _fused(mlp, x)
        if y is not None:
            return y
    return type(mlp).forward(mlp, x, *args, **kwargs)


def _fused(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    if x.dim() < 2 or x.numel() <= lora_linear.COMPILED_FUSED_ROWS * x.shape[-1]:
        return None
    layers = [mlp._modules[n] for n in NAMES]
    adapter = layers[0]._unilora_root.unilora_adapter
    if not adapter.enabled or adapter._mixed is not None:
        return None
    if any(layer._state[0] or layer._forward_hooks or layer._forward_pre_hooks for layer in layers):  # merged, hooked
        return None
    operands = plain_pairs(layers, adapter, x)
    if operands is None:
        return None
    weights, biases, As, Bs = operands
    if As[0].shape[0] != As[1].shape[0] or not lora_mlp.fused_applies(x.device, x.dtype, As[0].shape[0],
                                                                       As[2].shape[0]):
        return None
    return lora_mlp.lora_swiglu_mlp(x, weights, biases, As, Bs)
