"""Triton kernel of the mixed-batch adapted linear: every row its own adapter.

For x ∈ R^{M×K} (token rows), ``slot ∈ {-1, 0, …, P-1}^M`` (the adapter of each row; -1: the base alone),
and the read-out LoRA matrices of P adapters stacked as A ∈ R^{P×r×K}, B ∈ R^{P×N×r} (views of the
stacked θ_D of the adapters present, in the activation dtype), Kernel M adds into y ∈ R^{M×N} in place:

    y[m] += round(x[m] A[slot m]ᵀ) B[slot m]ᵀ        for every m with slot[m] ≥ 0

For many rows (prefill, more than ``TWO_PHASE_MAX_ROWS``), one launch: each program owns a BM×BN tile of y and
first forms h = x Aᵀ (BM×r) over the whole K: when every live row of the tile has the same adapter (a tile lies
inside one sequence), with two tensor-core products; otherwise row by row, gathering each row's A. h is rounded
to the activation dtype (as the unfused ``x @ A.t()`` stores it), then h Bᵀ is added to the loaded y tile in
float32 and y is rounded once. A tile whose rows all have slot -1 returns at once. h is recomputed by every
column tile (r·K per row and tile: small against the row's own K·N).

For few rows (decode: one row per sequence, each with its own adapter), two launches: ``_mixed_h_kernel`` forms
each row's h once (one program per row and rank, reading x[m] and one row of its adapter's A), and the tile kernel
loads h instead of recomputing it. Recomputing h in every column tile re-read every row's A N/BN times: Kernel M
took ~68 µs per layer at 32 rows on an H100, the two launches now ~8.5 µs (benchmarks/multi_adapter.py --profile,
RESULTS.md).

The pure-PyTorch reference is ``reference.mixed_lora``; ``lora_linear.add_mixed_lora`` dispatches.
"""

from __future__ import annotations

import sys

import torch

from ..errors import MissingDependencyError

try:
    import triton
    import triton.language as tl
except ImportError as exc:  # pragma: no cover - exercised only without triton
    raise MissingDependencyError(
        'the Triton kernels of unilora_hf need the triton package: pip install "unilora_hf[triton]"'
    ) from exc

from . import triton_modes

R_MAX = 64


# Only builtins of triton.language (tl.reduce, ...), never its @triton.jit helpers (tl.sum, tl.max): those are
# created once, interpreted or compiled, when triton is imported, and would break one of this module's two
# variants (see projection_kernels). Interpreted variants reduce with the standard library's combine functions,
# which the interpreter recognises.
@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _max(a, b):
    return tl.maximum(a, b)


@triton.jit
def _min(a, b):
    return tl.minimum(a, b)


if type(_add).__name__ == "InterpretedFunction":
    _add = getattr(tl.standard, "_sum_combine", _add)
    _max = getattr(tl.standard, "_elementwise_max", _max)
    _min = getattr(tl.standard, "_elementwise_min", _min)


@triton.jit
def _mixed_h_kernel(x_ptr, slot_ptr, a_ptr, h_ptr, K, r, sxm, sxk, sap, sar, sak, R: tl.constexpr, BK: tl.constexpr):
    """h[m, j] = round(x[m] · A[slot m, j]) (0 where slot m < 0), one program per (row m, rank j); h: M×R."""
    m = (tl.program_id(0) // r).to(tl.int64)
    j = (tl.program_id(0) % r).to(tl.int64)
    slot = tl.load(slot_ptr + m)
    p = tl.maximum(slot, 0).to(tl.int64)
    k_end = tl.where(slot >= 0, K, 0)  # a base row loads nothing: h = 0
    rk = tl.arange(0, BK)
    acc = tl.full((BK,), 0.0, tl.float32)
    for k0 in range(0, K, BK):
        kk = k0 + rk
        live_k = kk < k_end
        xv = tl.load(x_ptr + m * sxm + kk * sxk, mask=live_k, other=0.0).to(tl.float32)
        av = tl.load(a_ptr + p * sap + j * sar + kk * sak, mask=live_k, other=0.0).to(tl.float32)
        acc += xv * av
    tl.store(h_ptr + m * R + j, tl.reduce(acc, 0, _add).to(h_ptr.dtype.element_ty))


@triton.jit
def _mixed_kernel(
    x_ptr, slot_ptr, a_ptr, b_ptr, y_ptr, h_ptr,
    M, N, K, r,
    sxm, sxk, sap, sar, sak, sbp, sbn, sbr, sym, syn,
    HAS_H: tl.constexpr, UPCAST: tl.constexpr, R: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    BK: tl.constexpr,
):
    n_n = (N + BN - 1) // BN
    pid_m = tl.program_id(0) // n_n
    pid_n = tl.program_id(0) % n_n
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rr = tl.arange(0, R)
    rk = tl.arange(0, BK)
    live_m = rm < M
    live_n = rn < N
    live_r = rr < r
    slot = tl.load(slot_ptr + rm, mask=live_m, other=-1)
    live = slot >= 0
    hi = tl.reduce(slot, 0, _max)
    if hi < 0:
        return
    lo = tl.reduce(tl.where(live, slot, hi), 0, _min)
    s = tl.where(live, slot, lo).to(tl.int64)
    if HAS_H:  # formed by _mixed_h_kernel, rounded, zeros for base rows
        hq = tl.load(h_ptr + rm.to(tl.int64)[:, None] * R + rr[None, :], mask=live_m[:, None] & live_r[None, :],
                     other=0.0)
    else:
        x_rows = x_ptr + rm.to(tl.int64)[:, None] * sxm
        h = tl.full((BM, R), 0.0, tl.float32)
        if lo == hi:  # one adapter for every live row: tensor-core products
            a_cols = a_ptr + hi.to(tl.int64) * sap + rr[None, :] * sar
            for k0 in range(0, K, BK):
                kk = k0 + rk
                live_k = kk < K
                xt = tl.load(x_rows + kk[None, :] * sxk, mask=live_m[:, None] & live_k[None, :], other=0.0)
                at = tl.load(a_cols + kk[:, None] * sak, mask=live_k[:, None] & live_r[None, :], other=0.0)
                if UPCAST:
                    h = tl.dot(xt.to(tl.float32), at.to(tl.float32), h, input_precision="ieee")
                else:
                    h = tl.dot(xt, at, h)
        else:  # rows of several adapters: each row gathers its own A
            a_rows = a_ptr + s[:, None, None] * sap + rr[None, :, None] * sar
            for k0 in range(0, K, BK):
                kk = k0 + rk
                live_k = kk < K
                xg = tl.load(x_rows + kk[None, :] * sxk, mask=live_m[:, None] & live_k[None, :], other=0.0)
                ag = tl.load(a_rows + kk[None, None, :] * sak,
                             mask=live_r[None, :, None] & live_k[None, None, :], other=0.0)
                h += tl.reduce(xg.to(tl.float32)[:, None, :] * ag.to(tl.float32), 2, _add)
        hq = tl.where(live[:, None], h, 0.0).to(y_ptr.dtype.element_ty)
    if lo == hi:
        bt = tl.load(b_ptr + hi.to(tl.int64) * sbp + rr[:, None] * sbr + rn[None, :] * sbn,
                     mask=live_r[:, None] & live_n[None, :], other=0.0)
        if UPCAST:
            acc = tl.dot(hq.to(tl.float32), bt.to(tl.float32), input_precision="ieee")
        else:
            acc = tl.dot(hq, bt)
    else:
        bg = tl.load(b_ptr + s[:, None, None] * sbp + rn[None, :, None] * sbn + rr[None, None, :] * sbr,
                     mask=live_n[None, :, None] & live_r[None, None, :], other=0.0)
        acc = tl.reduce(hq.to(tl.float32)[:, None, :] * bg.to(tl.float32), 2, _add)
    y_ptrs = y_ptr + rm.to(tl.int64)[:, None] * sym + rn[None, :] * syn
    mask = live_m[:, None] & live_n[None, :]
    y = tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptrs, (y + acc).to(y_ptr.dtype.element_ty), mask=mask & live[:, None])


def interpreted() -> bool:
    return type(_mixed_kernel).__name__ == "InterpretedFunction"


def for_device(device: torch.device | str):
    return triton_modes.for_device(sys.modules[__name__], interpreted(), device)


_MIXED = triton_modes.FastLauncher(_mixed_kernel)
_MIXED_H = triton_modes.FastLauncher(_mixed_h_kernel)
# At most this many rows: h in its own launch (_mixed_h_kernel), once per row (see the module docstring).
TWO_PHASE_MAX_ROWS = 256
_H_BK = 512


def _tiles(rows: int) -> tuple[int, int, int, int]:
    """(BM, BN, BK, num_warps): small row tiles when rows mix adapters (decode), larger for prefill."""
    if interpreted():
        return 16, 16, 16, 1
    return (16, 64, 32, 4) if rows <= 256 else (64, 64, 64, 4)


def add_mixed(y: torch.Tensor, x: torch.Tensor, slot: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Kernel M: ``y[m] += round(x[m] A[slot[m]]ᵀ) B[slot[m]]ᵀ`` in place for rows with ``slot[m] ≥ 0``;
    returns y. x: M×K, y: M×N (one dtype), slot: M int32, A: P×r×K, B: P×N×r (x's dtype)."""
    M, K = x.shape
    N, r = B.shape[1], A.shape[1]
    if not 1 <= r <= R_MAX:
        raise ValueError(f"the mixed-batch kernel supports ranks 1..{R_MAX}, not r = {r}")
    R = max(16, 1 << (r - 1).bit_length())
    bm, bn, bk, warps = _tiles(M)
    two_phase = M <= TWO_PHASE_MAX_ROWS
    h = x.new_empty((M, R)) if two_phase else y
    if two_phase:
        h_bk = 16 if interpreted() else _H_BK
        h_ints = (K, r, *x.stride(), *A.stride()[:3])
        _launch(_MIXED_H, (M * r,), h_ints, (R, h_bk), (x, slot, A, h), x, y, 4)
    grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
    ints = (M, N, K, r, *x.stride(), *A.stride(), *B.stride(), *y.stride())
    consts = (two_phase, interpreted() or x.dtype == torch.float32, R, bm, bn, bk)
    _launch(_MIXED, grid, ints, consts, (x, slot, A, B, y, h), x, y, warps)
    return y


def _launch(launcher, grid, ints, consts, tensors, x, y, warps) -> None:
    """One launch, direct after the first for a key (the launcher takes the constexprs too). Every integer argument
    is in the key, so Triton's specialisation (== 1, % 16) is fixed by it; A and B are strided views of the stacked
    θ_D, their strides change only with the number of adapters present."""
    key = None
    if launcher.direct:
        aligned = all(t.data_ptr() % 16 == 0 for t in tensors)
        key = (ints, consts, tuple(t.dtype for t in tensors), aligned, x.get_device())
        compiled = launcher.cached(key)
        if compiled is not None and key[-1] == torch.cuda.current_device():
            launcher.run(compiled, grid[0], key[-1], *tensors, *ints, *consts)
            return
    launcher.launch(key, grid, x.device, *tensors, *ints, *consts, num_warps=warps)


__all__ = ["R_MAX", "add_mixed", "for_device", "interpreted"]
