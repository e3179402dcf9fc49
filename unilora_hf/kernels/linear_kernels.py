"""Triton kernels of the adapted linear layer: the LoRA product fused into the base GEMMs.

For x ∈ R^{M×K}, a frozen base W ∈ R^{N×K} (bias b ∈ R^N optional) and the layer's A ∈ R^{r×K},
B ∈ R^{N×r}, all in one activation dtype (bfloat16, float16 or float32):

Kernel D, forward:  ``y = x Wᵀ + b + h Bᵀ`` with ``h = round(x Aᵀ)``, in one launch. Each program
    owns a BM×BN tile of y; its loop over K feeds each x tile to two tensor-core products, x·Wᵀ and
    x·Aᵀ (the latter, r ≤ R columns, is recomputed by every column tile: r/BN extra work). After the
    loop, h is rounded to the activation dtype (as an unfused ``x @ A.t()`` would store it) and one
    more product adds h·Bᵀ to the float32 accumulator; y is rounded once. The programs of the first
    column tile also store h (M×r), which the backward needs for dB.
Kernel E, input gradient:  ``dx = g W + round(g B) A`` in one launch, the same scheme with the loop
    over N: the programs own BM×BK tiles of dx and the first column tile stores ``gB = round(g B)``
    (M×r), which the backward needs for dA.

Kernel D for a set of layers (``forward_group``): up to three layers that read the same x (M ≤ 16 rows, decoding),
in one launch whose programs take the column tiles of the outputs laid end to end; each tile runs the same code
(``_forward_tile``) with the same tile sizes as that layer's own launch, so each output has its bits. One launch
for q/k/v costs 8.4 µs against 21.4 µs for three (H200, benchmarks/linear_kernels.py --decode --cold).

Both accumulate in float32; float32 inputs use IEEE products (no TF32). The weight gradients of A and
B (``dA = gBᵀ x``, ``dB = gᵀ h``) are two small GEMMs, left to cuBLAS by the caller. Tiles are masked,
so any M, N, K and 1 ≤ r ≤ R_MAX work; strides are free (views of θ_D for A and B included).

Launches go through ``triton_modes.FastLauncher`` (compiled kernels are called directly after the
first call for a shape). The pure-PyTorch reference of both kernels is ``reference.lora_forward``;
``lora_linear`` dispatches to this module on CUDA tensors.
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

R_MAX = 128


@triton.jit
def _tile_ids(pid, rows, cols, BR: tl.constexpr, BC: tl.constexpr, GROUP: tl.constexpr):
    """(row tile, column tile) of program ``pid``, GROUP row tiles per band (an L2-friendly order)."""
    n_r = (rows + BR - 1) // BR
    n_c = (cols + BC - 1) // BC
    band = GROUP * n_c
    first = (pid // band) * GROUP
    size = tl.minimum(n_r - first, GROUP)
    return first + (pid % band) % size, (pid % band) // size


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a·b with float32 accumulation; UPCAST multiplies in float32 (products of bfloat16/float16
    values are exact there): the interpreter's half-precision ``tl.dot`` is wrong in triton 3.9."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _forward_tile(
    pid_m, pid_n, x_ptr, w_ptr, bias_ptr, a_ptr, b_ptr, y_ptr, h_ptr,
    M, N, K, r,
    sxm, sxk, swn, swk, sar, sak, sbn, sbr, sym, syn,
    HAS_BIAS: tl.constexpr, WRITE_H: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    R: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    """Kernel D's BM×BN tile (pid_m, pid_n) of y; the kernels below only choose the tile and the operands."""
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rr = tl.arange(0, R)
    rk = tl.arange(0, BK)
    live_m = rm < M
    live_n = rn < N
    live_r = rr < r
    x_rows = x_ptr + rm.to(tl.int64)[:, None] * sxm
    w_cols = w_ptr + rn.to(tl.int64)[None, :] * swn
    a_cols = a_ptr + rr[None, :] * sar
    acc = tl.full((BM, BN), 0.0, tl.float32)
    hacc = tl.full((BM, R), 0.0, tl.float32)
    for k0 in range(0, K, BK):
        kk = k0 + rk
        live_k = kk < K
        xt = tl.load(x_rows + kk[None, :] * sxk, mask=live_m[:, None] & live_k[None, :], other=0.0)
        wt = tl.load(w_cols + kk[:, None] * swk, mask=live_k[:, None] & live_n[None, :], other=0.0)
        at = tl.load(a_cols + kk[:, None] * sak, mask=live_k[:, None] & live_r[None, :], other=0.0)
        acc = _dot(xt, wt, acc, PRECISION, UPCAST)
        hacc = _dot(xt, at, hacc, PRECISION, UPCAST)
    h = hacc.to(y_ptr.dtype.element_ty)
    if WRITE_H:
        h_ptrs = h_ptr + rm.to(tl.int64)[:, None] * r + rr[None, :]
        tl.store(h_ptrs, h, mask=((rm + pid_n * M) < M)[:, None] & live_r[None, :])  # first column tile only
    bt = tl.load(b_ptr + rr[:, None] * sbr + rn[None, :] * sbn, mask=live_r[:, None] & live_n[None, :], other=0.0)
    acc = _dot(h, bt, acc, PRECISION, UPCAST)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=live_n, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + rm.to(tl.int64)[:, None] * sym + rn[None, :] * syn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=live_m[:, None] & live_n[None, :])


@triton.jit
def _forward_kernel(
    x_ptr, w_ptr, bias_ptr, a_ptr, b_ptr, y_ptr, h_ptr,
    M, N, K, r,
    sxm, sxk, swn, swk, sar, sak, sbn, sbr, sym, syn,
    HAS_BIAS: tl.constexpr, WRITE_H: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    R: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr,
):
    pid_m, pid_n = _tile_ids(tl.program_id(0), M, N, BM, BN, GROUP)
    _forward_tile(pid_m, pid_n, x_ptr, w_ptr, bias_ptr, a_ptr, b_ptr, y_ptr, h_ptr, M, N, K, r,
                  sxm, sxk, swn, swk, sar, sak, sbn, sbr, sym, syn, HAS_BIAS, WRITE_H, PRECISION, UPCAST, R, BM, BN, BK)


@triton.jit
def _group_forward_kernel(
    x_ptr, w0, w1, w2, bias0, bias1, bias2, a0, a1, a2, b0, b1, b2, y0, y1, y2,
    M, N0, N1, N2, K, r, sxm, sxk,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    R: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    """Kernel D for up to three layers that read the same x (M ≤ BM rows): program p owns column tile p of the
    outputs laid end to end, y0 then y1 then y2; W, A, B and y of each are contiguous."""
    pid = tl.program_id(0)
    t1 = (N0 + BN - 1) // BN
    t2 = t1 + (N1 + BN - 1) // BN
    if pid < t1:
        _forward_tile(0, pid, x_ptr, w0, bias0, a0, b0, y0, y0, M, N0, K, r, sxm, sxk, K, 1, K, 1, r, 1, N0, 1,
                      HAS_BIAS, False, PRECISION, UPCAST, R, BM, BN, BK)
    elif pid < t2:
        _forward_tile(0, pid - t1, x_ptr, w1, bias1, a1, b1, y1, y1, M, N1, K, r, sxm, sxk, K, 1, K, 1, r, 1, N1, 1,
                      HAS_BIAS, False, PRECISION, UPCAST, R, BM, BN, BK)
    else:
        _forward_tile(0, pid - t2, x_ptr, w2, bias2, a2, b2, y2, y2, M, N2, K, r, sxm, sxk, K, 1, K, 1, r, 1, N2, 1,
                      HAS_BIAS, False, PRECISION, UPCAST, R, BM, BN, BK)


@triton.jit
def _dgrad_kernel(
    g_ptr, w_ptr, a_ptr, b_ptr, dx_ptr, gb_ptr,
    M, N, K, r,
    sgm, sgn, swn, swk, sar, sak, sbn, sbr, sdm, sdk,
    WRITE_GB: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    R: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr,
):
    pid_m, pid_k = _tile_ids(tl.program_id(0), M, K, BM, BK, GROUP)
    rm = pid_m * BM + tl.arange(0, BM)
    rk = pid_k * BK + tl.arange(0, BK)
    rr = tl.arange(0, R)
    rn = tl.arange(0, BN)
    live_m = rm < M
    live_k = rk < K
    live_r = rr < r
    g_rows = g_ptr + rm.to(tl.int64)[:, None] * sgm
    w_cols = w_ptr + rk.to(tl.int64)[None, :] * swk
    b_cols = b_ptr + rr[None, :] * sbr
    acc = tl.full((BM, BK), 0.0, tl.float32)
    gbacc = tl.full((BM, R), 0.0, tl.float32)
    for n0 in range(0, N, BN):
        nn = n0 + rn
        live_n = nn < N
        gt = tl.load(g_rows + nn[None, :] * sgn, mask=live_m[:, None] & live_n[None, :], other=0.0)
        wt = tl.load(w_cols + nn.to(tl.int64)[:, None] * swn, mask=live_n[:, None] & live_k[None, :], other=0.0)
        bt = tl.load(b_cols + nn.to(tl.int64)[:, None] * sbn, mask=live_n[:, None] & live_r[None, :], other=0.0)
        acc = _dot(gt, wt, acc, PRECISION, UPCAST)
        gbacc = _dot(gt, bt, gbacc, PRECISION, UPCAST)
    gb = gbacc.to(dx_ptr.dtype.element_ty)
    if WRITE_GB:
        gb_ptrs = gb_ptr + rm.to(tl.int64)[:, None] * r + rr[None, :]
        tl.store(gb_ptrs, gb, mask=((rm + pid_k * M) < M)[:, None] & live_r[None, :])  # first column tile only
    at = tl.load(a_ptr + rr[:, None] * sar + rk[None, :] * sak, mask=live_r[:, None] & live_k[None, :], other=0.0)
    acc = _dot(gb, at, acc, PRECISION, UPCAST)
    dx_ptrs = dx_ptr + rm.to(tl.int64)[:, None] * sdm + rk[None, :] * sdk
    tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=live_m[:, None] & live_k[None, :])


# -- launch wrappers ------------------------------------------------------------------------------


def interpreted() -> bool:
    """True when the kernels of this module instance run in Triton's interpreter."""
    return type(_forward_kernel).__name__ == "InterpretedFunction"


def for_device(device: torch.device | str):
    """The kernel module for tensors on ``device`` (compiled for CUDA, interpreted for CPU under
    ``TRITON_INTERPRET=1``)."""
    return triton_modes.for_device(sys.modules[__name__], interpreted(), device)


_FORWARD = triton_modes.FastLauncher(_forward_kernel)
_DGRAD = triton_modes.FastLauncher(_dgrad_kernel)

# (BM, BN, BK, num_warps, num_stages) by output rows: the best of benchmarks/linear_kernels.py on an H100.
# Changing them needs _FORWARD_PLANS / _DGRAD_PLANS / _GROUP_PLANS cleared (the plans remember the tiles).
# Decoding (≤ 16 rows) is a GEMV bound by the bytes of W: narrow column tiles give enough programs to fill the
# GPU (benchmarks/linear_kernels.py --decode, H200: 56 µs per 1.1B layer against 213 µs with _SMALL).
_LARGE = (128, 128, 64, 8, 3)
_SMALL = (16, 128, 64, 4, 4)
_DECODE = (16, 16, 256, 2, 3)
_DECODE_WIDE = (16, 16, 128, 1, 4)  # more outputs than inputs (gate/up)
_INTERPRETED = (16, 16, 16, 1, 1)


def _tiles(rows: int, dtype: torch.dtype, R: int, N: int | None = None, K: int = 0) -> tuple[int, int, int, int, int]:
    """Kernel D's tile for M = rows (N, K given: the forward, with decoding tiles) or Kernel E's (N None)."""
    if interpreted():
        return _INTERPRETED
    if rows <= 16 and N is not None:
        bm, bn, bk, warps, stages = _DECODE_WIDE if N > K else _DECODE
    else:
        bm, bn, bk, warps, stages = _SMALL if rows <= 64 else _LARGE
    if dtype == torch.float32 or R > 32:  # wider operands: fewer pipeline stages fit in shared memory
        stages = 2
    return bm, bn, bk, warps, stages


def _padded_rank(r: int) -> int:
    if not 1 <= r <= R_MAX:
        raise ValueError(f"the fused adapted linear supports ranks 1..{R_MAX}, not r = {r}")
    return max(16, 1 << (r - 1).bit_length())


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _check(x: torch.Tensor, weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> None:
    if not (x.dtype == weight.dtype == A.dtype == B.dtype) or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(
            "the fused adapted linear needs x, W, A and B in one of float32/bfloat16/float16, got "
            f"{x.dtype}, {weight.dtype}, {A.dtype}, {B.dtype}"
        )
    if (x.device.type == "cuda") == interpreted() or not (x.device == weight.device == A.device == B.device):
        raise RuntimeError(f"this kernel module cannot take {x.device} tensors; use linear_kernels.for_device")


def _fast_key(launcher, a, weight, bias, A, B, keep):
    """The direct-launch key when every operand is contiguous and 16-byte aligned on the current CUDA
    device (the common case: activations, a weight, views of θ_D), else None. Shapes and dtypes then
    fix every integer argument and Triton's specialisation."""
    if not (launcher.direct and a.is_contiguous() and weight.is_contiguous() and A.is_contiguous()
            and B.is_contiguous()):
        return None
    ptrs = a.data_ptr() | weight.data_ptr() | A.data_ptr() | B.data_ptr() | (0 if bias is None else bias.data_ptr())
    device = a.get_device()
    if ptrs % 16 or device != torch.cuda.current_device():
        return None
    return (a.shape, weight.shape, A.shape[0], a.dtype, weight.dtype, A.dtype, B.dtype, bias is None, keep, device)


_FORWARD_PLANS: dict = {}
_DGRAD_PLANS: dict = {}


def forward(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, A: torch.Tensor, B: torch.Tensor, keep_h: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Kernel D: ``(y, h)`` with ``y = x Wᵀ + b + round(x Aᵀ) Bᵀ`` (M×N) and ``h = round(x Aᵀ)`` (M×r,
    contiguous) when ``keep_h``, else None. x: M×K, W: N×K, A: r×K, B: N×r, bias: N or None."""
    key = _fast_key(_FORWARD, x, weight, bias, A, B, keep_h)
    plan = _FORWARD_PLANS.get(key) if key is not None else None
    if plan is not None and _FORWARD.cached(key) is not None:
        compiled, grid0, ints, M, N, r = plan
        y = x.new_empty((M, N))
        h = x.new_empty((M, r)) if keep_h else y
        _FORWARD.run(compiled, grid0, key[-1], x, weight, weight if bias is None else bias, A, B, y, h, *ints)
        return y, (h if keep_h else None)
    _check(x, weight, A, B)
    M, K = x.shape
    N, r = weight.shape[0], A.shape[0]
    R = _padded_rank(r)
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    h = torch.empty((M, r), dtype=x.dtype, device=x.device) if keep_h else y
    bias_arg = weight if bias is None else bias
    bm, bn, bk, warps, stages = _tiles(M, x.dtype, R, N, K)
    grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
    args = (
        x, weight, bias_arg, A, B, y, h, M, N, K, r,
        *x.stride(), *weight.stride(), *A.stride(), *B.stride(), *y.stride(),
        bias is not None, keep_h, _precision(x.dtype), interpreted(), R, bm, bn, bk, 8,
    )
    _FORWARD.launch(key, grid, x.device, *args, num_warps=warps, num_stages=stages)
    if key is not None and key in _FORWARD.compiled:
        _FORWARD_PLANS[key] = (_FORWARD.compiled[key], grid[0], args[7:], M, N, r)
    return y, (h if keep_h else None)


GROUP_MAX = 3  # layers per launch of _group_forward_kernel
_GROUP = triton_modes.FastLauncher(_group_forward_kernel)
_GROUP_PLANS: dict = {}


def group_tiles(
    rows: int, K: int, outs: tuple[int, ...], r: int, dtype: torch.dtype
) -> tuple[int, int, int, int, int] | None:
    """The one tile with which ``forward_group`` runs layers of ``outs`` outputs on ``rows`` × K inputs, or None
    when they cannot share a launch: more than GROUP_MAX layers, more than one row tile, or layers whose own
    tiles (``forward``'s) differ. With the same tile each output equals ``forward``'s bit for bit: the same code
    computes it."""
    if not 1 <= len(outs) <= GROUP_MAX or not 1 <= r <= R_MAX:
        return None
    R = _padded_rank(r)
    tiles = {_tiles(rows, dtype, R, N, K) for N in outs}
    if len(tiles) != 1:
        return None
    tile = tiles.pop()
    return tile if rows <= tile[0] else None


def _group_key(x, weights, biases, As, Bs):
    """``forward_group``'s direct-launch key, as ``_fast_key``: every operand contiguous and 16-byte aligned on the
    current CUDA device, else None. Shapes and dtypes then fix every integer argument and Triton's specialisation."""
    if not (_GROUP.direct and x.is_contiguous()):
        return None
    operands = (*weights, *As, *Bs, *(b for b in biases if b is not None))
    ptrs = x.data_ptr()
    for t in operands:
        if not t.is_contiguous():
            return None
        ptrs |= t.data_ptr()
    device = x.get_device()
    if ptrs % 16 or device != torch.cuda.current_device():
        return None
    return (x.shape, tuple(t.shape for t in operands), tuple(t.dtype for t in operands), x.dtype,
            tuple(b is None for b in biases), device)


def _group_operands(x, weights, biases, As, Bs, ys) -> tuple:
    """The kernel's tensor arguments: each list padded to GROUP_MAX (padding layers have no columns)."""
    pad = GROUP_MAX - len(weights)
    bs = [w if b is None else b for b, w in zip(biases, weights)]  # an unused pointer where there is no bias
    return (x, *weights, *[weights[-1]] * pad, *bs, *[bs[-1]] * pad, *As, *[As[-1]] * pad, *Bs, *[Bs[-1]] * pad,
            *ys, *[ys[-1]] * pad)


def forward_group(
    x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor | None], As: list[torch.Tensor],
    Bs: list[torch.Tensor],
) -> list[torch.Tensor]:
    """Kernel D for layers that read the same x, in one launch: ``[x W_iᵀ + b_i + round(x A_iᵀ) B_iᵀ]``, each
    equal bit for bit to ``forward(x, W_i, b_i, A_i, B_i, False)[0]``. x: M×K with M ≤ the decoding tile's rows;
    W_i: N_i×K, A_i: r×K, B_i: N_i×r, all contiguous; biases all None or all given. ValueError when
    ``group_tiles`` gives None."""
    key = _group_key(x, weights, biases, As, Bs)
    plan = _GROUP_PLANS.get(key) if key is not None else None
    if plan is not None and _GROUP.cached(key) is not None:  # checked when the plan was made
        compiled, grid0, tail, M, outs = plan
        ys = [x.new_empty((M, N)) for N in outs]
        _GROUP.run(compiled, grid0, key[-1], *_group_operands(x, weights, biases, As, Bs, ys), *tail)
        return ys
    n = len(weights)
    if not (n == len(biases) == len(As) == len(Bs)) or len({b is None for b in biases}) > 1:
        raise ValueError("forward_group needs one weight, bias, A and B per layer, biases all given or all None")
    r = As[0].shape[0]
    outs = tuple(w.shape[0] for w in weights)
    tile = group_tiles(x.shape[0], x.shape[1], outs, r, x.dtype)
    if tile is None or any(a.shape[0] != r for a in As):
        raise ValueError(f"these {n} layers cannot share one launch on {tuple(x.shape)} rows (see group_tiles)")
    for w, a, b in zip(weights, As, Bs):
        _check(x, w, a, b)
        if not (w.is_contiguous() and a.is_contiguous() and b.is_contiguous()):
            raise ValueError("forward_group needs contiguous W, A and B")
    M, K = x.shape
    ys = [x.new_empty((M, N)) for N in outs]
    bm, bn, bk, warps, stages = tile
    grid0 = sum(triton.cdiv(N, bn) for N in outs)
    tail = (M, *outs, *[0] * (GROUP_MAX - n), K, r, *x.stride(), biases[0] is not None, _precision(x.dtype),
            interpreted(), _padded_rank(r), bm, bn, bk)
    _GROUP.launch(key, (grid0,), x.device, *_group_operands(x, weights, biases, As, Bs, ys), *tail,
                  num_warps=warps, num_stages=stages)
    if key is not None and key in _GROUP.compiled:
        _GROUP_PLANS[key] = (_GROUP.compiled[key], grid0, tail, M, outs)
    return ys


def dgrad(
    g: torch.Tensor, weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, keep_gb: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Kernel E: ``(dx, gB)`` with ``dx = g W + round(g B) A`` (M×K) and ``gB = round(g B)`` (M×r,
    contiguous) when ``keep_gb``, else None. g: M×N, W: N×K, A: r×K, B: N×r."""
    key = _fast_key(_DGRAD, g, weight, None, A, B, keep_gb)
    plan = _DGRAD_PLANS.get(key) if key is not None else None
    if plan is not None and _DGRAD.cached(key) is not None:
        compiled, grid0, ints, M, K, r = plan
        dx = g.new_empty((M, K))
        gb = g.new_empty((M, r)) if keep_gb else dx
        _DGRAD.run(compiled, grid0, key[-1], g, weight, A, B, dx, gb, *ints)
        return dx, (gb if keep_gb else None)
    _check(g, weight, A, B)
    M, N = g.shape
    K, r = weight.shape[1], A.shape[0]
    R = _padded_rank(r)
    dx = torch.empty((M, K), dtype=g.dtype, device=g.device)
    gb = torch.empty((M, r), dtype=g.dtype, device=g.device) if keep_gb else dx
    bm, bn, bk, warps, stages = _tiles(M, g.dtype, R)
    # Kernel E's output columns are K and its loop runs over N: the tile roles of BN and BK swap.
    grid = (triton.cdiv(M, bm) * triton.cdiv(K, bn),)
    args = (
        g, weight, A, B, dx, gb, M, N, K, r,
        *g.stride(), *weight.stride(), *A.stride(), *B.stride(), *dx.stride(),
        keep_gb, _precision(g.dtype), interpreted(), R, bm, bk, bn, 8,
    )
    _DGRAD.launch(key, grid, g.device, *args, num_warps=warps, num_stages=stages)
    if key is not None and key in _DGRAD.compiled:
        _DGRAD_PLANS[key] = (_DGRAD.compiled[key], grid[0], args[6:], M, K, r)
    return dx, (gb if keep_gb else None)


__all__ = ["GROUP_MAX", "R_MAX", "dgrad", "for_device", "forward", "forward_group", "group_tiles", "interpreted"]
