"""The Triton kernels of the projection (``unilora_hf.kernels``) against the reference and the spec.

CPU tests run the kernels in Triton's interpreter (``TRITON_INTERPRET=1``, set by conftest before
triton is imported; on a CUDA machine, the interpreter switch per test), on small odd shapes. ``TestCuda``
(marker ``gpu``) runs the compiled kernels on CUDA.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import triton  # noqa: F401

from unilora_hf.kernels import (
    dispatch,
    force_backend,
    native_indices,
    peft_csr,
    project_theta,
    readout,
    resolve_backend,
    theta_grad,
)
from unilora_hf.kernels import projection_kernels as pk
from unilora_hf.projection import Projection

VECTORS = json.loads((Path(__file__).parent / "data" / "projection_vectors.json").read_text())
KINDS = ["native", "peft"]
# D = d = 1, D < d, d = 1 with D ≫ d, D not a multiple of the block (1024), several column blocks
SHAPES = [(1, 1), (7, 3), (50, 100), (2999, 1), (3001, 7), (1000, 37), (700, 260)]
SHAPE_IDS = [f"D{D}-d{d}" for D, d in SHAPES]


def dense_grad(P: Projection, g: torch.Tensor) -> torch.Tensor:
    """Pᵀ g in float64 from the dense matrix."""
    return P.dense(torch.float64).T @ g.double().cpu()


def reference_readout(theta: torch.Tensor, P: Projection, start: int = 0, count: int | None = None) -> torch.Tensor:
    count = P.D - start if count is None else count
    idx = P.indices(start, count, device=theta.device)
    return theta[idx] * P.scales_of(idx)


def assert_grad_close(got: torch.Tensor, want64: torch.Tensor, terms: int) -> None:
    """float32 accumulation of ``terms`` values of size ~1: error well below terms·2^-24."""
    assert got.dtype == torch.float32
    tol = 4e-7 * max(1, terms) ** 0.5 * max(1.0, float(want64.abs().max()))
    torch.testing.assert_close(got.double().cpu(), want64, rtol=0, atol=tol)


@pytest.fixture(autouse=True)
def _auto_backend(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)


# -- spec and test vectors -----------------------------------------------------------------------


@pytest.mark.parametrize("v", VECTORS, ids=lambda v: f"seed{v['seed']}-D{v['D']}-d{v['d']}")
def test_native_kernels_match_test_vectors(v):
    P = Projection.build("native", v["seed"], v["D"], v["d"])
    pos = torch.tensor(v["positions"], dtype=torch.int64)
    k = pk.for_device("cpu")
    assert k.interpreted()
    assert k.native_permute(pos, v["seed"], v["D"]).tolist() == v["pi"]
    assert k.native_permute(torch.tensor(v["pi"]), v["seed"], v["D"], inverse=True).tolist() == v["positions"]
    with force_backend("triton"):
        idx = [int(native_indices(P, p, 1)[0]) for p in v["positions"]]
        assert idx == v["idx"]
        theta = torch.randn(v["d"])
        out = torch.cat([readout(theta, P, p, 1) for p in v["positions"]])
    idx = torch.tensor(v["idx"])
    scale = torch.tensor(v["scales"])[(idx >= v["D"] % v["d"]).long()]  # [s(big column), s(small column)]
    assert torch.equal(out, theta[idx] * scale)


@pytest.mark.parametrize("D,d", SHAPES, ids=SHAPE_IDS)
def test_native_permutation_and_indices_bit_identical(D, d):
    P = Projection.build("native", 1234, D, d)
    pos = torch.arange(D)
    k = pk.for_device("cpu")
    pi = k.native_permute(pos, P.seed, D)
    assert torch.equal(pi, P.permute(pos))
    assert torch.equal(k.native_permute(pi, P.seed, D, inverse=True), pos)
    with force_backend("triton"):
        assert torch.equal(native_indices(P), P.indices(0, D))
        assert torch.equal(native_indices(P, D // 3, D - D // 3 - 1), P.indices(D // 3, D - D // 3 - 1))


# -- Kernel A: readout ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("D,d", SHAPES, ids=SHAPE_IDS)
def test_readout_bit_identical_to_reference(kind, D, d):
    P = Projection.build(kind, 77, D, d)
    theta = torch.randn(d)
    with force_backend("triton"):
        full = readout(theta, P)
        start, count = D // 2, D - D // 2 - (1 if D > 2 else 0)
        part = readout(theta, P, start, count)
    assert full.dtype == torch.float32 and full.shape == (D,)
    assert torch.equal(full, reference_readout(theta, P))
    assert torch.equal(part, reference_readout(theta, P, start, count))
    with force_backend("reference"):
        assert torch.equal(readout(theta, P), full)


def test_readout_range_crossing_blocks():
    P = Projection.build("native", 3, 5000, 19)
    theta = torch.randn(19)
    with force_backend("triton"):
        got = readout(theta, P, 1023, 2050)
    assert torch.equal(got, reference_readout(theta, P, 1023, 2050))
    with pytest.raises(IndexError):
        readout(theta, P, 4000, 1001)


def test_readout_with_the_compiled_lane_settings(monkeypatch):
    """The interpreter's readout runs wider programs than CUDA's (`INTERPRETED_READOUT_*`); CUDA's settings, in the
    interpreter: several programs, a partial last one, lanes whose outputs end at different passes."""
    k = pk.for_device("cpu")
    monkeypatch.setattr(k, "INTERPRETED_READOUT_LANES", k.READOUT_LANES)
    monkeypatch.setattr(k, "INTERPRETED_READOUT_QUEUE", k.READOUT_QUEUE)
    P = Projection.build("native", 8, 3 * k.READOUT_LANES * k.READOUT_QUEUE + 77, 301)  # D = 1,613 at 64 × 8
    theta = torch.randn(P.d)
    assert k._readout_launch(P.D)[0] == (4,)
    with force_backend("triton"):
        assert torch.equal(readout(theta, P), reference_readout(theta, P))
        assert torch.equal(readout(theta, P, 500, 700), reference_readout(theta, P, 500, 700))
        assert torch.equal(native_indices(P), P.indices(0, P.D))


@pytest.mark.parametrize("D,d", [(3001, 7), (700, 260)])
def test_wide_and_narrow_integer_paths_agree(monkeypatch, D, d):
    """Below 2^32 the native kernels run the permutation in uint32; the int64 form must give the same bits."""
    P = Projection.build("native", 2**40 + 12345, D, d)
    k = pk.for_device("cpu")
    theta, g, pos = torch.randn(d), torch.randn(D), torch.arange(D)
    assert k.narrow(D) and not k.narrow(2**32)
    with force_backend("triton"):
        narrow = (k.native_permute(pos, P.seed, D), readout(theta, P), theta_grad(g, P))
        monkeypatch.setattr(k, "narrow", lambda D: False)
        wide = (k.native_permute(pos, P.seed, D), readout(theta, P), theta_grad(g, P))
    assert torch.equal(narrow[0], P.permute(pos)) and torch.equal(narrow[1], reference_readout(theta, P))
    for a, b in zip(narrow, wide):
        assert torch.equal(a.view(-1).view(torch.int32 if a.dtype == torch.float32 else a.dtype),
                           b.view(-1).view(torch.int32 if b.dtype == torch.float32 else b.dtype))


def test_domain_beyond_32_bits_uses_the_int64_path():
    D, start = 3 * 2**31 + 5, 2**32 - 7  # D ≥ 2^32: not narrow; positions on both sides of 2^32
    P = Projection.build("native", 2**63 - 1, D, 1000)
    k = pk.for_device("cpu")
    pos = torch.arange(start, start + 50)
    assert not k.narrow(D)
    assert torch.equal(k.native_permute(pos, P.seed, D), P.permute(pos))
    with force_backend("triton"):
        assert torch.equal(native_indices(P, start, 50), P.indices(start, 50))


# -- Kernel B: gradient --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("D,d", SHAPES, ids=SHAPE_IDS)
def test_theta_grad_matches_dense_and_is_deterministic(kind, D, d):
    P = Projection.build(kind, 5, D, d)
    g = torch.randn(D)
    with force_backend("triton"):
        first = theta_grad(g, P)
        second = theta_grad(g, P)
    assert first.shape == (d,)
    assert torch.equal(first.view(torch.int32), second.view(torch.int32))
    assert_grad_close(first, dense_grad(P, g), -(-D // d))
    unused = torch.bincount(P.indices(0, D), minlength=d) == 0
    assert bool(unused.any()) == (D < d) and torch.all(first[unused] == 0)


@pytest.mark.parametrize("kind", KINDS)
def test_theta_grad_bfloat16(kind):
    P = Projection.build(kind, 11, 2500, 9)
    g = torch.randn(2500).bfloat16()
    with force_backend("triton"):
        got = theta_grad(g, P)
    assert_grad_close(got, dense_grad(P, g.double()), 2500 // 9 + 1)


def test_grad_plan_splits_long_columns():
    bj, bm, iters, splits = pk.peft_grad_plan(2999, 1)
    assert (bj, bm) == (1, 1024) and splits * iters * bm >= 2999 and splits > 1
    assert pk.peft_grad_plan(700, 260)[3] == 1


@pytest.mark.parametrize("D,d", SHAPES + [(12_615_680, 2**19), (39_976_960, 2**19), (10**6, 3)], ids=str)
def test_native_grad_plan_covers_every_row_once(D, d):
    """Each column's m range is cut into segments of ``seg`` rows, SUB per program and ``splits`` programs along m:
    together they cover [0, m_max) with no program left empty, and the lanes hold BJ columns × SUB segments."""
    bj, sub, seg, splits = pk.native_grad_plan(D, d)
    m_max = -(-D // d)
    assert bj * sub == pk.GRAD_LANES and bj < 2 * d
    assert splits * sub * seg >= m_max > (splits - 1) * sub * seg


def test_peft_csr_is_cached_inverse():
    P = Projection.build("peft", 9, 1001, 13)
    rows, offsets = peft_csr(P, "cpu")
    assert peft_csr(P, "cpu")[0] is rows
    assert rows.dtype == torch.int32 and rows.numel() == P.D
    assert offsets.dtype == torch.int64 and offsets.numel() == P.d + 1
    for j in range(P.d):
        assert torch.equal(rows[offsets[j] : offsets[j + 1]].long(), P.column_rows(j))
    with pytest.raises(ValueError):
        peft_csr(Projection.build("native", 9, 1001, 13), "cpu")


# -- project_theta (autograd) --------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("D,d", [(1, 1), (50, 100), (2999, 1), (3001, 7)], ids=lambda x: str(x))
def test_project_theta_autograd_both_backends(kind, D, d):
    P = Projection.build(kind, 21, D, d)
    w = torch.randn(D)
    theta0 = torch.randn(d)
    outs, grads = {}, {}
    for backend in ("triton", "reference"):
        theta = theta0.clone().requires_grad_(True)
        with force_backend(backend):
            y = project_theta(theta, P)
        (y * w).sum().backward()  # outside the block: the backward keeps the forward's backend
        outs[backend], grads[backend] = y.detach(), theta.grad
    assert torch.equal(outs["triton"], outs["reference"])
    assert torch.equal(outs["triton"], reference_readout(theta0, P))
    want = dense_grad(P, w)
    for backend in ("triton", "reference"):
        assert_grad_close(grads[backend], want, -(-D // d))


def test_backward_uses_the_forward_backend(monkeypatch):
    P = Projection.build("native", 2, 300, 7)
    seen = []
    real = dispatch._grad_native
    monkeypatch.setattr(dispatch, "_grad_native", lambda g, s, D, d, b: seen.append(b) or real(g, s, D, d, b))
    theta = torch.randn(7, requires_grad=True)
    with force_backend("triton"):
        y = project_theta(theta, P)
    with force_backend("reference"):
        y.sum().backward()
    assert seen == ["triton"]


def test_project_theta_non_float32_theta():
    P = Projection.build("peft", 4, 600, 31)
    theta = torch.randn(31, dtype=torch.float64, requires_grad=True)
    with force_backend("triton"):
        y = project_theta(theta, P)
        y.sum().backward()
    assert y.dtype == torch.float32 and theta.grad.dtype == torch.float64
    assert torch.equal(y, reference_readout(theta.detach().float(), P))


def test_project_theta_shape_check():
    with pytest.raises(ValueError):
        project_theta(torch.zeros(5), Projection.build("native", 0, 10, 4))


@pytest.mark.parametrize("kind", KINDS)
def test_torch_compile_fullgraph(kind):
    P = Projection.build(kind, 8, 500, 23)
    w = torch.randn(500)

    def loss(theta):
        return (project_theta(theta, P) * w).sum()

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    for backend in ("triton", "reference"):
        theta = torch.randn(23, requires_grad=True)
        with force_backend(backend):
            compiled(theta).backward()
        assert_grad_close(theta.grad, dense_grad(P, w), 500 // 23 + 1)


# -- backend selection ---------------------------------------------------------------------------


def test_backend_selection(monkeypatch):
    assert resolve_backend("cpu") == "reference"
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    assert resolve_backend("cpu") == "triton"
    with force_backend("reference"):
        assert resolve_backend("cpu") == "reference"
        with force_backend(None):
            assert resolve_backend("cpu") == "triton"
        assert resolve_backend("cpu") == "reference"
    monkeypatch.setenv(dispatch.ENV_VAR, "auto")
    assert resolve_backend("cpu") == "reference"
    monkeypatch.setenv(dispatch.ENV_VAR, "fast")
    with pytest.raises(ValueError):
        resolve_backend("cpu")
    with pytest.raises(ValueError):
        with force_backend("cuda"):
            pass


def _run_python(code: str, env_update: dict) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", dispatch.ENV_VAR)}
    env.update(env_update)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True, timeout=120
    )


def test_without_triton_and_without_interpreter():
    """In a fresh process: the package imports without triton, the reference works, asking for triton
    gives the install hint; with triton but no interpreter, CPU tensors are refused clearly. (The
    process stubs the top-level ``unilora_hf`` package to skip its heavy ``__init__``.)"""
    code = f"""
        import sys, types
        sys.modules["triton"] = None
        pkg = types.ModuleType("unilora_hf")
        pkg.__path__ = [{str(Path(dispatch.__file__).parents[1])!r}]
        sys.modules["unilora_hf"] = pkg
        import torch
        from unilora_hf.projection import Projection
        from unilora_hf.kernels import force_backend, project_theta, triton_available
        assert not triton_available()
        P = Projection.build("native", 1, 40, 6)
        theta = torch.randn(6, requires_grad=True)
        project_theta(theta, P).sum().backward()
        try:
            with force_backend("triton"):
                project_theta(theta, P)
        except ImportError as e:
            assert 'pip install "unilora_hf[triton]"' in str(e), e
        else:
            raise AssertionError("no ImportError")
        del sys.modules["triton"]
        try:
            with force_backend("triton"):
                project_theta(theta, P)
        except RuntimeError as e:
            assert "TRITON_INTERPRET=1" in str(e), e
        else:
            raise AssertionError("no RuntimeError")
        assert "triton" in sys.modules
        print("ok")
    """
    result = _run_python(code, {})
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


# -- CUDA ----------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
class TestCuda:
    """The compiled kernels on CUDA (the interpreter flag set above only affects CPU tensors)."""

    DEV = "cuda"
    GPU_SHAPES = [(1, 1), (50, 100), (2999, 1), (1000, 37), (300007, 23040), (1_000_003, 3), (2_000_000, 1000)]

    @staticmethod
    def exact_grad64(P: Projection, g: torch.Tensor) -> torch.Tensor:
        idx = P.indices(0, P.D)
        return torch.zeros(P.d, dtype=torch.float64).index_add_(0, idx, g.double().cpu() * P.scales_of(idx).double())

    def test_compiled_module(self):
        from unilora_hf.kernels.triton_modes import interpreter_switch

        k = pk.for_device(self.DEV)
        assert not k.interpreted()
        with interpreter_switch(True):  # CPU tensors: only with the interpreter opted in
            assert pk.for_device("cpu").interpreted()

    @pytest.mark.parametrize("v", VECTORS, ids=lambda v: f"seed{v['seed']}-D{v['D']}-d{v['d']}")
    def test_native_indices_cpu_vs_gpu(self, v):
        P = Projection.build("native", v["seed"], v["D"], v["d"])
        pos = torch.tensor(v["positions"], device=self.DEV)
        k = pk.for_device(self.DEV)
        assert k.native_permute(pos, v["seed"], v["D"]).tolist() == v["pi"]
        with force_backend("triton"):
            gpu = native_indices(P, device=self.DEV)
        assert gpu.device.type == "cuda"
        assert gpu[pos].tolist() == v["idx"]
        assert torch.equal(gpu.cpu(), P.indices(0, P.D))
        pi = P.permute(torch.arange(P.D, device=self.DEV))
        assert torch.equal(k.native_permute(pi, v["seed"], v["D"], inverse=True).cpu(), torch.arange(P.D))

    def test_native_indices_large_seed_and_domain(self):
        P = Projection.build("native", 2**63 - 1, 3 * 2**31 + 5, 1000)
        start = 2**32 - 7
        with force_backend("triton"):
            gpu = native_indices(P, start, 100_000, device=self.DEV)
        assert torch.equal(gpu.cpu(), P.indices(start, 100_000))

    @pytest.mark.parametrize("kind", KINDS)
    @pytest.mark.parametrize("D,d", GPU_SHAPES, ids=lambda x: str(x))
    def test_readout_and_grad(self, kind, D, d):
        P = Projection.build(kind, 13, D, d)
        theta = torch.randn(d)
        g = torch.randn(D)
        with force_backend("triton"):
            out = readout(theta.to(self.DEV), P)
            part = readout(theta.to(self.DEV), P, D // 3, D - D // 3)
            dtypes = (torch.float32, torch.bfloat16)
            grads = {dt: [theta_grad(g.to(self.DEV, dt), P) for _ in range(2)] for dt in dtypes}
        assert torch.equal(out.cpu(), reference_readout(theta, P))
        assert torch.equal(part.cpu(), reference_readout(theta, P, D // 3, D - D // 3))
        with force_backend("reference"):
            assert torch.equal(readout(theta.to(self.DEV), P).cpu(), out.cpu())
        for dt, (a, b) in grads.items():
            assert torch.equal(a, b)
            assert_grad_close(a, self.exact_grad64(P, g.to(dt)), -(-D // d))

    @pytest.mark.parametrize("kind", KINDS)
    def test_project_theta_and_reference_on_cuda(self, kind):
        P = Projection.build(kind, 17, 200_003, 777)
        w = torch.randn(P.D)
        want = self.exact_grad64(P, w)
        grads = {}
        for backend in ("triton", "reference", None):
            theta = torch.randn(P.d, device=self.DEV, requires_grad=True)
            with force_backend(backend):
                y = project_theta(theta, P)
            (y * w.to(self.DEV)).sum().backward()
            grads[backend] = theta.grad
            assert_grad_close(theta.grad, want, -(-P.D // P.d))
        assert resolve_backend(self.DEV) == "triton"
        assert torch.equal(grads[None], grads["triton"])
        theta = torch.randn(P.d, device=self.DEV)
        with force_backend("reference"):
            again = [theta_grad(w.to(self.DEV), P) for _ in range(2)]
        assert torch.equal(again[0], again[1])

    @pytest.mark.parametrize("kind", KINDS)
    def test_torch_compile_cuda(self, kind):
        P = Projection.build(kind, 8, 5000, 23)
        w = torch.randn(5000, device=self.DEV)

        def loss(theta):
            return (project_theta(theta, P) * w).sum()

        compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
        theta = torch.randn(23, device=self.DEV, requires_grad=True)
        compiled(theta).backward()
        assert_grad_close(theta.grad, dense_grad(P, w.cpu()), 5000 // 23 + 1)


# -- Kernel C: merge ---------------------------------------------------------------------------------


MERGE_SHAPES = [(1, 1, 1), (33, 130, 1), (129, 37, 4), (5, 300, 16)]


def _merge_case(n_out, n_in, r, dtype, fifo, device="cpu"):
    g = torch.Generator().manual_seed(n_out * 1000 + n_in + r)
    A = torch.randn(r, n_in, generator=g)
    B = torch.randn(n_out, r, generator=g)
    shape = (n_in, n_out) if fifo else (n_out, n_in)
    W = torch.randn(shape, generator=g).to(dtype)
    return W.to(device), A.to(device), B.to(device)


@pytest.mark.parametrize("n_out,n_in,r", MERGE_SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("fifo", [False, True], ids=["linear", "conv1d"])
def test_merge_kernel_matches_reference(n_out, n_in, r, dtype, fifo):
    W, A, B = _merge_case(n_out, n_in, r, dtype, fifo)
    with force_backend("reference"):
        want = dispatch.merge_delta_(W, A, B, fan_in_fan_out=fifo, out=torch.empty_like(W))
    delta = (B.double() @ A.double()).T if fifo else B.double() @ A.double()
    magnitude = B.double().abs() @ A.double().abs()
    magnitude = magnitude.T if fifo else magnitude
    exact = W.double() + delta
    with force_backend("triton"):
        got = dispatch.merge_delta_(W.clone(), A, B, fan_in_fan_out=fifo)
        back = dispatch.merge_delta_(got.clone(), A, B, sign=-1.0, fan_in_fan_out=fifo)
    # both round an r-term float32 ΔW (summed in their own order) plus W once to the dtype: within one
    # rounding step of the dtype, plus float32 error of ΔW, of the exact sum
    step = torch.finfo(dtype).eps * exact.abs() + 4 * r * 2**-24 * (W.double().abs() + magnitude) + 1e-30
    for merged in (want, got):
        assert merged.dtype == dtype and merged.shape == W.shape
        assert ((merged.double() - exact).abs() <= step).all()
    if dtype == torch.float32:
        torch.testing.assert_close(back, W, rtol=1e-5, atol=1e-5 * float(delta.abs().max()))


def test_merge_kernel_writes_only_the_weight_and_handles_strided_views():
    W, A, B = _merge_case(40, 70, 3, torch.float32, False)
    big = torch.zeros(40, 90)
    view = big[:, 10:80]
    view.copy_(W)
    with force_backend("triton"):
        dispatch.merge_delta_(view, A, B)
    torch.testing.assert_close(view, W + B @ A, rtol=1e-6, atol=1e-5)
    assert big[:, :10].abs().sum() == 0 and big[:, 80:].abs().sum() == 0
