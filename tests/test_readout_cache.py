"""θ_D kept between inference passes (``unilora_hf.kernels.readout_cache``): equal to the readout of the θ_d of the
moment, rounded once to the cache's dtype, and read out again only when θ_d's bits change.

CPU cases run both backends (the Triton kernels in the interpreter, and the reference); a value written into the
cached θ_D between two refreshes shows whether the second one read out again. ``TestCuda`` (marker ``gpu``) runs
the compiled kernels and replays a captured CUDA graph.
"""

from __future__ import annotations

import pytest
import torch

from unilora_hf import UniLoraConfig, get_adapter, inject_adapter
from unilora_hf.kernels import dispatch, force_backend, readout
from unilora_hf.kernels import readout_cache as rc
from unilora_hf.projection import Projection

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SENTINEL = 7.0


@pytest.fixture(autouse=True)
def _auto_backend(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


def assert_same_bits(got: torch.Tensor, want: torch.Tensor) -> None:
    """Bit for bit, except that a NaN only has to be a NaN (devices write different NaN payloads)."""
    assert got.dtype == want.dtype and got.shape == want.shape
    nan = want.isnan()
    assert torch.equal(got.isnan(), nan)
    assert torch.equal(bits(got)[~nan], bits(want)[~nan])


def refresh_round(backend: str, kind: str, dtype: torch.dtype, D: int, d: int, device: str = "cpu") -> None:
    """First refresh reads out; an unchanged θ_d leaves θ_D alone; each kind of change reads out again."""
    P = Projection.build(kind, 29, D, d)
    theta = torch.randn(d, generator=torch.Generator().manual_seed(D + d)).to(device)
    with force_backend(backend):
        cache = rc.ReadoutCache(P, theta, torch.device(device), dtype)
        assert cache.tracking
        assert_same_bits(cache.refresh(theta), readout(theta, P).to(dtype))
        assert cache.dirty.item() == 0 and torch.equal(cache.snapshot, theta)
        cache.theta_D.fill_(SENTINEL)
        cache.refresh(theta)
        assert (cache.theta_D == SENTINEL).all()  # nothing changed: no readout
        for change in ("last", "first", "zero_sign"):
            if change == "last":
                theta[-1] = -theta[-1]
            elif change == "first":
                theta[0] += 1.0
            else:  # 0.0 → -0.0: equal as floats, different bits (θ_D's zeros change sign)
                theta[0] = 0.0
                cache.refresh(theta)
                cache.theta_D.fill_(SENTINEL)
                theta[0] = -0.0
            cache.refresh(theta)
            assert_same_bits(cache.theta_D, readout(theta, P).to(dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["native", "peft"])
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_refresh_reads_out_only_when_theta_changes(backend, kind, dtype):
    refresh_round(backend, kind, dtype, D=3001, d=7 if kind == "native" else 37)


def test_bfloat16_rounding_matches_torch_on_edge_values():
    """The kernel's own float32 → bfloat16 rounding (nearest even) against ``Tensor.to``: ties both ways, values that
    round up to infinity, infinities, subnormals, NaN. A d = D projection with θ_d = 1-scaled values shows each."""
    ties = torch.tensor([0x3F808000, 0x3F818000, 0x3F80FFFF, 0x3F807FFF, 0xBF808000, 0x7F7FFFFF, 0x7F7F8000,
                         0x00008000, 0x00018000, 0x80000001, 0x7F800000, 0xFF800000, 0x7FC00001, 0xFFFFFFFF],
                        dtype=torch.int64).to(torch.int32).view(torch.float32)
    theta = torch.cat([ties, torch.randn(50)])
    P = Projection.build("native", 3, theta.numel(), theta.numel())  # every scale is 1: θ_D is a permutation of θ_d
    assert P.scales_of(torch.arange(P.d)).eq(1).all()
    with force_backend("triton"):
        got = rc.ReadoutCache(P, theta, torch.device("cpu"), torch.bfloat16).refresh(theta)
    assert_same_bits(got, readout(theta, P).to(torch.bfloat16))


def test_untracked_theta_reads_out_every_time():
    """θ_d the cache cannot compare (float64 here): every refresh reads out, the values still exact."""
    P = Projection.build("native", 5, 500, 11)
    theta = torch.randn(11, dtype=torch.float64)
    cache = rc.ReadoutCache(P, theta, torch.device("cpu"), torch.float32)
    assert not cache.tracking
    for _ in range(2):
        cache.theta_D.fill_(SENTINEL)
        assert torch.equal(cache.refresh(theta), readout(theta, P))


def test_untracked_theta_under_compile_reads_out_in_the_graph():
    """A θ_d the cache cannot compare, compiled (``fullgraph``): the readout is the custom op, the values exact."""
    P = Projection.build("native", 5, 500, 11)
    theta = torch.randn(11, dtype=torch.float64)
    cache = rc.ReadoutCache(P, theta, torch.device("cpu"), torch.float32)
    compiled = torch.compile(lambda t: cache.refresh(t) * 1.0, fullgraph=True, backend="aot_eager")
    for _ in range(2):
        assert torch.equal(compiled(theta), readout(theta, P))
        theta.mul_(-1.5)


def test_model_inference_reads_out_once_until_theta_changes(monkeypatch):
    """Eager inference passes on an adapted model: one readout, then none while θ_d is unchanged; a change in
    place, through ``.data`` or by ``set_adapter`` is read at the next pass (logits against a fresh model)."""
    from models import tiny_llama, tokens

    calls = []
    monkeypatch.setattr(rc, "_readout_native", lambda *a: calls.append(1) or dispatch._readout_native(*a))

    def build():
        model = tiny_llama(seed=1)
        inject_adapter(model, UniLoraConfig(r=2, theta_d_length=48, target_modules="all-linear"))
        return model.eval()

    model = build()
    adapter = get_adapter(model)
    ids = tokens(model, 2, 5)

    def fresh_logits():
        other = build()
        get_adapter(other).theta_d.data.copy_(adapter.theta_d)
        return other(input_ids=ids).logits

    with torch.no_grad():
        adapter.theta_d.uniform_(-0.3, 0.3)
        first = model(input_ids=ids).logits
        model(input_ids=ids)
        model(input_ids=ids)
        assert len(calls) == 1
        adapter.theta_d.mul_(-2.0)
        changed = model(input_ids=ids).logits
        assert len(calls) == 2 and (changed - first).abs().max() > 1e-3
        calls.clear()
        assert torch.equal(changed, fresh_logits())
        gen = torch.Generator().manual_seed(3)  # not the global RNG, which build() reseeds
        adapter.theta_d.data = torch.randn(48, generator=gen)
        calls.clear()
        assert torch.equal(model(input_ids=ids).logits, fresh_logits())
        adapter.add("other", torch.randn(48, generator=gen))
        adapter.set_adapter("other")
        calls.clear()
        got = model(input_ids=ids).logits
        assert len(calls) == 1
        assert torch.equal(got, fresh_logits())


def test_inference_mode_then_no_grad_passes():
    """A kept θ_D made inside ``torch.inference_mode()`` is updated by later ``no_grad`` passes (inference tensors
    refuse in-place updates outside that mode), and the other way round."""
    from models import tiny_llama, tokens

    def build():
        model = tiny_llama(seed=2)
        inject_adapter(model, UniLoraConfig(r=2, theta_d_length=32, target_modules="all-linear"))
        return model.eval()

    model, other = build(), build()
    ids = tokens(model, 1, 6)
    for step, mode in enumerate([torch.inference_mode, torch.no_grad, torch.inference_mode, torch.no_grad]):
        with torch.no_grad():
            for m in (model, other):
                get_adapter(m).theta_d.copy_(torch.linspace(-0.3, 0.3, 32) * (step + 1))
        with mode():
            got = model(input_ids=ids).logits
        with torch.no_grad():
            get_adapter(other)._drop_pass_cache()  # a fresh readout each time
            torch.testing.assert_close(got, other(input_ids=ids).logits, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
class TestCuda:
    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    @pytest.mark.parametrize("kind", ["native", "peft"])
    @pytest.mark.parametrize("D,d", [(3001, 7), (2_000_003, 4099)], ids=str)
    def test_refresh_on_cuda(self, kind, dtype, D, d):
        refresh_round("triton", kind, dtype, D, d, device="cuda")

    def test_bfloat16_rounding_on_cuda(self):
        theta = torch.randn(100_000) * torch.logspace(-40, 38, 100_000)
        theta[::7] = theta[::7].view(torch.int32).bitwise_and(-65536).bitwise_or(0x8000).view(torch.float32)  # ties
        P = Projection.build("native", 3, theta.numel(), theta.numel())
        cuda = theta.cuda()
        got = rc.ReadoutCache(P, cuda, torch.device("cuda"), torch.bfloat16).refresh(cuda)
        assert_same_bits(got.cpu(), readout(theta, P).to(torch.bfloat16))

    def test_captured_graph_replays_the_comparison(self):
        """A CUDA graph captured around a refresh: replays with θ_d unchanged leave θ_D alone, a replay after an in-place
        change reads the new θ_d out."""
        P = Projection.build("native", 11, 1_000_003, 997)
        theta = torch.randn(P.d, device="cuda")
        cache = rc.ReadoutCache(P, theta, torch.device("cuda"), torch.bfloat16)
        cache.refresh(theta)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            cache.refresh(theta)  # warm-up outside capture
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            cache.refresh(theta)
        cache.theta_D.fill_(SENTINEL)
        graph.replay()
        torch.cuda.synchronize()
        assert (cache.theta_D == SENTINEL).all()
        for _ in range(2):
            theta.mul_(-1.25)
            graph.replay()
            assert_same_bits(cache.theta_D, readout(theta, P).to(torch.bfloat16))
