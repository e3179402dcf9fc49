"""The adapted linear layer's compute path, with the LoRA product fused into the base GEMMs.

For x ∈ R^{T×in} (leading dims flattened), a frozen base (W, b), and the layer's A ∈ R^{r×in},
B ∈ R^{out×r} already read out of θ_d (in the compute dtype):

    forward   h = x Aᵀ,  y = x Wᵀ + b + h Bᵀ
    backward  gB = g B,  dx = g W + gB A,  dB = gᵀ h,  dA = gBᵀ x   (W and b frozen: no weight gradient)

``frozen_linear_lora`` is the path for an ``nn.Linear`` base whose weight and bias are frozen. On CUDA
tensors with the ``triton`` backend (``dispatch.resolve_backend``) it is one ``autograd.Function``
whose forward is one launch of Kernel D (``linear_kernels``: base GEMM, LoRA product and bias in one
kernel, which also keeps h) and whose backward is ``gB = g B``, ``dx = g W + gB A`` (one GEMM
accumulating into another) and the two small GEMMs for dA and dB, on cuBLAS. Kernel E (dx and gB in
one launch) is the alternative backward (``_KERNEL_E``); it measured slower than these GEMMs in a
training step on an H100, so it is off.

On the ``reference`` backend the layer is the same maths in PyTorch ops with autograd's own backward, summed
as PEFT sums it (``_peft_order``: ``y = F.linear(x, W, b)``, then ``y += h Bᵀ`` in place), so that its outputs
equal PEFT's bit for bit. Under ``torch.compile``, where autograd records or more than ``COMPILED_FUSED_ROWS``
rows come (for those shapes cuBLAS's GEMMs plus the two small LoRA GEMMs measured faster than Kernel D), the
layer is the custom op ``unilora_hf::frozen_linear_lora``, its backward's dx the op
``unilora_hf::frozen_linear_lora_dx``, dA and dB traced GEMMs. Traced as plain ops instead, each in-place
``addmm_`` would become an out-of-place ``addmm`` that first copies its M×N input into a new buffer: one more
read and write of every projection's output per step. Both ops (and Kernel D's cuBLAS backward) put the rank-r
product first and let the base GEMM add it in its epilogue (``_base_plus_lora``, ``_dx``). Compiled inference
on at most ``COMPILED_FUSED_ROWS`` rows (decoding) calls Kernel D through the custom op
``unilora_hf::frozen_linear_lora_inference`` (a fake implementation gives its shape): one kernel per layer
instead of three, the same bits as the eager layer, and a CUDA graph captures it. ``frozen_linear_lora_group``
runs layers that read the same x (``siblings``: q/k/v, gate/up) as one Kernel D launch, eager or through the op
``unilora_hf::frozen_linear_lora_inference_group``, each output with its own launch's bits. For training steps and
many rows, ``frozen_linear_lora_siblings`` runs such a set as the op ``unilora_hf::frozen_linear_lora_siblings``:
``h = x [A_1; …; A_G]ᵀ`` in one GEMM (x read once for the set), each ``y_i`` by ``_base_plus_lora``; its backward's
op ``frozen_linear_lora_siblings_dx`` forms ``dx = [g_1 B_1 | … | g_G B_G] [A_1; …; A_G] + Σ g_i W_i`` in one
buffer (each base GEMM adding in place), and dA for the set is one GEMM reading x once. Where the backward does not
record (every compiled training step; not a double backward), a layer's or a set's whole backward is the one op
``unilora_hf::frozen_linear_lora_grads``, which in a CUDA graph runs dA and dB on a second stream beside the dx GEMMs.
Every product accumulates in float32; h and gB are rounded to the activation dtype, as the unfused ops store them.

``add_lora(result, x, A, B)`` is the general path (any base layer, dropout on the LoRA input):
``result + (x Aᵀ) Bᵀ`` as one GEMM into a new tensor. ``reference.lora_forward`` is the oracle of both.
"""

from __future__ import annotations

import contextlib
import importlib
import os

import torch
import torch.nn.functional as F

from . import dispatch


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def _no_autocast(x: torch.Tensor):
    """The dtypes here are chosen by the caller: autocast must not recast them."""
    return torch.autocast(x.device.type, enabled=False)


_FUSED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_FUSED_MAX_RANK = 128  # linear_kernels.R_MAX (that module needs triton)
_kernel_modules: dict = {}
# Kernel E for the backward's dx: off, as it measured slower than the cuBLAS GEMMs in a training step on
# an H100 (benchmarks/step_profile.py, RESULTS.md); the tests run both.
_KERNEL_E = False


def _kernel_module(name: str, device: torch.device):
    """The Triton kernel module ``name`` of this package for tensors on ``device`` when the ``triton`` backend
    applies to them (CUDA, or CPU under ``TRITON_INTERPRET=1`` with the backend forced), else None. Cached per
    device, forced backend and environment value: this runs once per layer call."""
    key = (name, device, dispatch._forced, os.environ.get(dispatch.ENV_VAR))
    module = _kernel_modules.get(key, False)
    if module is False:
        module = None
        if dispatch.resolve_backend(device) == "triton":
            module = importlib.import_module(f"{__package__}.{name}").for_device(device)
        _kernel_modules[key] = module
    return module


def fused_kernels(device: torch.device):
    """The module of Kernels D/E for tensors on ``device`` (``linear_kernels``), or None (``_kernel_module``)."""
    return _kernel_module("linear_kernels", device)


def _base_plus_lora(x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, h: torch.Tensor,
                    B: torch.Tensor) -> torch.Tensor:
    """``x Wᵀ + b + h Bᵀ`` (M×N) on cuBLAS: the rank-r product first (the bias as its C), then the base GEMM adds
    it in its epilogue (beta = 1). The M×N term is written by a cheap GEMM and read by one bound by its
    arithmetic, where adding it after the base GEMM would read and write y again in a memory-bound one."""
    low = h @ B.t() if bias is None else torch.addmm(bias, h, B.t())
    return low.addmm_(x2, weight.t())


def _peft_order(x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, h: torch.Tensor,
                B: torch.Tensor) -> torch.Tensor:
    """``x Wᵀ + b + h Bᵀ`` summed as PEFT sums it (the base output, then the LoRA term added to it): the eager
    reference path, whose outputs equal PEFT's bit for bit on the same adapter (tests/test_conformance.py)."""
    return F.linear(x2, weight, bias).addmm_(h, B.t())


def _dx(g: torch.Tensor, weight: torch.Tensor, gB: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """``g W + gB A`` (M×K), ordered as ``_base_plus_lora``: gB A first, g W's GEMM adds it."""
    return (gB @ A).addmm_(g, weight)


class _FusedFrozenLinearLora(torch.autograd.Function):
    """Kernel D forward, Kernel E backward (``linear_kernels``); differentiable in x, A and B."""

    @staticmethod
    def forward(ctx, x2, weight, bias, A, B, kernels):
        need_x, need_A, need_B = ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.needs_input_grad[4]
        y, h = kernels.forward(x2, weight, bias, A, B, keep_h=need_B)
        ctx.kernels = kernels
        ctx.save_for_backward(x2 if need_A else None, h, weight, A, B)
        return y

    @staticmethod
    def backward(ctx, g):
        x2, h, weight, A, B = ctx.saved_tensors
        need_x, need_A, need_B = ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.needs_input_grad[4]
        dx = dA = dB = None
        if need_x and _KERNEL_E:
            dx, gB = ctx.kernels.dgrad(g, weight, A, B, keep_gb=need_A)
        elif need_x:
            gB = g @ B
            dx = _dx(g, weight, gB, A)
        elif need_A:
            gB = g @ B
        if need_A:
            dA = gB.t() @ x2
        if need_B:
            dB = g.t() @ h
        return dx, None, None, dA, dB, None


COMPILED_FUSED_ROWS = 16  # linear_kernels' decoding tiles (measured at or near the base GEMV's speed)


@torch.library.custom_op("unilora_hf::frozen_linear_lora_inference", mutates_args=())
def _inference_op(x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, A: torch.Tensor,
                  B: torch.Tensor) -> torch.Tensor:
    """Kernel D's ``x Wᵀ + b + round(x Aᵀ) Bᵀ`` (M×N) for compiled inference; x2: M×K. Not differentiable."""
    kernels = fused_kernels(x2.device)
    if kernels is None:  # the backend changed since tracing: the same maths in PyTorch ops
        return _peft_order(x2, weight, bias, x2 @ A.t(), B)
    return kernels.forward(x2.contiguous(), weight.contiguous(), bias, A.contiguous(), B.contiguous(), keep_h=False)[0]


@_inference_op.register_fake
def _(x2, weight, bias, A, B):
    return x2.new_empty((x2.shape[0], weight.shape[0]))


@torch.library.custom_op("unilora_hf::frozen_linear_lora_inference_group", mutates_args=())
def _inference_group_op(x2: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor | None],
                        As: list[torch.Tensor], Bs: list[torch.Tensor]) -> list[torch.Tensor]:
    """``frozen_linear_lora_inference`` of layers that read the same x2, in one launch (``forward_group``)."""
    kernels = fused_kernels(x2.device)
    if kernels is None:  # the backend changed since tracing: the same maths in PyTorch ops
        return [_peft_order(x2, w, b, x2 @ A.t(), B) for w, b, A, B in zip(weights, biases, As, Bs)]
    return kernels.forward_group(x2.contiguous(), [w.contiguous() for w in weights], list(biases),
                                 [A.contiguous() for A in As], [B.contiguous() for B in Bs])


@_inference_group_op.register_fake
def _(x2, weights, biases, As, Bs):
    return [x2.new_empty((x2.shape[0], w.shape[0])) for w in weights]


@torch.compiler.assume_constant_result
def _group_tiles_fit(device: torch.device, dtype: torch.dtype, K: int, outs: tuple[int, ...], r: int) -> bool:
    """Whether layers of ``outs`` outputs can share one Kernel D launch on at most COMPILED_FUSED_ROWS rows of K
    inputs (one decoding tile serves every such row count): a constant of the traced graph, of weight shapes."""
    kernels = fused_kernels(device)
    return kernels is not None and kernels.group_tiles(COMPILED_FUSED_ROWS, K, outs, r, dtype) is not None


def frozen_linear_lora_group(
    x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor | None], As: list[torch.Tensor],
    Bs: list[torch.Tensor],
) -> list[torch.Tensor] | None:
    """``[frozen_linear_lora(x, W_i, b_i, A_i, B_i)]`` for layers that read the same x, as one Kernel D launch
    with the same bits, or None where that does not apply (the caller runs each layer alone): more than
    COMPILED_FUSED_ROWS rows, autograd recording, another backend than triton, non-contiguous operands, or
    layers whose decoding tiles differ (``linear_kernels.group_tiles``)."""
    x2 = _flat(x)
    rows, K = x2.shape[0], weights[0].shape[1]
    r = As[0].shape[0]
    if (x.dtype not in _FUSED_DTYPES or not 0 < rows <= COMPILED_FUSED_ROWS
            or any(A.shape[0] != r for A in As) or len({b is None for b in biases}) > 1
            or (torch.is_grad_enabled() and (x.requires_grad or any(t.requires_grad for t in (*As, *Bs))))
            or not all(t.is_contiguous() for t in (*weights, *As, *Bs))
            or dispatch.resolve_backend(x.device) != "triton"):
        return None
    outs = tuple(w.shape[0] for w in weights)
    if torch.compiler.is_compiling():
        if not _group_tiles_fit(x.device, x.dtype, K, outs, r):
            return None
        ys = torch.ops.unilora_hf.frozen_linear_lora_inference_group(x2, weights, biases, As, Bs)
    else:
        kernels = fused_kernels(x.device)
        if kernels is None or kernels.group_tiles(rows, K, outs, r, x.dtype) is None:
            return None
        ys = kernels.forward_group(x2.contiguous(), weights, biases, As, Bs)
    return [y.view(*x.shape[:-1], y.shape[-1]) for y in ys]


def _compiled_inference_fused(x2: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> bool:
    """While tracing: whether this call takes the custom op (no autograd, at most COMPILED_FUSED_ROWS rows, the
    triton backend for the device)."""
    return (x2.shape[0] <= COMPILED_FUSED_ROWS
            and not (torch.is_grad_enabled() and (x2.requires_grad or A.requires_grad or B.requires_grad))
            and dispatch.resolve_backend(x2.device) == "triton")


@torch.library.custom_op("unilora_hf::frozen_linear_lora", mutates_args=())
def _compiled_op(x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, A: torch.Tensor,
                 B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, h) with ``h = x Aᵀ`` (M×r) and ``y = x Wᵀ + b + h Bᵀ`` (M×N) by ``_base_plus_lora``: the eager
    reference path's maths with the float sums in another order. h is kept for dB (and differentiable, for a
    double backward)."""
    h = x2 @ A.t()
    return _base_plus_lora(x2, weight, bias, h, B), h


@_compiled_op.register_fake
def _(x2, weight, bias, A, B):
    return x2.new_empty((x2.shape[0], weight.shape[0])), x2.new_empty((x2.shape[0], A.shape[0]))


@torch.library.custom_op("unilora_hf::frozen_linear_lora_dx", mutates_args=())
def _compiled_dx_op(g: torch.Tensor, weight: torch.Tensor, A: torch.Tensor,
                    B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, gB) with ``gB = g B`` (M×r) and ``dx = g W + gB A`` (M×K), gB A added in place into g W."""
    gB = g @ B
    return _dx(g, weight, gB, A), gB


@_compiled_dx_op.register_fake
def _(g, weight, A, B):
    return g.new_empty((g.shape[0], weight.shape[1])), g.new_empty((g.shape[0], B.shape[1]))


def _compiled_dx_setup(ctx, inputs, output):
    g, weight, A, B = inputs
    ctx.save_for_backward(g, weight, A, B, output[1])


def _compiled_dx_backward(ctx, u, v):
    """dx = g W + gB A and gB = g B are linear in g: with upstream (u, v) for (dx, gB), w = u Aᵀ + v is the
    gradient reaching gB, so dg = u Wᵀ + w Bᵀ, dA = gBᵀ u, dB = gᵀ w (W frozen)."""
    g, weight, A, B, gB = ctx.saved_tensors
    need_g, _, need_A, need_B = ctx.needs_input_grad
    w = torch.addmm(v, u, A.t())  # u and v are materialised (zeros for an unused output)
    dg = (w @ B.t()).addmm_(u, weight.t()) if need_g else None
    return dg, None, gB.t() @ u if need_A else None, g.t() @ w if need_B else None


_compiled_dx_op.register_autograd(_compiled_dx_backward, setup_context=_compiled_dx_setup)


def _compiled_op_setup(ctx, inputs, output):
    x2, weight, _bias, A, B = inputs
    ctx.set_materialize_grads(False)  # h's gradient is None unless a caller uses h: no product of zeros
    ctx.save_for_backward(x2, weight, A, B, output[1])


def _compiled_op_backward(ctx, g, gh):
    x2, weight, A, B, h = ctx.saved_tensors
    need_x, _, _, need_A, need_B = ctx.needs_input_grad
    if g is None:
        g = x2.new_zeros((x2.shape[0], weight.shape[0]))
    if _overlapped_grads(gh, (need_x, need_A, need_B)):
        dx, dA, dB = torch.ops.unilora_hf.frozen_linear_lora_grads([g], [weight], A, [B], x2, h)
        return dx, None, None, dA, dB
    dx = dA = dB = gB = None
    if need_x:
        dx, gB = torch.ops.unilora_hf.frozen_linear_lora_dx(g, weight, A, B)
        if gh is not None:
            dx = dx.addmm(gh, A)
    elif need_A:
        gB = g @ B
    if need_A:
        dA = (gB if gh is None else gB + gh).t() @ x2
    if need_B:
        dB = g.t() @ h
    return dx, None, None, dA, dB


_compiled_op.register_autograd(_compiled_op_backward, setup_context=_compiled_op_setup)


@torch.library.custom_op("unilora_hf::frozen_linear_lora_siblings", mutates_args=())
def _siblings_op(x2: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor | None], A: torch.Tensor,
                 Bs: list[torch.Tensor]) -> list[torch.Tensor]:
    """``[y_1, …, y_G, h]`` for G layers that read the same x2 (M×K): ``h = x2 Aᵀ`` (M × G·r) with A the members'
    A_i stacked (G·r × K), so one GEMM reads x for every member's rank-r input; ``y_i = x Wᵢᵀ + bᵢ + hᵢ Bᵢᵀ`` by
    ``_base_plus_lora``, hᵢ the i-th block of r columns of h."""
    h = x2 @ A.t()
    r = h.shape[1] // len(weights)
    ys = [_base_plus_lora(x2, w, b, h[:, i * r:(i + 1) * r], B)
          for i, (w, b, B) in enumerate(zip(weights, biases, Bs))]
    return ys + [h]


@_siblings_op.register_fake
def _(x2, weights, biases, A, Bs):
    return [x2.new_empty((x2.shape[0], w.shape[0])) for w in weights] + [x2.new_empty((x2.shape[0], A.shape[0]))]


def _stacked_gB(gs: list[torch.Tensor], Bs: list[torch.Tensor]) -> torch.Tensor:
    """``[g_1 B_1 | … | g_G B_G]`` (M × G·r): the set's gB, laid out as its stacked A's rows. Each GEMM writes its
    block of columns in place (cuBLAS takes the row stride G·r): no copy, no concatenation kernel."""
    if len(gs) == 1:
        return gs[0] @ Bs[0]
    r = Bs[0].shape[1]
    gB = gs[0].new_empty((gs[0].shape[0], len(gs) * r))
    for i, (g, B) in enumerate(zip(gs, Bs)):
        torch.mm(g, B, out=gB[:, i * r:(i + 1) * r])
    return gB


def _set_dx(gs: list[torch.Tensor], weights: list[torch.Tensor], gB: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """``gB A + Σ g_i W_i`` (M×K): the set's rank-r term first, each base GEMM adding into it in place."""
    dx = gB @ A
    for g, w in zip(gs, weights):
        dx.addmm_(g, w)
    return dx


@torch.library.custom_op("unilora_hf::frozen_linear_lora_siblings_dx", mutates_args=())
def _siblings_dx_op(gs: list[torch.Tensor], weights: list[torch.Tensor], A: torch.Tensor,
                    Bs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, gB) of ``frozen_linear_lora_siblings``: ``gB = [g_1 B_1 | … | g_G B_G]`` (M × G·r) and
    ``dx = gB A + Σ g_i W_i`` (M×K). One M×K product for the set's rank-r terms, then each base GEMM adds into that
    buffer in place; one layer per call would write G products and G sums, and autograd would add them up."""
    gB = _stacked_gB(gs, Bs)
    return _set_dx(gs, weights, gB, A), gB


@_siblings_dx_op.register_fake
def _(gs, weights, A, Bs):
    return gs[0].new_empty((gs[0].shape[0], A.shape[1])), gs[0].new_empty((gs[0].shape[0], A.shape[0]))


def _siblings_dx_setup(ctx, inputs, output):
    gs, weights, A, Bs = inputs
    ctx.members = len(gs)
    ctx.save_for_backward(A, output[1], *gs, *weights, *Bs)


def _siblings_dx_backward(ctx, u, v):
    """Linear in the g_i, as ``_compiled_dx_backward``: w = u Aᵀ + v reaches gB, so dg_i = u Wᵢᵀ + wᵢ Bᵢᵀ,
    dA = gBᵀ u, dB_i = g_iᵀ wᵢ (wᵢ: the i-th block of r columns of w)."""
    A, gB, *rest = ctx.saved_tensors
    n = ctx.members
    gs, weights, Bs = rest[:n], rest[n:2 * n], rest[2 * n:]
    need_g, _, need_A, need_B = ctx.needs_input_grad
    r = A.shape[0] // n
    w = torch.addmm(v, u, A.t())
    blocks = [w[:, i * r:(i + 1) * r] for i in range(n)]
    dgs = [(wi @ B.t()).addmm_(u, W.t()) if need else None for wi, B, W, need in zip(blocks, Bs, weights, need_g)]
    dBs = [g.t() @ wi if need else None for g, wi, need in zip(gs, blocks, need_B)]
    return dgs, [None] * n, gB.t() @ u if need_A else None, dBs


_siblings_dx_op.register_autograd(_siblings_dx_backward, setup_context=_siblings_dx_setup)


# The weight gradients of ``frozen_linear_lora_grads`` on a second stream while a CUDA graph captures it: read when
# the op runs, so a graph keeps what was set at its capture. Off only for an A/B measurement (benchmarks/train_step.py).
SECOND_STREAM = True
_side_streams: dict[torch.device, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    stream = _side_streams.get(device)
    if stream is None:
        stream = _side_streams[device] = torch.cuda.Stream(device)
    return stream


class WeightGradStream:
    """Where a backward op's weight gradients run: on a second stream while a CUDA graph captures the op (and
    ``SECOND_STREAM`` is on), else in line on the caller's. ``with stream.run():`` runs a block there after the caller's
    work so far; ``join()`` makes the caller's stream wait for everything run there."""

    def __init__(self, device: torch.device):
        self.side = self.main = None
        if device.type == "cuda" and SECOND_STREAM and torch.cuda.is_current_stream_capturing():
            self.side, self.main = _side_stream(device), torch.cuda.current_stream(device)

    def run(self):
        if self.side is None:
            return contextlib.nullcontext()
        self.side.wait_stream(self.main)
        return torch.cuda.stream(self.side)

    def join(self) -> None:
        if self.side is not None:
            self.main.wait_stream(self.side)


@torch.library.custom_op("unilora_hf::frozen_linear_lora_grads", mutates_args=())
def _grads_op(gs: list[torch.Tensor], weights: list[torch.Tensor], A: torch.Tensor, Bs: list[torch.Tensor],
              x2: torch.Tensor, h: torch.Tensor) -> list[torch.Tensor]:
    """``[dx, dA, dB_1, …, dB_G]``: the whole backward of ``frozen_linear_lora_siblings`` (G = 1:
    ``frozen_linear_lora``) for upstream g_i, when x, A and every B want a gradient and h's is None. dx and
    gB = [g_1 B_1 | … | g_G B_G] as ``frozen_linear_lora_siblings_dx``, dA = gBᵀ x, dB_i = g_iᵀ hᵢ. Captured into a
    CUDA graph (``reduce-overhead``), the weight gradients, which nothing in dx waits for, run on a second stream
    (dB_i from the start, dA once gB is formed) beside the compute-bound base GEMMs of dx, which leave room for them:
    a 1.1B training step's minimum measured 0.4–0.8 ms lower (H200, benchmarks/RESULTS.md, session 12). The op waits
    for that stream before it returns: what follows sees one stream, and every buffer is allocated on the caller's.
    Launched one by one (eager, compiled ``default``) the op stays on one stream: there the host bounds the step, and
    the switching cost it 18 ms per 1.1B step. Not differentiable: called where the backward does not record (a double
    backward takes the ops above)."""
    r = A.shape[0] // len(gs)
    dA = x2.new_empty(A.shape)
    dBs = [g.new_empty((g.shape[1], r)) for g in gs]
    stream = WeightGradStream(x2.device)
    with stream.run():
        for i, (g, dB) in enumerate(zip(gs, dBs)):
            torch.mm(g.t(), h[:, i * r:(i + 1) * r], out=dB)
    gB = _stacked_gB(gs, Bs)
    with stream.run():
        torch.mm(gB.t(), x2, out=dA)
    dx = _set_dx(gs, weights, gB, A)
    stream.join()
    return [dx, dA] + dBs


@_grads_op.register_fake
def _(gs, weights, A, Bs, x2, h):
    r = A.shape[0] // len(gs)
    return [x2.new_empty(x2.shape), x2.new_empty(A.shape)] + [g.new_empty((g.shape[1], r)) for g in gs]


def _overlapped_grads(gh, needs) -> bool:
    """Whether a backward takes ``frozen_linear_lora_grads``: not recording (no double backward), every gradient
    wanted (``needs``: the flags of x, A and each B), none reaching h."""
    return gh is None and all(needs) and not torch.is_grad_enabled()


def _siblings_setup(ctx, inputs, output):
    x2, weights, biases, A, Bs = inputs
    ctx.set_materialize_grads(False)  # h's gradient is None unless a caller uses h; so is an unused member's
    ctx.members = len(weights)
    ctx.biases = [None] * len(biases) if any(b is not None for b in biases) else None  # the input's structure
    ctx.save_for_backward(x2, A, output[-1], *weights, *Bs)


def _siblings_backward(ctx, grads):
    x2, A, h, *rest = ctx.saved_tensors
    n = ctx.members
    weights, Bs = rest[:n], rest[n:]
    need_x, _, _, need_A, need_B = ctx.needs_input_grad
    gh = grads[n]
    gs = [x2.new_zeros((x2.shape[0], w.shape[0])) if g is None else g for g, w in zip(grads[:n], weights)]
    r = A.shape[0] // n
    if _overlapped_grads(gh, (need_x, need_A, *need_B)):
        dx, dA, *dBs = torch.ops.unilora_hf.frozen_linear_lora_grads(gs, list(weights), A, list(Bs), x2, h)
        return dx, [None] * n, ctx.biases, dA, dBs
    dx = dA = gB = None
    if need_x:
        dx, gB = torch.ops.unilora_hf.frozen_linear_lora_siblings_dx(gs, list(weights), A, list(Bs))
        if gh is not None:
            dx = dx.addmm(gh, A)
    elif need_A:
        gB = _stacked_gB(gs, Bs)
    if need_A:
        dA = (gB if gh is None else gB + gh).t() @ x2
    dBs = [g.t() @ h[:, i * r:(i + 1) * r] if need else None for i, (g, need) in enumerate(zip(gs, need_B))]
    return dx, [None] * n, ctx.biases, dA, dBs


_siblings_op.register_autograd(_siblings_backward, setup_context=_siblings_setup)


def frozen_linear_lora_siblings(
    x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor | None], As: list[torch.Tensor],
    Bs: list[torch.Tensor],
) -> list[torch.Tensor] | None:
    """``[frozen_linear_lora(x, W_i, b_i, A_i, B_i)]`` for layers that read the same x, as the op
    ``unilora_hf::frozen_linear_lora_siblings`` (cuBLAS GEMMs; differentiable in x, the A_i and the B_i): x is read
    once for every member's ``x Aᵢᵀ`` and once for the stacked dA, and the backward's dx is one buffer for the set
    (``frozen_linear_lora_siblings_dx``). For training steps and many rows under ``torch.compile``; None where the
    members differ in rank or in having a bias (the caller runs each layer alone)."""
    r = As[0].shape[0]
    if any(A.shape[0] != r for A in As) or len({b is None for b in biases}) > 1:
        return None
    outputs = torch.ops.unilora_hf.frozen_linear_lora_siblings(_flat(x), weights, biases, torch.cat(As), Bs)
    return [y.view(*x.shape[:-1], y.shape[-1]) for y in outputs[:-1]]


def frozen_linear_lora(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, A: torch.Tensor, B: torch.Tensor
) -> torch.Tensor:
    """``x Wᵀ + b + (x Aᵀ) Bᵀ`` for a frozen ``nn.Linear`` (W: out×in); x, W, A, B of one dtype.
    Differentiable in x, A and B (except on the compiled inference path, where autograd does not record)."""
    x2 = _flat(x)
    kernels = None
    fusable = x.dtype in _FUSED_DTYPES and A.shape[0] <= _FUSED_MAX_RANK and x2.shape[0]
    if torch.compiler.is_compiling():
        if fusable and _compiled_inference_fused(x2, A, B):
            y = torch.ops.unilora_hf.frozen_linear_lora_inference(x2, weight, bias, A, B)
        else:
            y = torch.ops.unilora_hf.frozen_linear_lora(x2, weight, bias, A, B)[0]
        return y.view(*x.shape[:-1], y.shape[-1])
    if fusable:
        kernels = fused_kernels(x.device)
    if kernels is not None:
        if torch.is_grad_enabled() and (x.requires_grad or A.requires_grad or B.requires_grad):
            y = _FusedFrozenLinearLora.apply(x2, weight, bias, A, B, kernels)
        else:
            y = kernels.forward(x2, weight, bias, A, B, keep_h=False)[0]
    else:
        y = _peft_order(x2, weight, bias, x2 @ A.t(), B)
    return y.view(*x.shape[:-1], y.shape[-1])


def add_lora(result: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``result + (x Aᵀ) Bᵀ`` with A, B in ``result``'s dtype (x is cast to it); differentiable in
    result, x, A and B. ``result`` is not modified."""
    with _no_autocast(x):
        x2 = _flat(x).to(A.dtype)
        return torch.addmm(_flat(result), x2 @ A.t(), B.t()).view(result.shape)


def add_mixed_lora(result: torch.Tensor, x: torch.Tensor, slots: torch.Tensor, A: torch.Tensor,
                   B: torch.Tensor) -> torch.Tensor:
    """``result`` plus each row's own LoRA term (mixed batches): row m adds ``round(x[m] A[slots[m]]ᵀ)
    B[slots[m]]ᵀ``, nothing where ``slots[m] < 0``. result/x flattened to rows; A: P×r×in, B: P×out×r in
    result's dtype. On CUDA tensors with the triton backend, Kernel M (``mixed_kernels``: two launches for up to
    256 rows, one above), which adds in place into a copy of ``result`` (in place when autograd does not need it);
    else the reference, one pair of products per adapter present. Not differentiable in A and B on the kernel path."""
    with _no_autocast(x):
        y2, x2 = _flat(result), _flat(x).to(A.dtype)
        kernels = None
        if y2.is_cuda and A.shape[1] <= 64 and not torch.compiler.is_compiling():
            kernels = _kernel_module("mixed_kernels", y2.device)
        if kernels is not None and not (torch.is_grad_enabled() and (x.requires_grad or result.requires_grad)):
            out = y2.contiguous()
            kernels.add_mixed(out, x2.contiguous(), slots.to(device=out.device, dtype=torch.int32), A, B)
            return out.view(result.shape)
        return _mixed_reference(y2, x2, slots, A, B).view(result.shape)


def _mixed_reference(y2: torch.Tensor, x2: torch.Tensor, slots: torch.Tensor, A: torch.Tensor,
                     B: torch.Tensor) -> torch.Tensor:
    """Each adapter present adds ``addmm(y rows, x rows Aᵀ, Bᵀ)`` to its rows, as the layer does for one adapter."""
    out = y2.clone()
    slots = slots.to(y2.device)
    for p in torch.unique(slots[slots >= 0]).tolist():
        rows = (slots == p).nonzero().flatten()
        out[rows] = torch.addmm(y2[rows], x2[rows] @ A[p].t(), B[p].t())
    return out
