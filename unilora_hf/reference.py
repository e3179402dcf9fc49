"""Pure-PyTorch reference of the Uni-LoRA computations: the CPU path and the oracle of the kernels.

For an adapted layer with slice [o, o + r·(in+out)) of θ_D:
    A[a, c] = θ_d[idx(o + a·in + c)] · s(idx(o + a·in + c))            A ∈ R^{r×in}
    B[b, a] = θ_d[idx(o + r·in + b·r + a)] · s(idx(o + r·in + b·r + a))  B ∈ R^{out×r}
    y = base(x) + (dropout(x) Aᵀ) Bᵀ        (no alpha/r scaling, as in the paper and PEFT)
    ΔW = B A  (transposed for Conv1D layers, whose weight is in×out)
All adapter arithmetic is float32 whatever the activation dtype; the sum is cast back to the base
output's dtype. The θ_d gradient is Pᵀ g_D, which autograd forms from the index read.
"""

from __future__ import annotations

import torch

from .layout import LayerSpec
from .projection import Projection


def lora_matrices(theta_d: torch.Tensor, projection: Projection, spec: LayerSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of one layer in float32, differentiable with respect to ``theta_d``."""
    theta = theta_d.float()
    idx = projection.indices(spec.offset, spec.size, device=theta.device)
    return spec.lora_views(theta[idx] * projection.scales_of(idx))


def lora_forward(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """(x Aᵀ) Bᵀ in float32."""
    h = x.to(A.dtype)
    return torch.nn.functional.linear(torch.nn.functional.linear(h, A), B)


def delta_weight(A: torch.Tensor, B: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    """ΔW = B A in float32, laid out like the base weight."""
    delta = B @ A
    return delta.T if fan_in_fan_out else delta


def theta_d_grad(projection: Projection, grad_theta_D: torch.Tensor) -> torch.Tensor:
    """Pᵀ g for a gradient g over all D positions, as a gather-reduce over each column's rows
    (native) or a scatter-add (peft); float32."""
    idx = projection.indices(0, projection.D, device=grad_theta_D.device)
    weighted = grad_theta_D.float() * projection.scales_of(idx)
    out = torch.zeros(projection.d, dtype=torch.float32, device=grad_theta_D.device)
    return out.index_add_(0, idx, weighted)


def mixed_lora(x: torch.Tensor, slot: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """The mixed-batch LoRA term: row m gets ``round(x[m] A[slot[m]]ᵀ) B[slot[m]]ᵀ`` (zero where slot[m] < 0),
    in x's dtype; x: M×K, slot: M, A: P×r×K, B: P×N×r. One pair of products per adapter present, over its
    rows, so each row is computed exactly as it is with that adapter alone."""
    out = x.new_zeros((x.shape[0], B.shape[1]))
    for p in torch.unique(slot[slot >= 0]).tolist():
        rows = (slot == p).nonzero().flatten()
        out[rows] = (x[rows] @ A[p].t()) @ B[p].t()
    return out
