"""Triton kernels of the Uni-LoRA projection P (``docs/projection.md``): readout θ_D = P θ_d and the
θ gradient Pᵀ g, and the merge kernel (Kernel C). With ``linear_kernels`` and ``triton_modes``, one of the
modules of ``unilora_hf`` that import ``triton``.

Kernel A, readout: ``out[t] = θ_d[idx(start + t)] · s(idx(start + t))`` for ``t < count``, float32.
    native: π is evaluated per position in the kernel (keys, 4-round Feistel, cycle-walk), in uint32 when
    D < 2^32 (``narrow``; every intermediate then fits, and uint32 products wrap as the masked ones do) and
    else in int64 with 32-bit masks, so idx is bit-identical to ``Projection.indices``. Each lane walks
    ``READOUT_QUEUE`` positions one after another (``_readout_native_body``): a pass of the round function
    is spent on a lane only while it has a walk to finish, where a block walking all its positions at once
    runs as many passes as its longest walk (about 6 for 1,024 positions at 3/4 fill, against 1.33 on
    average). The scale is ``scale_values[0]`` if ``idx < D mod d`` else ``scale_values[1]``. peft: idx
    and s are read from the int32 table and the float32 scale table. Each output is one float32 product,
    the same one the reference forms, so the readout is bit-identical to
    ``θ_d[idx] * projection.scales_of(idx)``.

Kernel A writes ``out``'s dtype: the float32 product rounded once to nearest even (bfloat16 by hand in
    ``_rounded``, since the interpreter truncates), the bits of ``readout(...).to(dtype)``. Gated (``GATED``),
    every program first reads an int32 flag and does nothing when it is 0: with ``_compare_snapshot_kernel``
    (flag ← any bit of θ_d differs from a snapshot; snapshot ← θ_d) it keeps θ_D between inference passes
    without a host synchronisation (``refresh``, ``readout_cache``).

Kernel B, gradient: ``(Pᵀ g)[j] = s(j) · Σ_{m < n_j} g[row_m(j)]`` with float32 accumulation, for g
    float32 or bfloat16 of length D, as a gather-reduce per column. native: ``row_m(j) = π⁻¹(j + m·d)``,
    walked in the kernel; a lane owns one column and a segment of consecutive m, whose rows it walks and
    adds one after another in increasing m (``_grad_native_kernel``, plan ``native_grad_plan``); the
    segment sums of a column in one program are added by a fixed tree. peft: rows are read from a CSR
    inverse of the table (``dispatch.peft_csr``: rows of column j in increasing order); a program owns a
    tile of BJ columns × BM consecutive m and ``iters`` such tiles, tile sums are fixed tree reductions over
    m, and tiles are added in increasing m (``peft_grad_plan``). In both, when the m range is split over S
    programs their partial sums are added in increasing split order by a second kernel. No atomics: the
    result is bit-identical run to run on one device, and the plan depends only on (D, d), never on the
    device.

Loops over a runtime count are ``while`` loops (``range`` of a runtime scalar fails in the interpreter
of triton 3.6 with numpy 2). The kernels call only builtins of ``triton.language`` (``tl.full``,
``tl.reduce``, ...), never its ``@triton.jit`` helpers (``tl.zeros``, ``tl.sum``, ``tl.max``): those are
created interpreted or compiled once, when triton is imported, so they would break one of the two
variants of this module. Interpreted variants reduce with the standard library's combine functions,
which the interpreter recognises (numpy, fast) without calling them; compiled ones with local
equivalents.

The launch wrappers take plain arguments (seed, D, d, tensors) so that the custom ops of
``dispatch`` can call them; tensors must be on one device. ``for_device(device)`` returns the variant
of this module to use: for CUDA tensors, always compiled kernels (also when ``TRITON_INTERPRET=1`` is
set); for CPU tensors, a twin of this module whose kernels run in Triton's interpreter, only when
``TRITON_INTERPRET=1`` is set (the CPU test path: slow, for small sizes).
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
from ..projection import balanced_counts, correctly_rounded_rsqrt, feistel_bits, feistel_keys

READOUT_BLOCK = 1024
# Kernel A (native): lanes per program, outputs walked one after another per lane (``_readout_native_body``), warps;
# in the interpreter, where each pass costs the same for any number of lanes, fewer and wider programs (the output
# bits do not depend on these)
READOUT_LANES, READOUT_QUEUE, READOUT_WARPS = 64, 8, 1
INTERPRETED_READOUT_LANES, INTERPRETED_READOUT_QUEUE = 1024, 4
GRAD_TILE = 1024
GRAD_TARGET_PROGRAMS = 1024
# native Kernel B: lanes per program, rows a lane walks one after another where the columns have them, warps.
# These and Kernel A's: the best of 32 and 48 settings at the 1.1B and 7B training D (d = 2^19) on an H200
# (benchmarks/RESULTS.md, session 15).
GRAD_LANES, GRAD_MIN_SEGMENT, GRAD_WARPS = 32, 8, 1
KEY_BIAS = 1 << 32

_SCALARS = ["start", "count", "n", "D", "d", "q", "rem", "k0", "k1", "k2", "k3", "h", "mh", "iters", "splits"]


@triton.jit
def _mix32(x):
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x = x ^ (x >> 15)
    x = (x * 0x68E31DA5) & 0xFFFFFFFF
    return x ^ (x >> 16)


@triton.jit
def _feistel(x, k0, k1, k2, k3, h, mh, INVERSE: tl.constexpr):
    left = x >> h
    right = x & mh
    if INVERSE:
        t = left
        left = right ^ (_mix32(left ^ k3) & mh)
        right = t
        t = left
        left = right ^ (_mix32(left ^ k2) & mh)
        right = t
        t = left
        left = right ^ (_mix32(left ^ k1) & mh)
        right = t
        t = left
        left = right ^ (_mix32(left ^ k0) & mh)
        right = t
    else:
        t = right
        right = left ^ (_mix32(right ^ k0) & mh)
        left = t
        t = right
        right = left ^ (_mix32(right ^ k1) & mh)
        left = t
        t = right
        right = left ^ (_mix32(right ^ k2) & mh)
        left = t
        t = right
        right = left ^ (_mix32(right ^ k3) & mh)
        left = t
    return (left << h) | right


@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _max(a, b):
    return tl.maximum(a, b)


if type(_add).__name__ == "InterpretedFunction":
    _add = getattr(tl.standard, "_sum_combine", _add)
    _max = getattr(tl.standard, "_elementwise_max", _max)


@triton.jit
def _walk(x, k0, k1, k2, k3, h, mh, D, INVERSE: tl.constexpr):
    y = _feistel(x, k0, k1, k2, k3, h, mh, INVERSE)
    outside = y >= D
    while tl.reduce(outside.to(tl.int32), 0, _max) > 0:
        y = tl.where(outside, _feistel(y, k0, k1, k2, k3, h, mh, INVERSE), y)
        outside = y >= D
    return y


@triton.jit
def _unbias_keys(k0, k1, k2, k3):
    return k0 - 4294967296, k1 - 4294967296, k2 - 4294967296, k3 - 4294967296


@triton.jit
def _narrowed(x, k0, k1, k2, k3, mh, D, NARROW: tl.constexpr):
    """x, the keys, the half mask and D as uint32 when NARROW (D < 2^32), else unchanged (int64). Below 2^32 every
    value of the walk and of the round function lies in [0, 2^32), and uint32 products wrap mod 2^32 exactly as the
    int64 form's masked ones do: the same bits at a fraction of the integer work."""
    if NARROW:
        return (x.to(tl.uint32), k0.to(tl.uint32), k1.to(tl.uint32), k2.to(tl.uint32), k3.to(tl.uint32),
                mh.to(tl.uint32), D.to(tl.uint32))
    else:
        return x, k0, k1, k2, k3, mh, D


@triton.jit
def _walk_from(x, k0, k1, k2, k3, h, mh, D, INVERSE: tl.constexpr, NARROW: tl.constexpr):
    """π(x) (π⁻¹ when INVERSE) of int64 x in [0, D), int64; in uint32 when NARROW (``_narrowed``)."""
    x, k0, k1, k2, k3, mh, D = _narrowed(x, k0, k1, k2, k3, mh, D, NARROW)
    return _walk(x, k0, k1, k2, k3, h, mh, D, INVERSE).to(tl.int64)


@triton.jit(do_not_specialize=_SCALARS)
def _permute_kernel(
    pos_ptr, out_ptr, n, D, k0, k1, k2, k3, h, mh, INVERSE: tl.constexpr, NARROW: tl.constexpr, BLOCK: tl.constexpr
):
    k0, k1, k2, k3 = _unbias_keys(k0, k1, k2, k3)
    lane = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = lane < n
    x = tl.load(pos_ptr + lane, mask=live, other=0).to(tl.int64)
    y = _walk_from(x, k0, k1, k2, k3, h, mh, D, INVERSE, NARROW)
    tl.store(out_ptr + lane, y, mask=live)


@triton.jit
def _rounded(x, out_ptr):
    """float32 x in ``out_ptr``'s dtype, rounded to nearest even as ``Tensor.to`` rounds. bfloat16 by hand
    (the interpreter truncates): add 0x7FFF plus the kept lowest bit, keep the high half; NaN → 0x7FC0."""
    if out_ptr.dtype.element_ty == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        high = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        high = tl.where(x != x, 0x7FC0, high)
        return high.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(out_ptr.dtype.element_ty)


@triton.jit
def _readout_native_body(
    theta_ptr, out_ptr, idx_ptr, start, count, D, d, rem, big, small, k0, k1, k2, k3, h, mh,
    WRITE_OUT: tl.constexpr, WRITE_IDX: tl.constexpr, NARROW: tl.constexpr, LANES: tl.constexpr,
    QUEUE: tl.constexpr,
):
    # Lane l of program p owns the outputs t = p·LANES·QUEUE + l + i·LANES (i < QUEUE) and walks them one after
    # another: every pass applies F once on every lane, a lane whose value has entered [0, D) writes that output
    # and starts its next one. So a pass is spent on a lane only while it has work, where a block that walked all
    # its outputs at once would run as many passes as its longest walk.
    k0, k1, k2, k3 = _unbias_keys(k0, k1, k2, k3)
    first = tl.program_id(0).to(tl.int64) * (LANES * QUEUE)
    end = tl.minimum(first + LANES * QUEUE, count)
    t = first + tl.arange(0, LANES)
    live = t < end
    y, k0, k1, k2, k3, mh, D_ = _narrowed(tl.where(live, t + start, 0), k0, k1, k2, k3, mh, D, NARROW)
    while tl.reduce(live.to(tl.int32), 0, _max) > 0:
        y = _feistel(y, k0, k1, k2, k3, h, mh, False)
        done = live & (y < D_)
        if NARROW:  # π(pos) < D < 2^32 and d ≤ D: the modulo in uint32 too
            col = (y % d.to(tl.uint32)).to(tl.int64)
        else:
            col = y % d
        if WRITE_IDX:
            tl.store(idx_ptr + t, col, mask=done)
        if WRITE_OUT:
            scale = tl.where(col < rem, big, small)
            value = tl.load(theta_ptr + col, mask=done, other=0.0)
            tl.store(out_ptr + t, _rounded(value * scale, out_ptr), mask=done)
        t = tl.where(done, t + LANES, t)
        live = t < end
        y = tl.where(done, (t + start).to(y.dtype), y)


@triton.jit(do_not_specialize=_SCALARS)
def _readout_native_kernel(
    theta_ptr, out_ptr, idx_ptr, dirty_ptr, start, count, D, d, rem, big, small, k0, k1, k2, k3, h, mh,
    WRITE_OUT: tl.constexpr, WRITE_IDX: tl.constexpr, GATED: tl.constexpr, NARROW: tl.constexpr,
    LANES: tl.constexpr, QUEUE: tl.constexpr,
):
    if GATED:
        if tl.load(dirty_ptr) != 0:
            _readout_native_body(theta_ptr, out_ptr, idx_ptr, start, count, D, d, rem, big, small, k0, k1, k2, k3,
                                 h, mh, WRITE_OUT, WRITE_IDX, NARROW, LANES, QUEUE)
    else:
        _readout_native_body(theta_ptr, out_ptr, idx_ptr, start, count, D, d, rem, big, small, k0, k1, k2, k3,
                             h, mh, WRITE_OUT, WRITE_IDX, NARROW, LANES, QUEUE)


@triton.jit
def _readout_peft_body(theta_ptr, table_ptr, scales_ptr, out_ptr, start, count, BLOCK: tl.constexpr):
    lane = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = lane < count
    col = tl.load(table_ptr + start + lane, mask=live, other=0).to(tl.int64)
    value = tl.load(theta_ptr + col, mask=live, other=0.0)
    scale = tl.load(scales_ptr + col, mask=live, other=0.0)
    tl.store(out_ptr + lane, _rounded(value * scale, out_ptr), mask=live)


@triton.jit(do_not_specialize=_SCALARS)
def _readout_peft_kernel(theta_ptr, table_ptr, scales_ptr, out_ptr, dirty_ptr, start, count, GATED: tl.constexpr,
                         BLOCK: tl.constexpr):
    if GATED:
        if tl.load(dirty_ptr) != 0:
            _readout_peft_body(theta_ptr, table_ptr, scales_ptr, out_ptr, start, count, BLOCK)
    else:
        _readout_peft_body(theta_ptr, table_ptr, scales_ptr, out_ptr, start, count, BLOCK)


@triton.jit(do_not_specialize=["n"])
def _compare_snapshot_kernel(theta_ptr, snapshot_ptr, dirty_ptr, n, BLOCK: tl.constexpr):
    """dirty ← max(dirty, [any bit of θ_d in this block differs from the snapshot]); snapshot ← θ_d.
    θ_d and the snapshot are read as int32 words: a bitwise comparison (−0.0 ≠ 0.0; NaN = the same NaN)."""
    lane = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = lane < n
    now = tl.load(theta_ptr + lane, mask=live, other=0)
    before = tl.load(snapshot_ptr + lane, mask=live, other=0)
    changed = tl.reduce((now != before).to(tl.int32), 0, _max)
    tl.store(snapshot_ptr + lane, now, mask=live)
    tl.atomic_max(dirty_ptr, changed)


@triton.jit
def _column_scale(scales_ptr, col, live, rem, big, small, NATIVE_KIND: tl.constexpr):
    if NATIVE_KIND:
        scale = tl.where(col < rem, big, small)
    else:
        scale = tl.load(scales_ptr + col, mask=live, other=0.0)
    return scale


@triton.jit(do_not_specialize=_SCALARS)
def _grad_peft_kernel(
    g_ptr, out_ptr, part_ptr, scales_ptr, rows_ptr, offsets_ptr, d, iters,
    FINAL: tl.constexpr, BJ: tl.constexpr, BM: tl.constexpr,
):
    col_block = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    lane = tl.arange(0, BJ * BM)
    col = col_block * BJ + lane // BM
    col_live = col < d
    first = tl.load(offsets_ptr + col, mask=col_live, other=0)
    n = tl.load(offsets_ptr + col + 1, mask=col_live, other=0) - first
    acc = tl.full([BJ], 0.0, tl.float32)
    it = iters * 0
    while it < iters:
        m = (split * iters + it) * BM + lane % BM
        valid = col_live & (m < n)
        rows = tl.load(rows_ptr + first + m, mask=valid, other=0).to(tl.int64)
        g = tl.load(g_ptr + rows, mask=valid, other=0.0).to(tl.float32)
        acc += tl.reduce(tl.reshape(g, (BJ, BM)), 1, _add)
        it += 1
    out_col = col_block * BJ + tl.arange(0, BJ)
    out_live = out_col < d
    if FINAL:
        scale = _column_scale(scales_ptr, out_col, out_live, 0, 0.0, 0.0, False)
        tl.store(out_ptr + out_col, acc * scale, mask=out_live)
    else:
        tl.store(part_ptr + split * d + out_col, acc, mask=out_live)


@triton.jit(do_not_specialize=_SCALARS)
def _grad_native_kernel(
    g_ptr, out_ptr, part_ptr, D, d, q, rem, big, small, k0, k1, k2, k3, h, mh, seg,
    NARROW: tl.constexpr, FINAL: tl.constexpr, BJ: tl.constexpr, SUB: tl.constexpr,
):
    # Program (c, s) owns columns c·BJ + [0, BJ) and, of each, SUB segments of ``seg`` consecutive m, one segment
    # per lane: the rows of a lane are summed one after another, each found by walking π⁻¹ from j + m·d. Every
    # pass applies F⁻¹ once on every lane, and a lane whose value has entered [0, D) adds that row of g and starts
    # its next m (as in ``_readout_native_body``). The SUB segment sums of a column are then added by a fixed tree.
    k0, k1, k2, k3 = _unbias_keys(k0, k1, k2, k3)
    lane = tl.arange(0, BJ * SUB)
    col = tl.program_id(0).to(tl.int64) * BJ + lane % BJ
    n = tl.where(col < d, q + (col < rem).to(tl.int64), 0)
    m = (tl.program_id(1).to(tl.int64) * SUB + lane // BJ) * seg
    end = tl.minimum(m + seg, n)
    live = m < end
    y, k0, k1, k2, k3, mh, D_ = _narrowed(tl.where(live, col + m * d, 0), k0, k1, k2, k3, mh, D, NARROW)
    acc = tl.full([BJ * SUB], 0.0, tl.float32)
    while tl.reduce(live.to(tl.int32), 0, _max) > 0:
        y = _feistel(y, k0, k1, k2, k3, h, mh, True)
        done = live & (y < D_)
        g = tl.load(g_ptr + y.to(tl.int64), mask=done, other=0.0).to(tl.float32)
        acc = tl.where(done, acc + g, acc)
        m = tl.where(done, m + 1, m)
        live = m < end
        y = tl.where(done, (col + m * d).to(y.dtype), y)
    total = tl.reduce(tl.reshape(acc, (SUB, BJ)), 0, _add)
    out_col = tl.program_id(0).to(tl.int64) * BJ + tl.arange(0, BJ)
    out_live = out_col < d
    if FINAL:
        scale = _column_scale(out_ptr, out_col, out_live, rem, big, small, True)
        tl.store(out_ptr + out_col, total * scale, mask=out_live)
    else:
        tl.store(part_ptr + tl.program_id(1).to(tl.int64) * d + out_col, total, mask=out_live)


@triton.jit(do_not_specialize=_SCALARS)
def _grad_finish_kernel(
    part_ptr, out_ptr, scales_ptr, d, rem, big, small, splits, NATIVE_KIND: tl.constexpr, BLOCK: tl.constexpr
):
    col = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = col < d
    acc = tl.full([BLOCK], 0.0, tl.float32)
    s = splits * 0
    while s < splits:
        acc += tl.load(part_ptr + s.to(tl.int64) * d + col, mask=live, other=0.0)
        s += 1
    scale = _column_scale(scales_ptr, col, live, rem, big, small, NATIVE_KIND)
    tl.store(out_ptr + col, acc * scale, mask=live)


@triton.jit(do_not_specialize=["n_out", "n_in", "r", "stride_o", "stride_i", "sign"])
def _merge_kernel(w_ptr, out_ptr, a_ptr, b_ptr, n_out, n_in, r, stride_o, stride_i, sign, BO: tl.constexpr, BI: tl.constexpr):
    o = tl.program_id(0) * BO + tl.arange(0, BO)
    i = tl.program_id(1) * BI + tl.arange(0, BI)
    live_o = o < n_out
    live_i = i < n_in
    acc = tl.full((BO, BI), 0.0, tl.float32)
    a = 0
    while a < r:
        b_col = tl.load(b_ptr + o.to(tl.int64) * r + a, mask=live_o, other=0.0)
        a_row = tl.load(a_ptr + a * n_in + i.to(tl.int64), mask=live_i, other=0.0)
        acc += b_col[:, None] * a_row[None, :]
        a += 1
    offsets = o.to(tl.int64)[:, None] * stride_o + i.to(tl.int64)[None, :] * stride_i
    live = live_o[:, None] & live_i[None, :]
    w = tl.load(w_ptr + offsets, mask=live, other=0.0).to(tl.float32)
    tl.store(out_ptr + offsets, (w + sign * acc).to(out_ptr.dtype.element_ty), mask=live)


# -- launch wrappers ------------------------------------------------------------------------------


def interpreted() -> bool:
    """True when the kernels of this module instance run in Triton's interpreter."""
    return type(_readout_native_kernel).__name__ == "InterpretedFunction"


def interpreter_enabled() -> bool:
    """Whether ``TRITON_INTERPRET`` is set to a true value (the opt-in for the CPU path)."""
    return triton_modes.interpreter_enabled()


def for_device(device: torch.device | str):
    """The kernel module for tensors on ``device``: compiled for CUDA; interpreted for CPU, only when
    ``TRITON_INTERPRET=1`` is set (else RuntimeError)."""
    return triton_modes.for_device(sys.modules[__name__], interpreted(), device)


def _check_device(*tensors: torch.Tensor) -> None:
    device = tensors[0].device
    if (device.type == "cuda") == interpreted():
        raise RuntimeError(
            f"this {'interpreted' if interpreted() else 'compiled'} kernel module cannot take {device} tensors; "
            "use projection_kernels.for_device(device)"
        )
    for t in tensors[1:]:
        if t.device != device:
            raise ValueError(f"tensors on different devices: {device} and {t.device}")


class _on_device:
    """Makes ``device`` current for a CUDA launch (no-op elsewhere)."""

    def __init__(self, device: torch.device):
        self.ctx = torch.cuda.device(device) if device.type == "cuda" else None

    def __enter__(self):
        if self.ctx is not None:
            self.ctx.__enter__()

    def __exit__(self, *exc):
        if self.ctx is not None:
            self.ctx.__exit__(*exc)


def _native_args(seed: int, D: int) -> tuple[int, ...]:
    """(k0+2^32, k1+2^32, k2+2^32, k3+2^32, h, 2^h − 1): keys are passed biased by 2^32 so that
    Triton always types them int64; the kernels subtract the bias."""
    h = feistel_bits(D) // 2
    return (*(k + KEY_BIAS for k in feistel_keys(seed)), h, (1 << h) - 1)


def narrow(D: int) -> bool:
    """Whether the native permutation on [0, D) runs in uint32 (D < 2^32) rather than int64."""
    return D < 1 << 32


def _native_scales(D: int, d: int) -> tuple[int, int, float, float]:
    """(q, rem, s_big, s_small) with n_j = q + [j < rem] and s = float32 nearest 1/sqrt(n)."""
    q, rem, _ = balanced_counts(D, d)
    return q, rem, correctly_rounded_rsqrt(q + 1), correctly_rounded_rsqrt(q)


def native_permute(positions: torch.Tensor, seed: int, D: int, inverse: bool = False) -> torch.Tensor:
    """π(x) (or π⁻¹(x) when ``inverse``) of the native permutation keyed by ``seed`` on [0, D), for an
    integer tensor of values in [0, D); int64, same shape and device."""
    x = positions.to(torch.int64).contiguous().view(-1)
    _check_device(x)
    out = torch.empty_like(x)
    if x.numel():
        with _on_device(x.device):
            _permute_kernel[(triton.cdiv(x.numel(), READOUT_BLOCK),)](
                x, out, x.numel(), D, *_native_args(seed, D), INVERSE=inverse, NARROW=narrow(D), BLOCK=READOUT_BLOCK
            )
    return out.view(positions.shape)


def _readout_launch(count: int) -> tuple[tuple[int], dict]:
    """The grid and launch settings of the native Kernel A for ``count`` outputs."""
    if interpreted():
        lanes, queue = INTERPRETED_READOUT_LANES, INTERPRETED_READOUT_QUEUE
    else:
        lanes, queue = READOUT_LANES, READOUT_QUEUE
    return (triton.cdiv(count, lanes * queue),), dict(LANES=lanes, QUEUE=queue, num_warps=READOUT_WARPS)


def native_indices(seed: int, D: int, d: int, start: int, count: int, device: torch.device | str) -> torch.Tensor:
    """idx(i) = π(i) mod d for i in [start, start+count), int64 on ``device`` (Kernel A without θ)."""
    out = torch.empty(count, dtype=torch.int64, device=device)
    _check_device(out)
    if count:
        q, rem, big, small = _native_scales(D, d)
        with _on_device(out.device):
            grid, launch = _readout_launch(count)
            _readout_native_kernel[grid](
                out, out, out, out, start, count, D, d, rem, big, small, *_native_args(seed, D),
                WRITE_OUT=False, WRITE_IDX=True, GATED=False, NARROW=narrow(D), **launch,
            )
    return out


def readout_native(theta_d: torch.Tensor, seed: int, D: int, start: int = 0, count: int | None = None) -> torch.Tensor:
    """Kernel A, native: θ_D[start:start+count] from float32 θ_d (length d), float32."""
    d = theta_d.numel()
    count = D - start if count is None else count
    theta = theta_d.contiguous()
    _check_device(theta)
    out = torch.empty(count, dtype=torch.float32, device=theta.device)
    if count:
        q, rem, big, small = _native_scales(D, d)
        with _on_device(theta.device):
            grid, launch = _readout_launch(count)
            _readout_native_kernel[grid](
                theta, out, out, out, start, count, D, d, rem, big, small, *_native_args(seed, D),
                WRITE_OUT=True, WRITE_IDX=False, GATED=False, NARROW=narrow(D), **launch,
            )
    return out


def readout_peft(
    theta_d: torch.Tensor, table: torch.Tensor, scales: torch.Tensor, start: int = 0, count: int | None = None
) -> torch.Tensor:
    """Kernel A, peft: ``θ_d[table[i]] · scales[table[i]]`` for i in [start, start+count), float32."""
    count = table.numel() - start if count is None else count
    theta, table, scales = theta_d.contiguous(), table.contiguous(), scales.contiguous()
    _check_device(theta, table, scales)
    out = torch.empty(count, dtype=torch.float32, device=theta.device)
    if count:
        with _on_device(theta.device):
            _readout_peft_kernel[(triton.cdiv(count, READOUT_BLOCK),)](
                theta, table, scales, out, out, start, count, GATED=False, BLOCK=READOUT_BLOCK
            )
    return out


def refresh(
    theta_d: torch.Tensor, snapshot: torch.Tensor, dirty: torch.Tensor, out: torch.Tensor, seed: int, D: int,
    table: torch.Tensor | None = None, scales: torch.Tensor | None = None,
) -> None:
    """θ_D kept in ``out`` and read out again only if θ_d changed, in three launches and no host sync:
    compare θ_d with ``snapshot`` bitwise (raising the int32 flag ``dirty``) and copy it there; Kernel A,
    gated on the flag, writing ``out``'s dtype (the float32 product rounded once, the bits of
    ``readout(θ_d).to(out.dtype)``); clear the flag. Native projection, or peft with ``table`` and
    ``scales``. θ_d and ``snapshot``: float32, contiguous, length d; ``out``: contiguous, length D."""
    _check_device(theta_d, snapshot, dirty, out)
    d = theta_d.numel()
    with _on_device(theta_d.device):
        _compare_snapshot_kernel[(triton.cdiv(d, READOUT_BLOCK),)](
            theta_d.view(torch.int32), snapshot.view(torch.int32), dirty, d, BLOCK=READOUT_BLOCK
        )
        if table is None:
            q, rem, big, small = _native_scales(D, d)
            grid, launch = _readout_launch(out.numel())
            _readout_native_kernel[grid](
                theta_d, out, out, dirty, 0, out.numel(), D, d, rem, big, small, *_native_args(seed, D),
                WRITE_OUT=True, WRITE_IDX=False, GATED=True, NARROW=narrow(D), **launch,
            )
        else:
            _readout_peft_kernel[(triton.cdiv(out.numel(), READOUT_BLOCK),)](
                theta_d, table, scales, out, dirty, 0, out.numel(), GATED=True, BLOCK=READOUT_BLOCK
            )
    dirty.zero_()


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def peft_grad_plan(D: int, d: int) -> tuple[int, int, int, int]:
    """(BJ, BM, iters, splits): the tiling of the peft Kernel B, a function of (D, d) only.

    A tile is BJ columns × BM values of m (BJ·BM ≤ 1024 lanes); each program reduces ``iters``
    consecutive tiles of m, and the m range of every column block is split over ``splits`` programs
    so that about ``GRAD_TARGET_PROGRAMS`` programs run."""
    q, rem, _ = balanced_counts(D, d)
    m_max = q + (1 if rem else 0)
    bj = min(_next_pow2(d), 128)
    bm = min(_next_pow2(m_max), max(1, GRAD_TILE // bj))
    bm = max(bm, 16 // bj)
    tiles = -(-m_max // bm)
    col_blocks = -(-d // bj)
    splits = min(tiles, max(1, -(-GRAD_TARGET_PROGRAMS // col_blocks)))
    iters = -(-tiles // splits)
    return bj, bm, iters, -(-tiles // iters)


def native_grad_plan(D: int, d: int) -> tuple[int, int, int, int]:
    """(BJ, SUB, seg, splits): the tiling of the native Kernel B, a function of (D, d) only.

    A program has ``GRAD_LANES`` lanes: BJ columns × SUB segments of ``seg`` consecutive m, one per lane (a lane's
    walks run one after another, so a segment keeps at least ``GRAD_MIN_SEGMENT`` rows where the columns have
    them); the m range of every column block is split over ``splits`` programs, for about
    ``GRAD_TARGET_PROGRAMS`` programs."""
    q, rem, _ = balanced_counts(D, d)
    m_max = q + (1 if rem else 0)
    bj = min(_next_pow2(d), GRAD_LANES)
    sub = GRAD_LANES // bj
    col_blocks = -(-d // bj)
    segments = max(1, min(-(-m_max // GRAD_MIN_SEGMENT), -(-GRAD_TARGET_PROGRAMS // col_blocks) * sub))
    splits = -(-segments // sub)
    seg = -(-m_max // (splits * sub))
    return bj, sub, seg, -(-m_max // (seg * sub))


def _finish_grad(part, out, scales, d, rem, big, small, splits, native_kind):
    """``out`` from the per-split partial sums (added in increasing split order) and the column scales."""
    _grad_finish_kernel[(triton.cdiv(d, READOUT_BLOCK),)](
        part, out, scales, d, rem, big, small, splits, NATIVE_KIND=native_kind, BLOCK=READOUT_BLOCK
    )


def _launch_grad_native(g, out, seed, D, d):
    bj, sub, seg, splits = native_grad_plan(D, d)
    q, rem, big, small = _native_scales(D, d)
    part = out if splits == 1 else torch.empty(splits * d, dtype=torch.float32, device=out.device)
    with _on_device(out.device):
        _grad_native_kernel[(triton.cdiv(d, bj), splits)](
            g, out, part, D, d, q, rem, big, small, *_native_args(seed, D), seg,
            NARROW=narrow(D), FINAL=splits == 1, BJ=bj, SUB=sub, num_warps=GRAD_WARPS,
        )
        if splits > 1:
            _finish_grad(part, out, out, d, rem, big, small, splits, True)
    return out


def _launch_grad_peft(g, out, scales, rows, offsets, D, d):
    bj, bm, iters, splits = peft_grad_plan(D, d)
    part = out if splits == 1 else torch.empty(splits * d, dtype=torch.float32, device=out.device)
    with _on_device(out.device):
        _grad_peft_kernel[(triton.cdiv(d, bj), splits)](
            g, out, part, scales, rows, offsets, d, iters, FINAL=splits == 1, BJ=bj, BM=bm,
        )
        if splits > 1:
            _finish_grad(part, out, scales, d, 0, 0.0, 0.0, splits, False)
    return out


def _check_grad(grad_theta_D: torch.Tensor, D: int) -> torch.Tensor:
    if grad_theta_D.numel() != D:
        raise ValueError(f"the gradient has {grad_theta_D.numel()} entries, the projection D = {D}")
    if grad_theta_D.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        grad_theta_D = grad_theta_D.float()
    return grad_theta_D.contiguous().view(-1)


def grad_native(grad_theta_D: torch.Tensor, seed: int, D: int, d: int) -> torch.Tensor:
    """Kernel B, native: Pᵀ g (length d, float32) for g of length D (float32/bfloat16/float16)."""
    g = _check_grad(grad_theta_D, D)
    _check_device(g)
    out = torch.empty(d, dtype=torch.float32, device=g.device)
    return _launch_grad_native(g, out, seed, D, d)


def grad_peft(
    grad_theta_D: torch.Tensor, scales: torch.Tensor, csr_rows: torch.Tensor, csr_offsets: torch.Tensor
) -> torch.Tensor:
    """Kernel B, peft: Pᵀ g over the CSR inverse (``csr_rows[csr_offsets[j]:csr_offsets[j+1]]`` are the
    rows of column j); float32, length d = ``scales.numel()``."""
    D, d = csr_rows.numel(), scales.numel()
    g = _check_grad(grad_theta_D, D)
    scales, csr_rows, csr_offsets = scales.contiguous(), csr_rows.contiguous(), csr_offsets.contiguous()
    _check_device(g, scales, csr_rows, csr_offsets)
    out = torch.empty(d, dtype=torch.float32, device=g.device)
    return _launch_grad_peft(g, out, scales, csr_rows, csr_offsets, D, d)


MERGE_BLOCK = (32, 128)


def merge_delta(weight: torch.Tensor, out: torch.Tensor, A: torch.Tensor, B: torch.Tensor, sign: float,
                fan_in_fan_out: bool) -> torch.Tensor:
    """Kernel C: ``out = round(weight + sign · B A)``, ΔW formed in float32 tile by tile (an r-term
    float32 sum per entry) and added to the weight read as float32, rounded once to ``out``'s dtype.

    A: r×in, B: out×r, float32, contiguous. ``weight`` is out×in, or in×out for ``fan_in_fan_out``
    (Conv1D); ``out`` has weight's shape and strides and may be ``weight`` itself (in place)."""
    r, n_in = A.shape
    n_out = B.shape[0]
    A, B = A.float().contiguous(), B.float().contiguous()
    _check_device(weight, out, A, B)
    stride_o, stride_i = (weight.stride(1), weight.stride(0)) if fan_in_fan_out else weight.stride()
    if out.stride() != weight.stride():
        raise ValueError("out must have the weight's strides")
    bo, bi = MERGE_BLOCK
    with _on_device(weight.device):
        _merge_kernel[(triton.cdiv(n_out, bo), triton.cdiv(n_in, bi))](
            weight, out, A, B, n_out, n_in, r, stride_o, stride_i, float(sign), BO=bo, BI=bi
        )
    return out


__all__ = [
    "for_device",
    "grad_native",
    "grad_peft",
    "interpreted",
    "interpreter_enabled",
    "merge_delta",
    "native_grad_plan",
    "native_indices",
    "native_permute",
    "peft_grad_plan",
    "readout_native",
    "readout_peft",
    "refresh",
]
