"""θ_D kept between inference passes, read out again only when θ_d's bits change.

A ``ReadoutCache`` belongs to one adapter and one (device, dtype). It holds ``theta_D`` (D values in that
dtype), ``snapshot`` (θ_d as of the last refresh) and ``dirty`` (an int32 flag, 1 when created).
``refresh(theta_d)`` is, on the device's stream:

    dirty ← dirty ∨ [bits(θ_d) ≠ bits(snapshot)];   snapshot ← θ_d
    if dirty:  theta_D ← round_dtype(P θ_d)          (the float32 readout rounded once: the bits of
                                                       ``readout(θ_d).to(dtype)``)
    dirty ← 0

so ``theta_D`` always equals the readout of the θ_d of the moment, whatever changed θ_d (an optimizer
step, ``.data``, ``set_adapter``, a load), and an unchanged θ_d costs a comparison of d values instead of
the D-position readout. On CUDA with triton the three steps are kernels (``projection_kernels.refresh``)
with no host synchronisation, so a captured CUDA graph replays the comparison, and its readout does work
only on the replays after θ_d changed. On CPU the comparison is ``torch.equal`` on the host; on other
devices without the kernels the readout runs every time (the same values, nothing saved).

The refresh is the custom op ``unilora_hf::refresh_theta_D`` (mutating ``snapshot``, ``dirty`` and
``theta_D``; fake implementation: nothing to return), so a compiled pass calls it as one node; its three
buffers are marked static addresses for CUDA graphs, as transformers' static KV cache marks its own. A cache
tracks θ_d only while θ_d is a plain float32 contiguous tensor on the cache's device; otherwise (a DTensor
shard, another dtype or device) every refresh reads out (``tracking`` False).
"""

from __future__ import annotations

import torch

from ..projection import NATIVE, Projection
from .dispatch import _kernels, _readout_native, _readout_peft, resolve_backend


@torch.library.custom_op("unilora_hf::refresh_theta_D", mutates_args=("snapshot", "dirty", "theta_D"))
def _refresh_op(
    theta_d: torch.Tensor, snapshot: torch.Tensor, dirty: torch.Tensor, theta_D: torch.Tensor,
    table: torch.Tensor, scales: torch.Tensor, seed: int, D: int, backend: str,
) -> None:
    native = table.numel() == 0
    if backend == "triton":
        _kernels(theta_d.device).refresh(theta_d, snapshot, dirty, theta_D, seed, D,
                                         None if native else table, None if native else scales)
        return
    if theta_d.device.type == "cpu" and not dirty.item() and torch.equal(theta_d.view(torch.int32),
                                                                          snapshot.view(torch.int32)):
        return
    if native:
        theta_D.copy_(_readout_native(theta_d, seed, D, 0, D, backend))
    else:
        theta_D.copy_(_readout_peft(theta_d, table, scales, 0, D, backend))
    snapshot.copy_(theta_d)
    dirty.zero_()


@_refresh_op.register_fake
def _(theta_d, snapshot, dirty, theta_D, table, scales, seed, D, backend):
    return None


class ReadoutCache:
    """θ_D of one adapter in one (device, dtype), refreshed from θ_d (module docstring)."""

    def __init__(self, projection: Projection, theta_d: torch.Tensor, device: torch.device, dtype: torch.dtype):
        self.projection = projection
        # normal tensors even when made inside torch.inference_mode(): later passes outside it update them in place
        with torch.inference_mode(False):
            self.theta_D = torch.empty(projection.D, device=device, dtype=dtype)
            self.snapshot = torch.empty(projection.d, device=device, dtype=torch.float32)
            self.dirty = torch.ones(1, device=device, dtype=torch.int32)
            self._no_table = torch.empty(0, device=device, dtype=torch.int32)
            self._no_scales = torch.empty(0, device=device, dtype=torch.float32)
        self.tracking = self.tracks(theta_d)
        self.views: list | None = None  # the (A, B) views of theta_D, kept by the adapter
        for t in (self.theta_D, self.snapshot, self.dirty):
            torch._dynamo.mark_static_address(t)

    def tracks(self, theta_d: torch.Tensor) -> bool:
        """Whether ``theta_d`` can be compared with the snapshot (see the module docstring)."""
        return (type(theta_d) in (torch.Tensor, torch.nn.Parameter) and theta_d.dtype == torch.float32
                and theta_d.is_contiguous() and theta_d.shape == self.snapshot.shape
                and theta_d.device == self.snapshot.device)

    def refresh(self, theta_d: torch.Tensor) -> torch.Tensor:
        """``theta_D`` made equal to the readout of ``theta_d`` (detached), and returned."""
        theta_d = theta_d.detach()
        P = self.projection
        if not (self.tracking and self.tracks(theta_d)):
            from .dispatch import project_theta, readout

            self.dirty.fill_(1)  # the snapshot no longer says anything
            # compiled: the custom op (one node of the graph); eager: the plain readout (it takes a DTensor shard)
            flat = project_theta(theta_d, P) if torch.compiler.is_compiling() else readout(theta_d, P)
            return self.theta_D.copy_(flat.to(self.theta_D.device))
        backend = resolve_backend(theta_d.device)
        if P.kind == NATIVE:
            table, scales = self._no_table, self._no_scales
        else:
            table, scales = P._peft_tensors(theta_d.device)
        torch.ops.unilora_hf.refresh_theta_D(theta_d, self.snapshot, self.dirty, self.theta_D, table, scales,
                                             P.seed if P.kind == NATIVE else 0, P.D, backend)
        return self.theta_D
