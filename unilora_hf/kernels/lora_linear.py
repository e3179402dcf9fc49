"""The adapted linear layer's forward and backward, with the LoRA path folded into the base GEMMs.

For x ∈ R^{T×in} (leading dims flattened), a frozen base (W, b), and the layer's A ∈ R^{r×in},
B ∈ R^{out×r} already read out of θ_d (in the compute dtype):

    forward   h = x Aᵀ                         (T×r)
              y = x Wᵀ + b,  then y += h Bᵀ    (one GEMM accumulating into y: no separate add pass)
    backward  dh = g B                         (T×r)
              dx = g W,      then dx += dh A   (accumulated into the base's dgrad GEMM)
              dB = gᵀ h,  dA = dhᵀ x           (W and b are frozen: no weight gradient)

Saved for backward: x (the tensor the base linear saves anyway), h (T×r), A and B (views of the
step's θ_D). Every GEMM runs in the activation dtype with float32 accumulation (cuBLAS on CUDA), as a
standard ``nn.Linear`` does; A and B are formed once per step in float32 and rounded once to that
dtype by the caller. Compared with ``base(x) + lora_B(lora_A(x))`` this removes the add of the two
outputs in the forward and the sum of the two input gradients in the backward, each a full pass over
a T×out or T×in tensor.

``frozen_linear_lora`` is the path for an ``nn.Linear`` base whose weight and bias are frozen;
``add_lora(result, x, A, B)`` is the general path (any base layer, dropout on the LoRA input):
``result + (x Aᵀ) Bᵀ`` as one GEMM accumulating into a copy of ``result``. Under ``torch.no_grad``
both skip autograd bookkeeping. These are PyTorch ops (cuBLAS/CPU BLAS), so the same code is the
CPU path; ``reference.lora_forward`` is the oracle.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def _no_autocast(x: torch.Tensor):
    """The dtypes here are chosen by the caller: autocast must not recast them."""
    return torch.autocast(x.device.type, enabled=False)


class _FrozenLinearLora(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, A, B):
        x2 = _flat(x)
        y = F.linear(x2, weight, bias)
        h = x2 @ A.t()
        y.addmm_(h, B.t())
        ctx.save_for_backward(x2, weight, A, B, h)
        ctx.x_shape = x.shape
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        x2, weight, A, B, h = ctx.saved_tensors
        g = _flat(grad)
        dh = g @ B
        dx = dA = dB = None
        if ctx.needs_input_grad[0]:
            dx = g @ weight
            dx.addmm_(dh, A)
            dx = dx.view(ctx.x_shape)
        if ctx.needs_input_grad[3]:
            dA = dh.t() @ x2
        if ctx.needs_input_grad[4]:
            dB = g.t() @ h
        return dx, None, None, dA, dB


class _AddLora(torch.autograd.Function):
    @staticmethod
    def forward(ctx, result, x, A, B):
        with _no_autocast(x):
            x2 = _flat(x).to(A.dtype)
            h = x2 @ A.t()
            out = torch.addmm(_flat(result), h, B.t())
        ctx.save_for_backward(x2, A, B, h)
        ctx.x_dtype, ctx.x_shape = x.dtype, x.shape
        return out.view(result.shape)

    @staticmethod
    def backward(ctx, grad):
        x2, A, B, h = ctx.saved_tensors
        g = _flat(grad)
        dh = g.to(B.dtype) @ B
        dx = dA = dB = None
        if ctx.needs_input_grad[1]:
            dx = (dh @ A).view(ctx.x_shape).to(ctx.x_dtype)
        if ctx.needs_input_grad[2]:
            dA = dh.t() @ x2
        if ctx.needs_input_grad[3]:
            dB = g.to(h.dtype).t() @ h
        return grad, dx, dA, dB


def frozen_linear_lora(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, A: torch.Tensor, B: torch.Tensor
) -> torch.Tensor:
    """``x Wᵀ + b + (x Aᵀ) Bᵀ`` for a frozen ``nn.Linear`` (W: out×in); x, W, A, B of one dtype.
    Differentiable in x, A and B."""
    if not torch.is_grad_enabled():
        x2 = _flat(x)
        y = F.linear(x2, weight, bias)
        y.addmm_(x2 @ A.t(), B.t())
        return y.view(*x.shape[:-1], y.shape[-1])
    return _FrozenLinearLora.apply(x, weight, bias, A, B)


def add_lora(result: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``result + (x Aᵀ) Bᵀ`` with A, B in ``result``'s dtype (x is cast to it); differentiable in
    result, x, A and B. ``result`` is not modified."""
    if not torch.is_grad_enabled():
        with _no_autocast(x):
            x2 = _flat(x).to(A.dtype)
            return torch.addmm(_flat(result), x2 @ A.t(), B.t()).view(result.shape)
    return _AddLora.apply(result, x, A, B)
