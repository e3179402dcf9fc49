"""The adapted SwiGLU MLP's compute path: ``y = down(silu(gate(x)) · up(x))`` with all three projections adapted, as
one custom op whose pointwise pass carries the LoRA terms (``swiglu_kernels``).

For x ∈ R^{M×K}, frozen bases (W_g, b_g), (W_u, b_u) ∈ R^{F×K}, (W_d, b_d) ∈ R^{N×F}, the pairs (A_g, B_g), (A_u, B_u)
of rank r and (A_d, B_d) of rank r_d read out of θ_d, and ``A_gu = [A_g; A_u]`` (2r×K):

    forward   H = [h_g | h_u] = x A_guᵀ,  G = x W_gᵀ + b_g,  U = x W_uᵀ + b_u            (cuBLAS)
              g = G + h_g B_gᵀ,  u = U + h_u B_uᵀ,  a = silu(g)·u,  h_d = a A_dᵀ        (Kernel F, one pass)
              y = a W_dᵀ + b_d + h_d B_dᵀ                                              (cuBLAS, rank-r term first)
    backward  gB_d = g_y B_d,  D = g_y W_d + gB_d A_d,  g_u = D·silu(g),  g_g = D·u·silu'(g),
              gB = [g_g B_g | g_u B_u]                          (g_y W_d, gB_d by cuBLAS; the rest Kernel G, one pass)
              dx = gB A_gu + g_g W_g + g_u W_u,  dA_gu = gBᵀ x,  dB_g = g_gᵀ h_g,  dB_u = g_uᵀ h_u,
              dA_d = gB_dᵀ a,  dB_d = g_yᵀ h_d                                        (cuBLAS)

Compared with the layers one by one (``lora_linear``), the M×F terms ``h_g B_gᵀ``, ``h_u B_uᵀ`` and ``gB_d A_d`` are
never written and read back, and neither a (for h_d) nor g_g, g_u (for gB) is read a second time. g and u are float32
in the kernels, not rounded to the activation dtype as the unfused layers' outputs are; h, h_d, gB_d, gB, a, g_g and
g_u are rounded as the unfused ops store them.

``lora_swiglu_mlp`` runs it as the op ``unilora_hf::lora_swiglu_mlp``. Where the backward does not record (every
compiled training step) it is the one op ``unilora_hf::lora_swiglu_mlp_grads``, whose weight gradients run on a second
stream inside a CUDA graph as ``lora_linear.frozen_linear_lora_grads``'s do; a recording backward (a double backward)
or a gradient reaching an output other than y differentiates ``reference_mlp`` instead, so it is exact at any order.
Without the triton backend for the device both passes are ``swiglu_forward_reference`` / ``swiglu_backward_reference``,
the same maths in PyTorch ops (float32 for g and u).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import dispatch, lora_linear
from .lora_linear import _base_plus_lora, _flat, _kernel_module, _set_dx


_FUSED_DTYPES = (torch.bfloat16, torch.float16)  # swiglu_kernels.DTYPES and R_MAX (that module needs triton)
_FUSED_MAX_RANK = 64


def swiglu_forward_reference(gate, up, h, Bg, Bu, Ad):
    """Kernel F in PyTorch ops: ``(a, h_d)`` (``swiglu_kernels.forward``)."""
    r = Bg.shape[1]
    g = torch.addmm(gate.float(), h[:, :r].float(), Bg.float().t())
    u = torch.addmm(up.float(), h[:, r:].float(), Bu.float().t())
    a = (F.silu(g) * u).to(gate.dtype)
    return a, a @ Ad.t()


def swiglu_backward_reference(da_base, gBd, Ad, gate, up, h, Bg, Bu):
    """Kernel G in PyTorch ops: ``(g_g, g_u, gB)`` (``swiglu_kernels.backward``)."""
    r = Bg.shape[1]
    d = torch.addmm(da_base.float(), gBd.float(), Ad.float())
    g = torch.addmm(gate.float(), h[:, :r].float(), Bg.float().t())
    u = torch.addmm(up.float(), h[:, r:].float(), Bu.float().t())
    s = torch.sigmoid(g)
    gg = (d * u * s * (1 + g * (1 - s))).to(gate.dtype)
    gu = (d * g * s).to(gate.dtype)
    return gg, gu, torch.cat([gg @ Bg, gu @ Bu], dim=1)


def _kernels(t: torch.Tensor):
    """Kernels F and G for ``t``'s device and dtype, or None (the reference then runs)."""
    return _kernel_module("swiglu_kernels", t.device) if t.dtype in _FUSED_DTYPES else None


def fused_applies(device: torch.device, dtype: torch.dtype, r: int, rd: int) -> bool:
    """Whether Kernels F and G take tensors on ``device`` of ``dtype`` at ranks r (gate, up) and r_d (down): the
    triton backend for the device, a half-precision dtype, ranks up to ``swiglu_kernels.R_MAX`` (64)."""
    return (dtype in _FUSED_DTYPES and 1 <= r <= _FUSED_MAX_RANK and 1 <= rd <= _FUSED_MAX_RANK
            and dispatch.resolve_backend(device) == "triton")


def _swiglu_forward(gate, up, h, Bg, Bu, Ad):
    kernels = _kernels(gate)
    if kernels is None:
        return swiglu_forward_reference(gate, up, h, Bg, Bu, Ad)
    return kernels.forward(gate, up, h, Bg.contiguous(), Bu.contiguous(), Ad.contiguous())


def _swiglu_backward(da_base, gBd, Ad, gate, up, h, Bg, Bu):
    kernels = _kernels(gate)
    if kernels is None:
        return swiglu_backward_reference(da_base, gBd, Ad, gate, up, h, Bg, Bu)
    return kernels.backward(da_base, gBd, Ad.contiguous(), gate, up, h, Bg.contiguous(), Bu.contiguous())


def reference_mlp(x2, weights, biases, A_gu, Bg, Bu, Ad, Bd):
    """The op's outputs ``[y, G, U, H, a, h_d]`` in differentiable PyTorch ops (the oracle of its gradients at any
    order)."""
    (wg, wu, wd), (bg, bu, bd) = weights, biases
    h = x2 @ A_gu.t()
    gate, up = F.linear(x2, wg, bg), F.linear(x2, wu, bu)
    a, hd = swiglu_forward_reference(gate, up, h, Bg, Bu, Ad)
    y = F.linear(a, wd, bd) + hd @ Bd.t()
    return [y, gate, up, h, a, hd]


@torch.library.custom_op("unilora_hf::lora_swiglu_mlp", mutates_args=())
def _mlp_op(x2: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor | None], A_gu: torch.Tensor,
            Bg: torch.Tensor, Bu: torch.Tensor, Ad: torch.Tensor, Bd: torch.Tensor) -> list[torch.Tensor]:
    """``[y, G, U, H, a, h_d]`` (module docstring); weights = [W_g, W_u, W_d], biases likewise (or None). Every output
    but y is kept for the backward."""
    wg, wu, wd = weights
    bg, bu, bd = biases
    h = x2 @ A_gu.t()
    gate, up = F.linear(x2, wg, bg), F.linear(x2, wu, bu)
    a, hd = _swiglu_forward(gate, up, h, Bg, Bu, Ad)
    return [_base_plus_lora(a, wd, bd, hd, Bd), gate, up, h, a, hd]


@_mlp_op.register_fake
def _(x2, weights, biases, A_gu, Bg, Bu, Ad, Bd):
    M, F_ = x2.shape[0], weights[0].shape[0]
    return [x2.new_empty((M, weights[2].shape[0])), x2.new_empty((M, F_)), x2.new_empty((M, F_)),
            x2.new_empty((M, A_gu.shape[0])), x2.new_empty((M, F_)), x2.new_empty((M, Ad.shape[0]))]


@torch.library.custom_op("unilora_hf::lora_swiglu_mlp_grads", mutates_args=())
def _grads_op(gy: torch.Tensor, x2: torch.Tensor, weights: list[torch.Tensor], A_gu: torch.Tensor, Bg: torch.Tensor,
              Bu: torch.Tensor, Ad: torch.Tensor, Bd: torch.Tensor, saved: list[torch.Tensor]) -> list[torch.Tensor]:
    """``[dx, dA_gu, dB_g, dB_u, dA_d, dB_d]`` (module docstring) from y's gradient and ``saved = [G, U, H, a, h_d]``.
    Captured into a CUDA graph, the weight gradients (which nothing in dx waits for) run on a second stream beside
    the base GEMMs, as in ``lora_linear.frozen_linear_lora_grads``; the op waits for that stream before it returns."""
    wg, wu, wd = weights
    gate, up, h, a, hd = saved
    r = Bg.shape[1]
    dA_gu, dBg, dBu = x2.new_empty(A_gu.shape), gy.new_empty(Bg.shape), gy.new_empty(Bu.shape)
    dAd, dBd = gy.new_empty(Ad.shape), gy.new_empty(Bd.shape)
    stream = lora_linear.WeightGradStream(gy.device)
    with stream.run():
        torch.mm(gy.t(), hd, out=dBd)
    gBd = gy @ Bd
    with stream.run():
        torch.mm(gBd.t(), a, out=dAd)
    gg, gu, gB = _swiglu_backward(gy @ wd, gBd, Ad, gate, up, h, Bg, Bu)
    with stream.run():
        torch.mm(gg.t(), h[:, :r], out=dBg)
        torch.mm(gu.t(), h[:, r:], out=dBu)
        torch.mm(gB.t(), x2, out=dA_gu)
    dx = _set_dx([gg, gu], [wg, wu], gB, A_gu)
    stream.join()
    return [dx, dA_gu, dBg, dBu, dAd, dBd]


@_grads_op.register_fake
def _(gy, x2, weights, A_gu, Bg, Bu, Ad, Bd, saved):
    return [x2.new_empty(x2.shape), x2.new_empty(A_gu.shape), gy.new_empty(Bg.shape), gy.new_empty(Bu.shape),
            gy.new_empty(Ad.shape), gy.new_empty(Bd.shape)]


def _mlp_setup(ctx, inputs, output):
    x2, weights, biases, A_gu, Bg, Bu, Ad, Bd = inputs
    ctx.set_materialize_grads(False)  # only y's gradient comes, unless a caller uses the kept outputs
    ctx.biases = [None] * 3 if any(b is not None for b in biases) else None  # the input's structure
    ctx.save_for_backward(x2, A_gu, Bg, Bu, Ad, Bd, *weights, *biases, *output[1:])


def _mlp_backward(ctx, grads):
    x2, A_gu, Bg, Bu, Ad, Bd, wg, wu, wd, bg, bu, bd, *saved = ctx.saved_tensors
    need_x, _, _, *need = ctx.needs_input_grad
    gy = grads[0]
    if gy is None:
        gy = x2.new_zeros((x2.shape[0], wd.shape[0]))
    if not torch.is_grad_enabled() and all(g is None for g in grads[1:]):
        dx, *rest = torch.ops.unilora_hf.lora_swiglu_mlp_grads(gy, x2, [wg, wu, wd], A_gu, Bg, Bu, Ad, Bd, saved)
        return (dx if need_x else None), [None] * 3, ctx.biases, *[d if n else None for d, n in zip(rest, need)]
    # A recording backward, or a gradient reaching a kept output: differentiate the reference.
    biases = [bg, bu, bd]
    create = torch.is_grad_enabled()
    wanted = [need_x, *need]
    with torch.enable_grad():
        ins = [t if create and t.requires_grad else t.detach().requires_grad_(w)
               for t, w in zip((x2, A_gu, Bg, Bu, Ad, Bd), wanted)]
        outs = reference_mlp(ins[0], [wg, wu, wd], biases, *ins[1:])
        pairs = [(o, g) for o, g in zip(outs, (gy, *grads[1:])) if g is not None]
        targets = [t for t, w in zip(ins, wanted) if w]
        found = iter(torch.autograd.grad([o for o, _ in pairs], targets, [g for _, g in pairs], create_graph=create,
                                         allow_unused=True))
    result = [next(found) if w else None for w in wanted]
    result = [torch.zeros_like(t) if w and g is None else g for t, w, g in zip(ins, wanted, result)]
    return result[0], [None] * 3, ctx.biases, *result[1:]


_mlp_op.register_autograd(_mlp_backward, setup_context=_mlp_setup)


def lora_swiglu_mlp(x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor | None],
                    As: list[torch.Tensor], Bs: list[torch.Tensor]) -> torch.Tensor:
    """``down(silu(gate(x)) · up(x))`` with the three projections adapted, as the op ``unilora_hf::lora_swiglu_mlp``;
    weights, biases, As, Bs in the order gate, up, down. Differentiable in x and every A and B."""
    y = torch.ops.unilora_hf.lora_swiglu_mlp(_flat(x), weights, biases, torch.cat(As[:2]), Bs[0], Bs[1], As[2],
                                              Bs[2])[0]
    return y.view(*x.shape[:-1], y.shape[-1])
