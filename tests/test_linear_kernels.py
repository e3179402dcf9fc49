"""Kernels D/E (``unilora_hf.kernels.linear_kernels``, the fused adapted linear) against float64 maths
and against the PyTorch path of ``lora_linear.frozen_linear_lora``.

CPU tests run the kernels in Triton's interpreter (``TRITON_INTERPRET=1``, set by conftest; on a CUDA
machine, the interpreter switch per test) on small odd shapes: M, N, K not multiples of the 16-wide
interpreter tiles, r = 1, r = 16 (one padded tile) and r = 17 (two), A and B as unaligned views of one flat buffer (as the per-pass
readout gives them). ``TestCuda`` (marker ``gpu``) runs the compiled kernels with the GPU tile sizes,
per dtype, and checks the direct launch path against Triton's own.

Tolerances: the kernels round y (or dx) once from a float32 accumulator, after rounding h = x Aᵀ (or
gB = g B) to the activation dtype, as the unfused ops do. Against float64 maths with the same rounding
of h, the error is at most a few units in the last place of the output dtype: ``atol = c · ε · scale``
with ε the machine epsilon (2^-7 bfloat16, 2^-10 float16, 2^-23 float32) and scale the largest |output|;
for float32 the accumulation error dominates (c = 16 on CPU shapes).
"""

import pytest
import torch
import triton  # noqa: F401

from unilora_hf import UniLoraConfig, inject_adapter
from unilora_hf.kernels import force_backend, lora_linear
from unilora_hf.kernels import linear_kernels as lk
from unilora_hf.kernels import dispatch
from unilora_hf.model import unwrap

from models import tiny_llama, tokens

EPS = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10, torch.float32: 2.0**-23}  # machine epsilon
# (M, N, K, r): odd tails everywhere, r = 1, one full padded rank tile, a rank needing two
SHAPES = [(37, 29, 45, 3), (5, 70, 33, 1), (20, 17, 19, 16), (18, 33, 40, 17), (1, 16, 16, 2)]


@pytest.fixture(autouse=True)
def _auto_backend(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)


def _operands(M, N, K, r, dtype, device="cpu", seed=0):
    """x, W, b, A, B, g with A and B cut from one flat buffer at odd offsets (unaligned views)."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype)

    flat = rnd(3 + r * K + N * r, scale=0.3).to(device)
    A = flat[3 : 3 + r * K].view(r, K)
    B = flat[3 + r * K :].view(N, r)
    return (rnd(M, K).to(device), rnd(N, K, scale=K**-0.5).to(device), rnd(N).to(device), A, B,
            rnd(M, N).to(device))


def _want(x, W, b, A, B, g):
    """float64 maths with h and gB rounded to the activation dtype, as the kernels and unfused ops do."""
    dt = x.dtype
    x, W, A, B, g = (t.double().cpu() for t in (x, W, A, B, g))
    h = (x @ A.T).to(dt).double()
    y = x @ W.T + h @ B.T + (0 if b is None else b.double().cpu())
    gB = (g @ B).to(dt).double()
    return y, h, g @ W + gB @ A, gB


def _assert_ulps(got, want, dtype, ulps):
    """float32 outputs carry the float32 accumulation error of ~K terms (16 ulps here) instead."""
    ulps = (16 if got.device.type == "cpu" else 128) if dtype == torch.float32 else ulps
    scale = max(1.0, float(want.abs().max()))
    torch.testing.assert_close(got.double().cpu(), want, rtol=0, atol=ulps * EPS[dtype] * scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("M,N,K,r", SHAPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_kernels_match_float64(M, N, K, r, dtype, with_bias):
    k = lk.for_device("cpu")
    assert k.interpreted()
    x, W, b, A, B, g = _operands(M, N, K, r, dtype)
    b = b if with_bias else None
    y_want, h_want, dx_want, gb_want = _want(x, W, b, A, B, g)
    y, h = k.forward(x, W, b, A, B, keep_h=True)
    assert y.dtype == h.dtype == dtype and y.shape == (M, N) and h.shape == (M, r)
    _assert_ulps(h, h_want, dtype, 1)
    _assert_ulps(y, y_want, dtype, 2)
    dx, gb = k.dgrad(g, W, A, B, keep_gb=True)
    assert dx.shape == (M, K) and gb.shape == (M, r)
    _assert_ulps(gb, gb_want, dtype, 1)
    _assert_ulps(dx, dx_want, dtype, 2)
    assert k.forward(x, W, b, A, B, keep_h=False)[1] is None
    assert torch.equal(k.forward(x, W, b, A, B, keep_h=False)[0], y)


def test_kernels_take_transposed_strides():
    """A transposed (column-major) x and g are read through their strides, not copied."""
    k = lk.for_device("cpu")
    x, W, b, A, B, g = _operands(21, 18, 23, 2, torch.float32)
    xt, gt = x.T.contiguous().T, g.T.contiguous().T
    assert not xt.is_contiguous()
    torch.testing.assert_close(k.forward(xt, W, b, A, B, True)[0], k.forward(x, W, b, A, B, True)[0])
    torch.testing.assert_close(k.dgrad(gt, W, A, B, True)[0], k.dgrad(g, W, A, B, True)[0])


def test_bad_operands_are_refused():
    k = lk.for_device("cpu")
    x, W, b, A, B, g = _operands(4, 5, 6, 2, torch.float32)
    with pytest.raises(TypeError, match="one of float32/bfloat16/float16"):
        k.forward(x.double(), W, b, A, B, True)
    with pytest.raises(ValueError, match="ranks 1..128"):
        A2 = torch.zeros(129, 6)
        k.forward(x, W, b, A2, torch.zeros(5, 129), True)


@pytest.mark.parametrize("kernel_e", [False, True], ids=["dx-gemms", "kernel-e"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fused_function_gradients_match_the_pytorch_path(dtype, kernel_e, monkeypatch):
    """``frozen_linear_lora`` on the triton backend (Kernel D forward in one autograd.Function; dx by
    GEMMs or by Kernel E) against the same call on the reference backend (PyTorch ops, autograd's
    backward), inputs requiring grad in every combination."""
    monkeypatch.setattr(lora_linear, "_KERNEL_E", kernel_e)
    x0, W, b, A0, B0, g = _operands(19, 22, 27, 3, dtype, seed=3)
    for need in [(True, True, True), (False, True, True), (True, False, False), (False, True, False)]:
        outs = {}
        for backend in ("triton", "reference"):
            x, A, B = (t.detach().clone().requires_grad_(n) for t, n in zip((x0, A0, B0), need))
            with force_backend(backend):
                y = lora_linear.frozen_linear_lora(x.view(1, 19, 27), W, b, A, B)
            grads = torch.autograd.grad(y, [t for t in (x, A, B) if t.requires_grad], g.view(1, 19, 22)) if any(need) else ()
            outs[backend] = (y.detach(), *grads)
        for got, want in zip(outs["triton"], outs["reference"]):
            scale = max(1.0, float(want.abs().max()))
            torch.testing.assert_close(got.double(), want.double(), rtol=0, atol=4 * EPS[dtype] * scale)


def test_fused_path_is_used_only_where_it_applies():
    calls = []
    real = lk._FORWARD.launch
    lk._FORWARD.launch = lambda *a, **kw: (calls.append(1), real(*a, **kw))[1]
    try:
        x, W, b, A, B, _ = _operands(6, 7, 8, 2, torch.float32)
        with force_backend("triton"):
            lora_linear.frozen_linear_lora(x, W, b, A, B)
            assert len(calls) == 1
            lora_linear.frozen_linear_lora(x.double(), W.double(), None, A.double(), B.double())
            assert len(calls) == 1  # float64: the PyTorch ops
        lora_linear.frozen_linear_lora(x, W, b, A, B)  # CPU, automatic backend: reference
        assert len(calls) == 1
    finally:
        lk._FORWARD.launch = real


@pytest.mark.parametrize("kernel_e", [False, True], ids=["dx-gemms", "kernel-e"])
def test_model_theta_gradient_on_the_fused_path_matches_the_reference_backend(kernel_e, monkeypatch):
    """A tiny Llama, every linear adapted: logits and the θ_d gradient with Kernels D (and E)
    interpreted equal the reference backend's to float32 rounding."""
    monkeypatch.setattr(lora_linear, "_KERNEL_E", kernel_e)
    torch.manual_seed(0)
    model = tiny_llama()
    inject_adapter(model, UniLoraConfig(r=2, theta_d_length=61, target_modules="all-linear"))
    theta = unwrap(model).unilora_adapter.theta_d
    ids = tokens(model)
    results = {}
    for backend in ("triton", "reference"):
        theta.grad = None
        with force_backend(backend):
            logits = model(input_ids=ids).logits
            (logits * torch.linspace(-1, 1, logits.shape[-1])).sum().backward()
        results[backend] = (logits.detach(), theta.grad.clone())
    for got, want in zip(results["triton"], results["reference"]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    assert results["triton"][1].abs().sum() > 0


# -- CUDA ----------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
class TestCuda:
    """Compiled Kernels D/E with the GPU tiles (large and small M), per dtype."""

    # M ≤ 16 takes the decoding tiles: N < K and N = K (_DECODE), N > K (_DECODE_WIDE)
    GPU_SHAPES = [(4096, 2048, 2048, 16), (1000, 5632, 2048, 16), (4096, 256, 2048, 8), (7, 2048, 5632, 16),
                  (1, 2048, 2048, 1), (3, 5632, 2048, 16), (333, 999, 777, 33)]

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
    @pytest.mark.parametrize("M,N,K,r", GPU_SHAPES)
    def test_kernels_match_float64(self, M, N, K, r, dtype):
        k = lk.for_device("cuda")
        assert not k.interpreted()
        x, W, b, A, B, g = _operands(M, N, K, r, dtype, device="cuda")
        y_want, h_want, dx_want, gb_want = _want(x, W, b, A, B, g)
        first = k.forward(x, W, b, A, B, keep_h=True)  # unaligned views of A, B: Triton's own launch
        A, B = A.clone(), B.clone()
        k._FORWARD_PLANS.clear()
        k.forward(x, W, b, A, B, keep_h=True)
        assert len(k._FORWARD_PLANS) == 1 and k._FORWARD.cached(next(iter(k._FORWARD_PLANS))) is not None
        y, h = k.forward(x, W, b, A, B, keep_h=True)  # the direct launch path
        assert torch.equal(first[0], y) and torch.equal(first[1], h)
        # tensor-core float32 accumulation over K terms: a K-dependent bound for the products
        ulps = 4
        _assert_ulps(h, h_want, dtype, ulps)
        _assert_ulps(y, y_want, dtype, ulps)
        first = k.dgrad(g, W, A, B, keep_gb=True)
        dx, gb = k.dgrad(g, W, A, B, keep_gb=True)
        assert torch.equal(first[0], dx) and torch.equal(first[1], gb)
        _assert_ulps(gb, gb_want, dtype, ulps)
        _assert_ulps(dx, dx_want, dtype, ulps)

    @pytest.mark.parametrize("kernel_e", [False, True], ids=["dx-gemms", "kernel-e"])
    def test_training_step_matches_the_pytorch_path(self, kernel_e, monkeypatch):
        monkeypatch.setattr(lora_linear, "_KERNEL_E", kernel_e)
        torch.manual_seed(0)
        model = tiny_llama().cuda().to(torch.bfloat16)
        inject_adapter(model, UniLoraConfig(r=4, theta_d_length=257, target_modules="all-linear"))
        theta = unwrap(model).unilora_adapter.theta_d
        ids = tokens(model).cuda()
        grads = {}
        for backend in ("triton", "reference"):
            theta.grad = None
            with force_backend(backend):
                model(input_ids=ids, labels=ids).loss.backward()
            grads[backend] = theta.grad.clone()
        cos = torch.nn.functional.cosine_similarity(grads["triton"], grads["reference"], dim=0)
        assert cos > 0.999, cos
