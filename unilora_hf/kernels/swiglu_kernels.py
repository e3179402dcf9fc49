"""Triton kernels of the adapted SwiGLU MLP: the gate/up LoRA terms and down's rank-r input inside the pointwise pass.

For an MLP ``y = down(silu(gate(x)) · up(x))`` whose three projections are adapted (rank r for gate and up, r_d for
down), with the frozen base outputs ``G = x W_gᵀ (+ b_g)`` and ``U = x W_uᵀ (+ b_u)`` (M×F) and the rank-r inputs
``H = [h_g | h_u] = round(x [A_g; A_u]ᵀ)`` (M×2r) already formed by cuBLAS:

Kernel F, forward:  per row, ``g = G + h_g B_gᵀ``, ``u = U + h_u B_uᵀ`` (float32, not stored), ``a = round(silu(g)·u)``
    (M×F, stored) and ``h_d = round(a A_dᵀ)`` (M×r_d, stored: down's rank-r input). The unfused layers would write
    ``h_g B_gᵀ`` and ``h_u B_uᵀ`` as M×F terms, read them again in the base GEMMs' epilogues, and read a again for
    ``h_d``; here those bytes are not moved.
Kernel G, backward:  with ``D = dA_base + gB_d A_d`` (float32; ``dA_base = g_y W_d``, ``gB_d = round(g_y B_d)``, both
    given), and g, u recomputed as in Kernel F: ``g_u = round(D · silu(g))``, ``g_g = round(D · u · σ(g)(1 + g(1 −
    σ(g))))`` (M×F, stored: the gradients of gate's and up's outputs) and ``gB = [round(g_g B_g) | round(g_u B_u)]``
    (M×2r, stored). The unfused layers would write ``gB_d A_d`` as an M×F term and read it in an epilogue, and read
    g_g and g_u again for gB.

Each program owns BM rows and loops over F in BF-column chunks, so the rank-r products over F accumulate in registers
(float32) and are stored once. The loop is software-pipelined (``tl.range`` with num_stages): the M×F tiles of the
next chunks are in flight while a chunk is computed. A plain ``range`` left those loads unpipelined, each waited for,
and the kernels ran at about half of the pointwise kernels' bandwidth (benchmarks/RESULTS.md, session 16). Every
product accumulates in float32; float32 inputs are not taken (the caller keeps those on the unfused path). The
pure-PyTorch reference of both kernels is ``lora_mlp.swiglu_forward_reference`` / ``swiglu_backward_reference``;
``lora_mlp`` dispatches here on CUDA tensors (and on CPU tensors under ``TRITON_INTERPRET=1``, the CI path).
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


@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr):
    """acc + a·b with float32 accumulation; UPCAST multiplies in float32 (exact for bfloat16/float16 values): the
    interpreter's half-precision ``tl.dot`` is wrong in triton 3.9."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _prod(a, b, UPCAST: tl.constexpr):
    """a·b in float32, as a fresh accumulator: added to a loaded tile after the product (a tile loaded into the
    product's accumulator would be converted to its register layout first, which measured slower)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _sigmoid(v):
    return 1.0 / (1.0 + tl.exp(-v))


@triton.jit
def _ld(ptrs, mask, EVEN: tl.constexpr):
    """A tile load, masked unless EVEN (every tile whole: the kernel's shapes are multiples of its tiles)."""
    if EVEN:
        return tl.load(ptrs)
    return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def _st(ptrs, values, mask, EVEN: tl.constexpr):
    if EVEN:
        tl.store(ptrs, values)
    else:
        tl.store(ptrs, values, mask=mask)


@triton.jit
def _program(M, BM: tl.constexpr):
    """(row tile, column group) of this program: row tiles vary fastest, so programs launched together read the
    same columns of B and A."""
    n_m = (M + BM - 1) // BM
    pid = tl.program_id(0)
    return pid % n_m, pid // n_m


@triton.jit
def _rows(h_ptr, s_hm, M, r, BM: tl.constexpr, R: tl.constexpr, EVEN: tl.constexpr):
    """This program's column group, its BM rows (int64 offsets, liveness), the rank columns and the rows' h_g, h_u."""
    pid_m, group = _program(M, BM)
    rm = pid_m * BM + tl.arange(0, BM)
    rr = tl.arange(0, R)
    live_m = rm < M
    live_r = rr < r
    rows = rm.to(tl.int64)[:, None]
    mask = live_m[:, None] & live_r[None, :]
    hg = _ld(h_ptr + rows * s_hm + rr[None, :], mask, EVEN)
    hu = _ld(h_ptr + rows * s_hm + r + rr[None, :], mask, EVEN)
    return group, rows, live_m, rr, live_r, hg, hu


@triton.jit
def _forward_kernel(
    gate_ptr, up_ptr, h_ptr, bg_ptr, bu_ptr, ad_ptr, a_ptr, hd_ptr,
    M, F, r, rd, span,
    s_gm, s_um, s_hm, s_bgf, s_buf, s_adr, s_am, s_hdg, s_hdm,
    UPCAST: tl.constexpr, R: tl.constexpr, RD: tl.constexpr, BM: tl.constexpr, BF: tl.constexpr,
    EVEN: tl.constexpr, STAGES: tl.constexpr,
):
    group, rows, live_m, rr, live_r, hg, hu = _rows(h_ptr, s_hm, M, r, BM, R, EVEN)
    rd_ = tl.arange(0, RD)
    live_rd = rd_ < rd
    hd = tl.full((BM, RD), 0.0, tl.float32)
    for f0 in tl.range(group * span, tl.minimum(F, group * span + span), BF, num_stages=STAGES):
        rf = f0 + tl.arange(0, BF)
        live_f = rf < F
        tile = live_m[:, None] & live_f[None, :]
        bg = _ld(bg_ptr + rf[None, :] * s_bgf + rr[:, None], live_r[:, None] & live_f[None, :], EVEN)
        bu = _ld(bu_ptr + rf[None, :] * s_buf + rr[:, None], live_r[:, None] & live_f[None, :], EVEN)
        g = _ld(gate_ptr + rows * s_gm + rf[None, :], tile, EVEN).to(tl.float32) + _prod(hg, bg, UPCAST)
        u = _ld(up_ptr + rows * s_um + rf[None, :], tile, EVEN).to(tl.float32) + _prod(hu, bu, UPCAST)
        a = (g * _sigmoid(g) * u).to(a_ptr.dtype.element_ty)
        _st(a_ptr + rows * s_am + rf[None, :], a, tile, EVEN)
        adt = _ld(ad_ptr + rd_[None, :] * s_adr + rf[:, None], live_f[:, None] & live_rd[None, :], EVEN)
        hd = _dot(a, adt, hd, UPCAST)
    hd_ptrs = hd_ptr + group * s_hdg + rows * s_hdm + rd_[None, :]
    _st(hd_ptrs, hd.to(hd_ptr.dtype.element_ty), live_m[:, None] & live_rd[None, :], EVEN)


@triton.jit
def _backward_kernel(
    dab_ptr, gbd_ptr, ad_ptr, gate_ptr, up_ptr, h_ptr, bg_ptr, bu_ptr, gg_ptr, gu_ptr, gb_ptr,
    M, F, r, rd, span,
    s_dm, s_gbdm, s_adr, s_gm, s_um, s_hm, s_bgf, s_buf, s_ggm, s_gum, s_gbg, s_gbm,
    UPCAST: tl.constexpr, R: tl.constexpr, RD: tl.constexpr, BM: tl.constexpr, BF: tl.constexpr,
    EVEN: tl.constexpr, STAGES: tl.constexpr,
):
    group, rows, live_m, rr, live_r, hg, hu = _rows(h_ptr, s_hm, M, r, BM, R, EVEN)
    rd_ = tl.arange(0, RD)
    live_rd = rd_ < rd
    gbd = _ld(gbd_ptr + rows * s_gbdm + rd_[None, :], live_m[:, None] & live_rd[None, :], EVEN)
    acc_g = tl.full((BM, R), 0.0, tl.float32)
    acc_u = tl.full((BM, R), 0.0, tl.float32)
    for f0 in tl.range(group * span, tl.minimum(F, group * span + span), BF, num_stages=STAGES):
        rf = f0 + tl.arange(0, BF)
        live_f = rf < F
        tile = live_m[:, None] & live_f[None, :]
        ad = _ld(ad_ptr + rd_[:, None] * s_adr + rf[None, :], live_rd[:, None] & live_f[None, :], EVEN)
        d = _ld(dab_ptr + rows * s_dm + rf[None, :], tile, EVEN).to(tl.float32) + _prod(gbd, ad, UPCAST)
        bg = _ld(bg_ptr + rf[None, :] * s_bgf + rr[:, None], live_r[:, None] & live_f[None, :], EVEN)
        bu = _ld(bu_ptr + rf[None, :] * s_buf + rr[:, None], live_r[:, None] & live_f[None, :], EVEN)
        g = _ld(gate_ptr + rows * s_gm + rf[None, :], tile, EVEN).to(tl.float32) + _prod(hg, bg, UPCAST)
        u = _ld(up_ptr + rows * s_um + rf[None, :], tile, EVEN).to(tl.float32) + _prod(hu, bu, UPCAST)
        s = _sigmoid(g)
        gu = (d * g * s).to(gu_ptr.dtype.element_ty)
        gg = (d * u * s * (1.0 + g * (1.0 - s))).to(gg_ptr.dtype.element_ty)
        _st(gu_ptr + rows * s_gum + rf[None, :], gu, tile, EVEN)
        _st(gg_ptr + rows * s_ggm + rf[None, :], gg, tile, EVEN)
        acc_g = _dot(gg, tl.trans(bg), acc_g, UPCAST)
        acc_u = _dot(gu, tl.trans(bu), acc_u, UPCAST)
    out = live_m[:, None] & live_r[None, :]
    gb_rows = gb_ptr + group * s_gbg + rows * s_gbm
    _st(gb_rows + rr[None, :], acc_g.to(gb_ptr.dtype.element_ty), out, EVEN)
    _st(gb_rows + r + rr[None, :], acc_u.to(gb_ptr.dtype.element_ty), out, EVEN)


# -- launch wrappers ------------------------------------------------------------------------------


def interpreted() -> bool:
    """True when the kernels of this module instance run in Triton's interpreter."""
    return type(_forward_kernel).__name__ == "InterpretedFunction"


def for_device(device: torch.device | str):
    """The kernel module for tensors on ``device`` (compiled for CUDA, interpreted for CPU under
    ``TRITON_INTERPRET=1``)."""
    return triton_modes.for_device(sys.modules[__name__], interpreted(), device)


_FORWARD = triton_modes.FastLauncher(_forward_kernel)
_BACKWARD = triton_modes.FastLauncher(_backward_kernel)

R_MAX = 64
DTYPES = (torch.bfloat16, torch.float16)
# (BM, BF, T, num_warps, num_stages): a program owns BM rows and T chunks of BF columns, so the grid has
# ⌈M/BM⌉ · ⌈F/(T·BF)⌉ programs; with more than one column group the rank-r sums over F are float32 partials per group,
# added in group order by one reduction (deterministic). num_stages is the depth of the loop's software pipeline.
# The best of 27 (F) and 32 (G) settings in two sweeps at the 1.1B training shape (M = 4,096, F = 5,632, r = 16) on
# an H200: Kernel F 45 µs, Kernel G 73 µs (benchmarks/RESULTS.md, session 16).
FORWARD_TILE = (64, 128, 11, 4, 3)
BACKWARD_TILE = (64, 64, 44, 4, 4)
_INTERPRETED = (16, 32, 2, 1, 1)


def _padded(r: int) -> int:
    if not 1 <= r <= R_MAX:
        raise ValueError(f"the fused SwiGLU kernels support ranks 1..{R_MAX}, not r = {r}")
    return max(16, 1 << (r - 1).bit_length())


def _check(*tensors: torch.Tensor) -> None:
    dtype, device = tensors[0].dtype, tensors[0].device
    if dtype not in DTYPES or any(t.dtype != dtype for t in tensors):
        raise TypeError(f"the fused SwiGLU kernels need operands of one of {DTYPES}, got "
                        f"{sorted({str(t.dtype) for t in tensors})}")
    if (device.type == "cuda") == interpreted() or any(t.device != device for t in tensors):
        raise RuntimeError(f"this kernel module cannot take {device} tensors; use swiglu_kernels.for_device")
    for t in tensors:
        if t.stride(-1) != 1:
            raise ValueError("the fused SwiGLU kernels need operands with unit stride along their last dimension")


def _plan(M: int, F: int, tile):
    """(tile, column span per program, column groups, programs)."""
    tile = _INTERPRETED if interpreted() else tile
    bm, bf, t = tile[:3]
    span = bf * t
    groups = triton.cdiv(F, span)
    return tile, span, groups, triton.cdiv(M, bm) * groups


def _even(M: int, F: int, r: int, rd: int, tile) -> bool:
    """Whether every tile is whole (no masks): rows a multiple of BM, F of BF, ranks at their padded widths."""
    return M % tile[0] == 0 and F % tile[1] == 0 and r == _padded(r) and rd == _padded(rd)


def _sums(like: torch.Tensor, groups: int, M: int, width: int) -> tuple[torch.Tensor, int]:
    """The buffer of the rank-r sums over F and its group stride: the output itself (one group), else float32 partials
    (groups × M × width)."""
    if groups == 1:
        return like.new_empty((M, width)), 0
    return like.new_empty((groups, M, width), dtype=torch.float32), M * width


_PLANS: dict = {}


def _fits(tensors) -> bool:
    """Whether a remembered launch can take these tensors: contiguous, 16-byte aligned, all on the current CUDA device.
    With contiguous operands, shapes, dtypes and tile (the key) fix every integer argument and Triton's
    specialisation."""
    device = torch.cuda.current_device() if tensors[0].is_cuda else None
    ptrs = 0
    for t in tensors:
        if t.get_device() != device or not t.is_contiguous():
            return False
        ptrs |= t.data_ptr()
    return ptrs % 16 == 0


def _direct(launcher, key, inputs) -> tuple | None:
    """``(compiled kernel, plan)``: the remembered launch of ``key`` when it `_fits` these inputs (outputs are fresh
    allocations, which always do) and no launch hook (a profiler) is installed, else None: the checks and the plan
    of the first call are not redone."""
    plan = _PLANS.get(key)
    compiled = None if plan is None else launcher.cached(key)
    return None if compiled is None or not _fits(inputs) else (compiled, plan)


def _launch(launcher, key, inputs, outputs, grid0, args, tile, plan) -> None:
    """The first launch for ``key``; remembered (``_PLANS``, the compiled kernel in ``launcher``) when it can be
    repeated directly."""
    direct = _fits((*inputs, *outputs))
    launcher.launch(key if direct else None, (grid0,), inputs[0].device, *args, num_warps=tile[3],
                    num_stages=tile[4])
    if direct and key in launcher.compiled:
        _PLANS[key] = plan


def _key(kind: str, inputs, tile) -> tuple:
    return (kind, *(t.shape for t in inputs), *(t.dtype for t in inputs), tile)


def _rank_sums(out: torch.Tensor, groups: int, dtype: torch.dtype) -> torch.Tensor:
    return out if groups == 1 else out.sum(0).to(dtype)


def forward(gate: torch.Tensor, up: torch.Tensor, h: torch.Tensor, Bg: torch.Tensor, Bu: torch.Tensor,
            Ad: torch.Tensor, tile: tuple[int, ...] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel F: ``(a, h_d)``, a = round(silu(G + h_g B_gᵀ)·(U + h_u B_uᵀ)) (M×F), h_d = round(a A_dᵀ) (M×r_d).
    gate, up: M×F; h: M×2r (``[h_g | h_u]``); B_g, B_u: F×r; A_d: r_d×F; last dimensions contiguous."""
    inputs = (gate, up, h, Bg, Bu, Ad)
    key = _key("F", inputs, tile or FORWARD_TILE)
    direct = _direct(_FORWARD, key, inputs)
    if direct is not None:
        compiled, (M, F, rd, groups, grid0, tail) = direct
        a, hd = gate.new_empty((M, F)), _sums(gate, groups, M, rd)[0]
        _FORWARD.run(compiled, grid0, gate.get_device(), *inputs, a, hd, *tail)
        return a, _rank_sums(hd, groups, gate.dtype)
    _check(*inputs)
    M, F = gate.shape
    r, rd = Bg.shape[1], Ad.shape[0]
    if up.shape != gate.shape or h.shape != (M, 2 * r) or Bu.shape != Bg.shape or Bg.shape[0] != F or Ad.shape[1] != F:
        raise ValueError(f"inconsistent shapes: gate {tuple(gate.shape)}, up {tuple(up.shape)}, h {tuple(h.shape)}, "
                         f"B_g {tuple(Bg.shape)}, B_u {tuple(Bu.shape)}, A_d {tuple(Ad.shape)}")
    tile, span, groups, programs = _plan(M, F, tile or FORWARD_TILE)
    a = gate.new_empty((M, F))
    hd, s_hdg = _sums(gate, groups, M, rd)
    tail = (M, F, r, rd, span, gate.stride(0), up.stride(0), h.stride(0), Bg.stride(0), Bu.stride(0), Ad.stride(0),
            a.stride(0), s_hdg, rd, interpreted(), _padded(r), _padded(rd), tile[0], tile[1], _even(M, F, r, rd, tile),
            tile[4])
    _launch(_FORWARD, key, inputs, (a, hd), programs, (*inputs, a, hd, *tail), tile,
            (M, F, rd, groups, programs, tail))
    return a, _rank_sums(hd, groups, gate.dtype)


def backward(da_base: torch.Tensor, gBd: torch.Tensor, Ad: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
             h: torch.Tensor, Bg: torch.Tensor, Bu: torch.Tensor,
             tile: tuple[int, ...] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Kernel G: ``(g_g, g_u, gB)``, the gradients of gate's and up's adapted outputs (M×F) and
    ``gB = [round(g_g B_g) | round(g_u B_u)]`` (M×2r), for ``dA_base = g_y W_d`` (M×F) and ``gB_d = round(g_y B_d)``
    (M×r_d); the other operands as ``forward``'s."""
    inputs = (da_base, gBd, Ad, gate, up, h, Bg, Bu)
    key = _key("G", inputs, tile or BACKWARD_TILE)
    direct = _direct(_BACKWARD, key, inputs)
    if direct is not None:
        compiled, (M, F, r, groups, grid0, tail) = direct
        gg, gu, gb = gate.new_empty((M, F)), gate.new_empty((M, F)), _sums(gate, groups, M, 2 * r)[0]
        _BACKWARD.run(compiled, grid0, gate.get_device(), *inputs, gg, gu, gb, *tail)
        return gg, gu, _rank_sums(gb, groups, gate.dtype)
    _check(*inputs)
    M, F = gate.shape
    r, rd = Bg.shape[1], Ad.shape[0]
    if (da_base.shape != gate.shape or up.shape != gate.shape or gBd.shape != (M, rd) or h.shape != (M, 2 * r)
            or Bu.shape != Bg.shape or Bg.shape[0] != F or Ad.shape[1] != F):
        raise ValueError(f"inconsistent shapes: dA_base {tuple(da_base.shape)}, gB_d {tuple(gBd.shape)}, "
                         f"gate {tuple(gate.shape)}, h {tuple(h.shape)}, B_g {tuple(Bg.shape)}, A_d {tuple(Ad.shape)}")
    tile, span, groups, programs = _plan(M, F, tile or BACKWARD_TILE)
    gg = gate.new_empty((M, F))
    gu = gate.new_empty((M, F))
    gb, s_gbg = _sums(gate, groups, M, 2 * r)
    tail = (M, F, r, rd, span, da_base.stride(0), gBd.stride(0), Ad.stride(0), gate.stride(0), up.stride(0),
            h.stride(0), Bg.stride(0), Bu.stride(0), gg.stride(0), gu.stride(0), s_gbg, 2 * r,
            interpreted(), _padded(r), _padded(rd), tile[0], tile[1], _even(M, F, r, rd, tile), tile[4])
    _launch(_BACKWARD, key, inputs, (gg, gu, gb), programs, (*inputs, gg, gu, gb, *tail), tile,
            (M, F, r, groups, programs, tail))
    return gg, gu, _rank_sums(gb, groups, gate.dtype)


__all__ = ["BACKWARD_TILE", "DTYPES", "FORWARD_TILE", "R_MAX", "backward", "for_device", "forward", "interpreted"]
