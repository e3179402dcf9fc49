"""Fast paths of the Uni-LoRA projection θ_D = P θ_d (``docs/projection.md``) and of the adapted linear.

``project_theta(theta_d, projection)`` is the differentiable readout (backward: Pᵀ g, deterministic);
``readout`` / ``theta_grad`` / ``native_indices`` are its non-differentiable parts. Each runs on Triton
kernels for CUDA tensors (``projection_kernels``, loaded on first use) and on a pure-PyTorch reference
otherwise; the adapted linear (``lora_linear``) runs its forward on the fused Kernel D
(``linear_kernels``) under the same choice; ``force_backend`` or ``UNILORA_HF_KERNELS`` override
the choice (see ``dispatch``). Importing this package never needs triton; using the Triton backend
without it raises ImportError with the hint ``pip install "unilora_hf[triton]"``.
"""

from .dispatch import (
    BACKENDS,
    ENV_VAR,
    force_backend,
    merge_delta_,
    native_indices,
    peft_csr,
    project_slice,
    project_theta,
    readout,
    resolve_backend,
    theta_grad,
    triton_available,
)

__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "force_backend",
    "merge_delta_",
    "native_indices",
    "peft_csr",
    "project_slice",
    "project_theta",
    "readout",
    "resolve_backend",
    "theta_grad",
    "triton_available",
]
