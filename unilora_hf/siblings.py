"""Sibling layers: adapted projections that read the same input, run as one set under ``torch.compile``.

An attention block calls ``q_proj(x)``, ``k_proj(x)`` and ``v_proj(x)`` one after another on the same x, an MLP
``gate_proj(x)`` and ``up_proj(x)``. Under ``torch.compile`` the first sibling to run computes every sibling's output
and keeps the others':

- decoding (at most ``lora_linear.COMPILED_FUSED_ROWS`` rows, autograd not recording, the triton backend): one
  Kernel D launch (``lora_linear.frozen_linear_lora_group``: each output has the bits of that layer's own launch);
- training steps and many rows: the cuBLAS GEMMs of ``lora_linear.frozen_linear_lora_siblings``, which read x once
  for the set's stacked ``x Aᵀ`` (and its dA) and add the set's dx into one buffer (no group inside a region that
  activation checkpointing re-runs, `checkpointed`).

A sibling called next with the very same x (the same tensor object, not modified in place since: its version
counter) takes its output from there; a sibling called with any other x computes its own. Inference tensors
(``torch.inference_mode``) and tensors traced by ``torch.compile`` have no version counter to read: there the same
object is the test, and an in-place change of x between two siblings' calls is not seen. No group forms while a
member has a forward pre-hook (which may change its input). What is kept is dropped when the root pass ends
(``UniLoraAdapter._close_pass``).

Only the sibling sets of ``SIBLING_NAMES`` are grouped (children of one module, with the same input width), so no
work is spent on a layer that is not about to read that x. Compiled, a set is measured faster than its layers one
by one: decoding, one launch instead of three (or two) brings the GPU's work per token to the base model's; a
training step at the 1.1B shape, 0.8–1.7 ms less (benchmarks/RESULTS.md, session 11). Eager decoding is bound by
the host, where this bookkeeping cost more than the launches it saves (1.39 × the base's time per token against
1.22 ×, H200): there each layer runs on its own unless a group is made with ``eager=True``.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .kernels import lora_linear
from .layer import plain_pairs

# Names of layers that one module calls on the same input, in the order the group computes them.
SIBLING_NAMES = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("query", "key", "value"))


class SiblingGroup:
    """Adapted layers that read the same input (children ``names`` of ``parent``), and the outputs computed for the
    ones not yet called.

    Under ``torch.compile`` every object the traced code reaches through a new path costs a guard at every call of
    the compiled model, and one reached through two paths an aliasing check on top. So the members are read through
    ``parent`` (which the model's own forward has reached already), and each layer finds its group through the
    adapter (``UniLoraAdapter._groups``, indexed by the ints of ``layer.siblings``), not through a reference of its
    own."""

    __slots__ = ("parent", "names", "eager", "checkpoint", "_x", "_version", "_kept")  # no instance dict: fewer guards

    def __init__(self, parent: nn.Module, names: tuple[str, ...], eager: bool = False,
                 checkpoint: nn.Module | None = None):
        self.parent = parent
        self.names = names
        self.eager = eager  # also group outside torch.compile
        # The nearest module above ``parent`` that activation checkpointing may re-run (`checkpointed`).
        self.checkpoint = checkpoint
        self._x: torch.Tensor | None = None
        self._version: int | None = None
        self._kept: dict[int, torch.Tensor] = {}

    @property
    def members(self) -> list[nn.Module]:
        modules = self.parent._modules
        return [modules[n] for n in self.names]

    def clear(self) -> None:
        self._x = None
        self._version = None
        self._kept = {}

    def forward(self, index: int, x: torch.Tensor, adapter) -> torch.Tensor | None:
        """The output on x of ``members[index]`` (kept from an earlier sibling's launch, or computed now for all of
        them), or None where a launch for the group does not apply (the caller runs that layer alone). ``adapter``:
        the members' `UniLoraAdapter`, passed by the caller, which has it at hand."""
        if not (torch.compiler.is_compiling() or self.eager) or not x.dim():
            return None
        version = None if torch.compiler.is_compiling() or x.is_inference() else x._version
        if self._x is x and self._version == version and index in self._kept:
            y = self._kept.pop(index)
            if not self._kept:
                self.clear()
            return y
        self.clear()
        recording = torch.is_grad_enabled() and (x.requires_grad or adapter.theta_d.requires_grad)
        if recording and checkpointed(self.checkpoint):
            return None
        few_rows = x.numel() <= lora_linear.COMPILED_FUSED_ROWS * x.shape[-1]
        outputs = self._run_all(x, adapter, few_rows and not recording)
        if outputs is None:
            return None
        self._kept = {i: y for i, y in enumerate(outputs) if i != index}
        if self._kept:
            self._x, self._version = x, version
        return outputs[index]

    def _run_all(self, x: torch.Tensor, adapter, decoding: bool) -> list[torch.Tensor] | None:
        """Every member's output on x, or None when a member cannot take it (merged, or with a forward pre-hook, which
        may change a sibling's input before it runs). ``decoding`` (few rows, autograd not recording): one Kernel D
        launch, where it applies; else the GEMMs of ``lora_linear.frozen_linear_lora_siblings``."""
        members = self.members
        if any(m._state[0] or m._forward_pre_hooks for m in members):  # merged: the tuple the member's call reads
            return None
        operands = plain_pairs(members, adapter, x)
        if operands is None:
            return None
        weights, biases, As, Bs = operands
        if decoding:
            return lora_linear.frozen_linear_lora_group(x, weights, biases, As, Bs)
        return lora_linear.frozen_linear_lora_siblings(x, weights, biases, As, Bs)


def checkpointed(module: nn.Module | None) -> bool:
    """Whether activation checkpointing re-runs ``module`` while autograd records: a checkpoint wrapper, or a module
    with transformers' ``gradient_checkpointing`` flag on. A group inside one launches per layer when training: under
    ``torch.compile`` the checkpointed region is traced as one higher-order op, in which keeping a sibling's output on
    the group (an object from outside the region) would break the graph."""
    if module is None:
        return False
    return _is_checkpoint_wrapper(module) or module.__dict__.get("gradient_checkpointing") is True


def _is_checkpoint_wrapper(module: nn.Module) -> bool:
    return type(module).__name__ == "CheckpointWrapper"  # torch.distributed's, as accelerate and FSDP apply it


def find_groups(model: nn.Module, layer_type: type, eager: bool = False) -> list[SiblingGroup]:
    """The sibling groups of ``model``: for each module, each set of ``SIBLING_NAMES`` whose children of type
    ``layer_type`` (adapted layers) number two or more and share one input width (``eager``: as `SiblingGroup`), with
    the nearest module above that activation checkpointing may re-run (a checkpoint wrapper, or a module with a
    ``gradient_checkpointing`` attribute, as transformers' checkpointable layers have)."""
    modules = dict(model.named_modules())
    groups = []
    for name, module in modules.items():
        for names in SIBLING_NAMES:
            present = tuple(n for n in names if isinstance(module._modules.get(n), layer_type))
            if len(present) >= 2 and len({module._modules[n].in_features for n in present}) == 1:
                groups.append(SiblingGroup(module, present, eager, _checkpoint_owner(modules, name)))
    return groups


def _checkpoint_owner(modules: dict[str, nn.Module], name: str) -> nn.Module | None:
    while name:
        name = name.rpartition(".")[0]
        owner = modules[name]
        if _is_checkpoint_wrapper(owner) or hasattr(owner, "gradient_checkpointing"):
            return owner
    return None


def link(groups: list[SiblingGroup], layers: list[nn.Module]) -> None:
    """Point each layer at its group: ``layer.siblings = (index of the group in groups, index in the group)``, or
    None when in no group."""
    for layer in layers:
        layer.siblings = None
    for g, group in enumerate(groups):
        for i, m in enumerate(group.members):
            m.siblings = (g, i)
