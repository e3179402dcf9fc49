"""The adapted linear layer's forward and backward, with the LoRA path folded into the base GEMMs.

For x ∈ R^{T×in} (leading dims flattened), a frozen base (W, b), and the layer's A ∈ R^{r×in},
B ∈ R^{out×r} already read out of θ_d (in the compute dtype):

    forward   h = x Aᵀ                         (T×r)
              y = x Wᵀ + b,  then y += h Bᵀ    (one GEMM accumulating into y: no separate add pass)
    backward  dh = g B                         (T×r)
              dx = g W + dh A
              dB = gᵀ h,  dA = dhᵀ x           (W and b are frozen: no weight gradient)

Saved for backward: x (the tensor the base linear saves anyway), h (T×r), A and B (views of the
step's θ_D). Every GEMM runs in the activation dtype with float32 accumulation (cuBLAS on CUDA), as a
standard ``nn.Linear`` does; A and B are formed once per step in float32 and rounded once to that
dtype by the caller. Compared with ``base(x) + lora_B(lora_A(x))`` this removes the add of the two
outputs (and the extra output tensor) in the forward. The backward is autograd's own (C++) for these
ops: measured on an H100 behind this workplace's sandbox, a Python ``autograd.Function`` cost ~0.2 ms
of CPU per call, which made the 154-layer training step CPU-bound; the C++ graph costs one more
kernel (the sum of the two input gradients) and no Python.

``frozen_linear_lora`` is the path for an ``nn.Linear`` base whose weight and bias are frozen;
``add_lora(result, x, A, B)`` is the general path (any base layer, dropout on the LoRA input):
``result + (x Aᵀ) Bᵀ`` as one GEMM accumulating into a copy of ``result``. These are PyTorch ops (cuBLAS/CPU BLAS), so the same code is the
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


def frozen_linear_lora(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, A: torch.Tensor, B: torch.Tensor
) -> torch.Tensor:
    """``x Wᵀ + b + (x Aᵀ) Bᵀ`` for a frozen ``nn.Linear`` (W: out×in); x, W, A, B of one dtype.
    Differentiable in x, A and B."""
    x2 = _flat(x)
    y = F.linear(x2, weight, bias)
    y.addmm_(x2 @ A.t(), B.t())
    return y.view(*x.shape[:-1], y.shape[-1])


def add_lora(result: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``result + (x Aᵀ) Bᵀ`` with A, B in ``result``'s dtype (x is cast to it); differentiable in
    result, x, A and B. ``result`` is not modified."""
    with _no_autocast(x):
        x2 = _flat(x).to(A.dtype)
        return torch.addmm(_flat(result), x2 @ A.t(), B.t()).view(result.shape)
