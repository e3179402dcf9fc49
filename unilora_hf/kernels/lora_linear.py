"""The adapted linear layer's compute path, with the LoRA product accumulated into the base output.

For x ∈ R^{T×in} (leading dims flattened), a frozen base (W, b), and the layer's A ∈ R^{r×in},
B ∈ R^{out×r} already read out of θ_d (in the compute dtype):

    forward   h = x Aᵀ                         (T×r)
              y = x Wᵀ + b,  then y += h Bᵀ    (a GEMM accumulating into y: no separate add pass)
    backward  dh = g B,  dx = g W + dh A,  dB = gᵀ h,  dA = dhᵀ x   (W and b frozen: no weight gradient)

The backward is autograd's own (C++) for these ops. Every GEMM runs in the activation dtype with
float32 accumulation (cuBLAS on CUDA), as a standard ``nn.Linear`` does; A and B are formed once per
pass in float32 and rounded once to that dtype by the caller. A Python ``autograd.Function`` adding the
backward's dx into the base dgrad in place saves one kernel per layer and measured no faster on the GPU
machine (``benchmarks/step_profile.py``, ``benchmarks/RESULTS.md``), so these stay plain autograd ops.

``frozen_linear_lora`` is the path for an ``nn.Linear`` base whose weight and bias are frozen;
``add_lora(result, x, A, B)`` is the general path (any base layer, dropout on the LoRA input):
``result + (x Aᵀ) Bᵀ`` as one GEMM into a new tensor. These are PyTorch ops (cuBLAS / CPU BLAS), so
the same code is the CPU path; ``reference.lora_forward`` is the oracle.
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
