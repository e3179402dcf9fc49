"""θ_D = P θ_d as one differentiable op, on Triton kernels (CUDA) or a pure-PyTorch reference.

``project_theta(theta_d, projection)`` returns θ_D ∈ R^D (float32) with ``θ_D[i] = θ_d[idx(i)] · s(idx(i))``;
its backward returns ``Pᵀ g`` (``(Pᵀ g)[j] = s(j) · Σ_{i: idx(i) = j} g[i]``, float32 sums), deterministically:
each backend gives the same bits on every run on one device (the two backends sum in different orders,
so they agree to float32 rounding, not bit for bit; their forwards agree bit for bit).

Backends:
    ``triton``     the kernels of ``projection_kernels`` (readout: Kernel A, gradient: Kernel B): compiled
                   for CUDA tensors; for CPU tensors run in Triton's interpreter, only when
                   ``TRITON_INTERPRET=1`` is set (the CI path; slow, small sizes only).
    ``reference``  PyTorch ops: forward ``θ_d[projection.indices(0, D)] · projection.scales_of(idx)``;
                   backward ``reference.theta_d_grad`` (a serial ``index_add_``) on CPU, and elsewhere a
                   gather-reduce over a zero-padded d × max(n_j) row matrix (π⁻¹ for native, the CSR
                   inverse for peft) summed along m, which, unlike ``index_add_`` on CUDA, uses no atomics.
Choice, in order: ``force_backend(...)`` if active; the environment variable
``UNILORA_HF_KERNELS=triton|reference|auto``; ``auto``: ``triton`` for CUDA tensors when triton is
installed, else ``reference``. The choice is made when the forward runs; the backward uses the same one.

The op is registered as the ``torch.library`` custom ops ``unilora_hf::project_theta_native`` and
``unilora_hf::project_theta_peft`` (with fake implementations and ``register_autograd``; backward ops
``unilora_hf::theta_grad_native`` / ``theta_grad_peft``), so ``torch.compile`` traces it as one opaque
node, ``fullgraph=True`` included. Under compile the backend is chosen at trace time; ``force_backend``
is guarded (changing it recompiles), the environment variable is read at trace time. Double backward is
not supported.

peft gradient: the peft table (int32, D entries) has no closed-form inverse, so Kernel B gathers over a
CSR inverse built once per (Projection, device) by a stable argsort of the table and cached in the
projection's ``_device_cache``: ``rows`` (int32, 4·D bytes; int64 if D ≥ 2^31) lists the rows of each
column in increasing order, ``offsets`` (int64, 8·(d+1) bytes) delimits the columns. It doubles the
projection's device memory (4·D bytes more). ``project_theta`` builds it only when θ_d requires a
gradient; building it takes a transient int64 argsort (8·D bytes; ~40 ms for D = 5·10^7 on an H100).
The reference backend off CPU uses it too (its padded matrix is a transient ~8·(D + d) bytes).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os

import torch

from .. import reference
from ..errors import InvalidConfigError
from ..projection import NATIVE, PEFT, Projection, balanced_counts

BACKENDS = ("triton", "reference")
ENV_VAR = "UNILORA_HF_KERNELS"
CSR_CACHE_KEY = "unilora_hf.kernels.peft_csr"

_forced: str | None = None


def triton_available() -> bool:
    """Whether the ``triton`` package is installed (it is not imported)."""
    return importlib.util.find_spec("triton") is not None


_TRITON_INSTALLED = triton_available()


def _kernels(device: torch.device):
    from . import projection_kernels

    return projection_kernels.for_device(device)


@contextlib.contextmanager
def force_backend(name: str | None):
    """Within the block, ``project_theta``, ``readout`` and ``theta_grad`` use backend ``name``
    (``"triton"`` or ``"reference"``) whatever the device; ``None`` restores the automatic choice
    (environment variable, then device). Nests; process-wide (not per thread)."""
    global _forced
    if name is not None and name not in BACKENDS:
        raise InvalidConfigError(f"backend {name!r} is unknown; use one of {BACKENDS} or None")
    previous, _forced = _forced, name
    try:
        yield
    finally:
        _forced = previous


def resolve_backend(device: torch.device | str) -> str:
    """The backend used for tensors on ``device`` now: ``"triton"`` or ``"reference"``.

    Raises ImportError (with the install hint) when ``triton`` is asked for and not installed, and
    RuntimeError when it is asked for on a CPU tensor without ``TRITON_INTERPRET=1``."""
    device = torch.device(device)
    choice = _forced
    if choice is None:
        choice = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
        if choice not in (*BACKENDS, "auto"):
            raise InvalidConfigError(f"{ENV_VAR}={choice!r} is invalid; use triton, reference or auto")
    if choice == "auto":
        choice = "triton" if device.type == "cuda" and _TRITON_INSTALLED else "reference"
    if choice == "triton" and not torch.compiler.is_compiling():
        _kernels(device)
    return choice


def peft_csr(projection: Projection, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """The CSR inverse of a peft projection on ``device``: ``(rows, offsets)`` where
    ``rows[offsets[j]:offsets[j+1]]`` are the positions i with idx(i) = j, increasing.

    ``rows`` is int32 (int64 if D ≥ 2^31), D entries; ``offsets`` int64, d + 1 entries. Built once by a
    stable argsort of the table and cached in ``projection._device_cache``; every step has a static
    shape, so under ``torch.compile`` a cold cache is filled inside the first graph (then one recompile
    reads the cached tensors)."""
    if projection.kind != PEFT:
        raise ValueError(f"peft_csr needs a peft projection, not {projection.kind!r}")
    device = torch.device(device)
    key = (CSR_CACHE_KEY, str(device))
    cached = projection._device_cache.get(key)
    if cached is None:
        table, _ = projection._peft_tensors(device)
        rows_dtype = torch.int32 if projection.D < 2**31 else torch.int64
        rows = torch.argsort(table, stable=True).to(rows_dtype)
        offsets = torch.zeros(projection.d + 1, dtype=torch.int64, device=device)
        counts = torch.zeros(projection.d, dtype=torch.int64, device=device)
        counts.index_add_(0, table.long(), torch.ones_like(table, dtype=torch.int64))
        offsets[1:] = torch.cumsum(counts, 0)
        cached = projection._device_cache[key] = (rows, offsets)
    return cached


# -- the two backends on plain arguments ---------------------------------------------------------


def _native(seed: int, D: int, d: int) -> Projection:
    return Projection(NATIVE, seed, D, d)


def _readout_native(theta: torch.Tensor, seed: int, D: int, start: int, count: int, backend: str) -> torch.Tensor:
    if backend == "triton":
        return _kernels(theta.device).readout_native(theta.float(), seed, D, start, count)
    P = _native(seed, D, theta.numel())
    idx = P.indices(start, count, device=theta.device)
    return theta.float()[idx] * P.scales_of(idx)


def _readout_peft(theta, table, scales, start: int, count: int, backend: str) -> torch.Tensor:
    if backend == "triton":
        return _kernels(theta.device).readout_peft(theta.float(), table, scales, start, count)
    idx = table[start : start + count].long()
    return theta.float()[idx] * scales[idx]


def _padded_gather_reduce(g: torch.Tensor, rows_of, n: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """s(j) · Σ_{m < n_j} g[rows_of(j, m)] as a sum along m of a d × max(n) matrix (no atomics)."""
    m = torch.arange(int(n.max()) if n.numel() else 0, dtype=torch.int64, device=g.device)
    valid = m[None, :] < n[:, None]
    rows = rows_of(valid, m)
    gathered = torch.where(valid, g.float()[rows], 0.0)
    return gathered.sum(1) * scales


def _grad_native(g: torch.Tensor, seed: int, D: int, d: int, backend: str) -> torch.Tensor:
    if backend == "triton":
        return _kernels(g.device).grad_native(g, seed, D, d)
    P = _native(seed, D, d)
    if g.device.type == "cpu":
        return reference.theta_d_grad(P, g)
    q, rem, _ = balanced_counts(D, d)
    cols = torch.arange(d, dtype=torch.int64, device=g.device)
    n = q + (cols < rem).long()

    def rows_of(valid, m):
        return P.unpermute(torch.where(valid, cols[:, None] + m[None, :] * d, 0))

    return _padded_gather_reduce(g, rows_of, n, P.scales_of(cols))


def _grad_peft(g, table, scales, rows, offsets, backend: str) -> torch.Tensor:
    if backend == "triton":
        return _kernels(g.device).grad_peft(g, scales, rows, offsets)
    if g.device.type == "cpu":
        idx = table.long()
        out = torch.zeros(scales.numel(), dtype=torch.float32, device=g.device)
        return out.index_add_(0, idx, g.float() * scales[idx])
    n = offsets[1:] - offsets[:-1]

    def rows_of(valid, m):
        return rows[torch.where(valid, offsets[:-1, None] + m[None, :], 0)].long()

    return _padded_gather_reduce(g, rows_of, n, scales)


# -- custom ops ------------------------------------------------------------------------------------


@torch.library.custom_op(
    "unilora_hf::project_theta_native",
    mutates_args=(),
    schema="(Tensor theta_d, int seed, int D, int d, str backend) -> Tensor",
)
def _project_native_op(theta_d, seed, D, d, backend):
    return _readout_native(theta_d, seed, D, 0, D, backend)


@torch.library.custom_op(
    "unilora_hf::theta_grad_native",
    mutates_args=(),
    schema="(Tensor grad, int seed, int D, int d, str backend) -> Tensor",
)
def _grad_native_op(grad, seed, D, d, backend):
    return _grad_native(grad, seed, D, d, backend)


@torch.library.custom_op(
    "unilora_hf::project_theta_peft",
    mutates_args=(),
    schema="(Tensor theta_d, Tensor table, Tensor scales, Tensor csr_rows, Tensor csr_offsets, str backend) -> Tensor",
)
def _project_peft_op(theta_d, table, scales, csr_rows, csr_offsets, backend):
    return _readout_peft(theta_d, table, scales, 0, table.numel(), backend)


@torch.library.custom_op(
    "unilora_hf::theta_grad_peft",
    mutates_args=(),
    schema="(Tensor grad, Tensor table, Tensor scales, Tensor csr_rows, Tensor csr_offsets, str backend) -> Tensor",
)
def _grad_peft_op(grad, table, scales, csr_rows, csr_offsets, backend):
    return _grad_peft(grad, table, scales, csr_rows, csr_offsets, backend)


@_project_native_op.register_fake
def _(theta_d, seed, D, d, backend):
    return theta_d.new_empty((D,), dtype=torch.float32)


@_grad_native_op.register_fake
def _(grad, seed, D, d, backend):
    return grad.new_empty((d,), dtype=torch.float32)


@_project_peft_op.register_fake
def _(theta_d, table, scales, csr_rows, csr_offsets, backend):
    return theta_d.new_empty((table.shape[0],), dtype=torch.float32)


@_grad_peft_op.register_fake
def _(grad, table, scales, csr_rows, csr_offsets, backend):
    return grad.new_empty((scales.shape[0],), dtype=torch.float32)


def _setup_native(ctx, inputs, output):
    theta_d, ctx.seed, ctx.D, ctx.d, ctx.backend = inputs
    ctx.theta_dtype = theta_d.dtype


def _backward_native(ctx, grad):
    g = torch.ops.unilora_hf.theta_grad_native(grad, ctx.seed, ctx.D, ctx.d, ctx.backend)
    return g.to(ctx.theta_dtype), None, None, None, None


def _setup_peft(ctx, inputs, output):
    theta_d, table, scales, csr_rows, csr_offsets, ctx.backend = inputs
    ctx.theta_dtype = theta_d.dtype
    ctx.save_for_backward(table, scales, csr_rows, csr_offsets)


def _backward_peft(ctx, grad):
    g = torch.ops.unilora_hf.theta_grad_peft(grad, *ctx.saved_tensors, ctx.backend)
    return g.to(ctx.theta_dtype), None, None, None, None, None


_project_native_op.register_autograd(_backward_native, setup_context=_setup_native)
_project_peft_op.register_autograd(_backward_peft, setup_context=_setup_peft)


# -- public entry points ---------------------------------------------------------------------------


def _check_theta(theta_d: torch.Tensor, projection: Projection) -> None:
    if theta_d.dim() != 1 or theta_d.shape[0] != projection.d:
        raise ValueError(f"theta_d has shape {tuple(theta_d.shape)}; the projection needs ({projection.d},)")


def project_theta(theta_d: torch.Tensor, projection: Projection) -> torch.Tensor:
    """θ_D = P θ_d, float32 of length D, differentiable in ``theta_d`` (backward: Pᵀ g, deterministic).

    ``theta_d``: shape (d,), normally float32 (other float dtypes are read as float32; the gradient
    comes back in ``theta_d``'s dtype). Backend as in the module docstring, chosen now."""
    _check_theta(theta_d, projection)
    backend = resolve_backend(theta_d.device)
    if projection.kind == NATIVE:
        return torch.ops.unilora_hf.project_theta_native(theta_d, projection.seed, projection.D, projection.d, backend)
    table, scales = projection._peft_tensors(theta_d.device)
    if theta_d.requires_grad and torch.is_grad_enabled():
        rows, offsets = peft_csr(projection, theta_d.device)
    else:
        rows = offsets = table.new_empty((0,), dtype=torch.int64)
    return torch.ops.unilora_hf.project_theta_peft(theta_d, table, scales, rows, offsets, backend)


class _ProjectSlice(torch.autograd.Function):
    @staticmethod
    def forward(ctx, theta_d, projection, start, count):
        ctx.projection, ctx.start, ctx.theta_dtype = projection, start, theta_d.dtype
        return readout(theta_d, projection, start, count)

    @staticmethod
    def backward(ctx, grad):
        P = ctx.projection
        full = grad.new_zeros(P.D, dtype=torch.float32)
        full[ctx.start : ctx.start + grad.numel()] = grad
        return theta_grad(full, P).to(ctx.theta_dtype), None, None, None


def project_slice(theta_d: torch.Tensor, projection: Projection, start: int, count: int) -> torch.Tensor:
    """θ_D[start:start+count] (float32), differentiable in ``theta_d``, saving no tensor for backward.

    For one layer read on its own (outside the root's once-per-pass readout, e.g. when activation
    checkpointing re-runs a block inside backward). Backward: Pᵀ of the gradient zero-padded to length
    D (one deterministic ``theta_grad``, O(D) per call)."""
    return _ProjectSlice.apply(theta_d, projection, start, count)


def readout(theta_d: torch.Tensor, projection: Projection, start: int = 0, count: int | None = None) -> torch.Tensor:
    """θ_D[start:start+count] (float32, not differentiable) with the current backend; both backends give
    the same bits (each entry is the one float32 product ``θ_d[idx] · s(idx)``)."""
    _check_theta(theta_d, projection)
    count = projection.D - start if count is None else count
    if start < 0 or count < 0 or start + count > projection.D:
        raise IndexError(f"positions [{start}, {start + count}) lie outside [0, {projection.D})")
    backend = resolve_backend(theta_d.device)
    with torch.no_grad():
        if projection.kind == NATIVE:
            return _readout_native(theta_d, projection.seed, projection.D, start, count, backend)
        table, scales = projection._peft_tensors(theta_d.device)
        return _readout_peft(theta_d, table, scales, start, count, backend)


def theta_grad(grad_theta_D: torch.Tensor, projection: Projection) -> torch.Tensor:
    """Pᵀ g for g over all D positions (float32, bfloat16 or float16): float32 of length d,
    deterministic, with the current backend."""
    if grad_theta_D.numel() != projection.D:
        raise ValueError(f"the gradient has {grad_theta_D.numel()} entries, the projection D = {projection.D}")
    g = grad_theta_D.reshape(-1)
    backend = resolve_backend(g.device)
    if projection.kind == NATIVE:
        return _grad_native(g, projection.seed, projection.D, projection.d, backend)
    table, scales = projection._peft_tensors(g.device)
    rows, offsets = peft_csr(projection, g.device)
    return _grad_peft(g, table, scales, rows, offsets, backend)


def native_indices(projection: Projection, start: int = 0, count: int | None = None, device="cpu") -> torch.Tensor:
    """idx(i) for i in [start, start+count), int64 on ``device``, with the current backend (native kind:
    the Triton backend evaluates π in a kernel; bit-identical to ``projection.indices``)."""
    count = projection.D - start if count is None else count
    if projection.kind != NATIVE or resolve_backend(device) != "triton":
        return projection.indices(start, count, device=device)
    if start < 0 or count < 0 or start + count > projection.D:
        raise IndexError(f"positions [{start}, {start + count}) lie outside [0, {projection.D})")
    kernels = _kernels(torch.device(device))
    return kernels.native_indices(projection.seed, projection.D, projection.d, start, count, device)


def merge_delta_(
    weight: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    *,
    sign: float = 1.0,
    fan_in_fan_out: bool = False,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``out = round(weight + sign · ΔW)`` with ΔW = B A (transposed for ``fan_in_fan_out``) formed in
    float32 and the sum rounded once to the weight's dtype; ``out`` defaults to ``weight`` (in place).
    A (r×in) and B (out×r) float32. Triton Kernel C on CUDA, the reference elsewhere (they can differ
    in the last float32 bit of ΔW: the reference sums the r products in BLAS order)."""
    out = weight if out is None else out
    backend = resolve_backend(weight.device)
    with torch.no_grad():
        if backend == "triton":
            return _kernels(weight.device).merge_delta(weight, out, A, B, sign, fan_in_fan_out)
        delta = reference.delta_weight(A.float(), B.float(), fan_in_fan_out)
        merged = weight.float() + delta if sign > 0 else weight.float() - delta
        return out.copy_(merged.to(weight.dtype))
