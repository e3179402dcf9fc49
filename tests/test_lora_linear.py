"""The adapted layer's compute path (``kernels.lora_linear``, the per-pass θ_D readout of the root) against
the float64 composite ``base(x) + (x Aᵀ) Bᵀ`` and against autograd of the per-layer reference readout."""

import pytest
import torch
import torch.nn as nn

from unilora_hf import UniLoraConfig, get_adapter, inject_adapter
from unilora_hf import reference
from unilora_hf.kernels import lora_linear
from unilora_hf.model import unwrap

from models import tiny_gpt2, tiny_llama, tokens


def _composite(x, W, b, A, B):
    y = x @ W.T + reference.lora_forward(x, A, B)
    return y if b is None else y + b


@pytest.mark.parametrize("shape,r", [((5, 7), 1), ((2, 3, 33), 4), ((1, 65), 3)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_frozen_linear_lora_matches_composite_and_its_gradients(shape, r, with_bias):
    torch.manual_seed(0)
    n_in, n_out = shape[-1], 19
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    W = torch.randn(n_out, n_in, dtype=torch.float64)
    b = torch.randn(n_out, dtype=torch.float64) if with_bias else None
    A = torch.randn(r, n_in, dtype=torch.float64, requires_grad=True)
    B = torch.randn(n_out, r, dtype=torch.float64, requires_grad=True)
    g = torch.randn(*shape[:-1], n_out, dtype=torch.float64)
    y = lora_linear.frozen_linear_lora(x, W, b, A, B)
    want = _composite(x, W, b, A, B)
    torch.testing.assert_close(y, want)
    got = torch.autograd.grad(y, (x, A, B), g)
    expected = torch.autograd.grad(want, (x, A, B), g)
    for a, e in zip(got, expected):
        torch.testing.assert_close(a, e)
    assert torch.autograd.gradcheck(lambda x, A, B: lora_linear.frozen_linear_lora(x, W, b, A, B), (x, A, B))
    with torch.no_grad():
        torch.testing.assert_close(lora_linear.frozen_linear_lora(x, W, b, A, B), want.detach())


def test_add_lora_matches_composite_and_casts_the_input():
    torch.manual_seed(1)
    result = torch.randn(4, 6, 11, dtype=torch.float64, requires_grad=True)
    x = torch.randn(4, 6, 9, dtype=torch.float64, requires_grad=True)
    A = torch.randn(2, 9, dtype=torch.float64, requires_grad=True)
    B = torch.randn(11, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lora_linear.add_lora, (result, x, A, B))
    before = result.detach().clone()
    out = lora_linear.add_lora(result, x, A, B)
    assert torch.equal(result.detach(), before)
    torch.testing.assert_close(out, result + reference.lora_forward(x, A, B))
    # a float32 input is cast to the dtype of A and B; its gradient comes back in float32
    x32 = x.detach().float().requires_grad_(True)
    lora_linear.add_lora(result, x32, A, B).sum().backward()
    assert x32.grad.dtype == torch.float32


def _theta_grad(model, ids, weights):
    adapter = unwrap(model).unilora_adapter
    adapter.theta_d.grad = None
    (model(input_ids=ids).logits * weights).sum().backward()
    return adapter.theta_d.grad.clone()


def test_one_readout_per_pass_gives_the_per_layer_reference_gradient():
    """The per-pass path (θ_D once, split into views) against the per-layer reference readout (each layer
    indexing θ_d itself), which is what runs outside a root pass."""
    torch.manual_seed(0)
    model = tiny_llama()
    adapter = inject_adapter(model, UniLoraConfig(r=3, theta_d_length=97, target_modules="all-linear"))
    ids = tokens(model)
    weights = torch.randn_like(model(input_ids=ids).logits)
    fast = _theta_grad(model, ids, weights)
    adapter.lora_pair = lambda constants, device, dtype: None  # force every layer onto its own readout
    slow = _theta_grad(model, ids, weights)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-6 * slow.abs().max().item())
    assert fast.abs().sum() > 0


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_gives_the_same_theta_gradient(reentrant):
    torch.manual_seed(0)
    model = tiny_llama()
    adapter = inject_adapter(model, UniLoraConfig(r=2, theta_d_length=64, target_modules="all-linear"))
    ids = tokens(model)
    weights = torch.randn_like(model(input_ids=ids).logits)
    plain = _theta_grad(model, ids, weights)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.train()
    if reentrant:  # reentrant checkpointing only records a graph when an input of the block needs a gradient
        model.enable_input_require_grads()
    checkpointed = _theta_grad(model, ids, weights)
    torch.testing.assert_close(checkpointed, plain, rtol=1e-5, atol=1e-6 * plain.abs().max().item())
    assert adapter._forward_depth == 0 and adapter._theta_D is None and not adapter._views


def test_conv1d_and_dropout_take_the_general_path():
    torch.manual_seed(0)
    model = tiny_gpt2()
    adapter = inject_adapter(model, UniLoraConfig(r=2, theta_d_length=50, unilora_dropout=0.3))
    ids = tokens(model)
    model.train()
    torch.manual_seed(5)
    fast = model(input_ids=ids).logits
    adapter.lora_pair = lambda constants, device, dtype: None
    torch.manual_seed(5)
    slow = model(input_ids=ids).logits
    torch.testing.assert_close(fast, slow)


def test_no_grad_passes_keep_one_theta_D_buffer_and_see_every_change():
    """Inference keeps θ_D in one buffer (refreshed when θ_d's bits change): any change of θ_d is seen by the next
    pass, through autograd-visible ops or not (``.data``, ``load_state_dict``), and nothing is reallocated."""
    model = tiny_llama()
    adapter = inject_adapter(model, UniLoraConfig(r=2, theta_d_length=40, target_modules=["q_proj", "v_proj"]))
    ids = tokens(model)
    fresh = lambda: readout_free_output(model, adapter, ids)  # noqa: E731
    with torch.no_grad():
        first = model(input_ids=ids).logits
        cache, = adapter._static.values()
        buffer = cache.theta_D
        again = model(input_ids=ids).logits
        assert torch.equal(first, again)
        assert adapter._static[next(iter(adapter._static))].theta_D is buffer  # the same buffer
        for change in (
            lambda t: t.mul_(2.0),
            lambda t: t.data.copy_(torch.randn(40)),  # bypasses the version counter
            lambda t: model.load_state_dict({"unilora_theta_d": torch.randn(40)}, strict=False),
            lambda t: setattr(t, "data", torch.randn(40)),  # new storage
        ):
            before = model(input_ids=ids).logits
            change(adapter.theta_d)
            after = model(input_ids=ids).logits
            assert not torch.equal(after, before)
            torch.testing.assert_close(after, fresh())
    out = model(input_ids=ids).logits  # a training pass keeps nothing of size D when it ends
    assert not adapter._views and adapter._theta_D is None and not adapter._static
    torch.testing.assert_close(out.detach(), after)


def readout_free_output(model, adapter, ids):
    """The logits with every layer reading its own slice of θ_d (no per-pass readout at all)."""
    keep = adapter.lora_pair
    adapter.lora_pair = lambda constants, device, dtype: None
    try:
        with torch.no_grad():
            return model(input_ids=ids).logits
    finally:
        adapter.lora_pair = keep


def test_bf16_forward_rounds_A_B_once_and_stays_close_to_float32():
    torch.manual_seed(0)
    model = tiny_llama()
    adapter = inject_adapter(model, UniLoraConfig(r=4, theta_d_length=128, target_modules="all-linear",
                                                  init_theta_d_bound=0.5))
    ids = tokens(model)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        model.to(torch.bfloat16)
        adapter.theta_d.data = adapter.theta_d.data.float()  # θ_d stays float32 under a bf16 base
        low = model(input_ids=ids).logits
        _, layer = next(adapter.wrapped_layers())
        A32, B32 = layer.lora_matrices()
        A16, B16 = adapter._static[(A32.device, torch.bfloat16)].views[0]
    assert low.dtype == torch.bfloat16
    assert torch.equal(A16, A32.to(torch.bfloat16)) and torch.equal(B16, B32.to(torch.bfloat16))
    rel = (low.float() - ref).norm() / ref.norm()
    assert rel < 3e-2, rel


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
class TestCuda:
    """The CUDA path (Triton readout and Pᵀ g, cuBLAS LoRA GEMMs, Triton merge) against float64 on CPU.
    Tolerances, relative to the norm of the adapter's contribution: float32 1e-4 (TF32 off), bfloat16
    3e-2, float16 5e-3."""

    TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}

    def _pair(self, dtype):
        torch.manual_seed(0)
        cpu = tiny_llama().double()
        inject_adapter(cpu, UniLoraConfig(r=4, theta_d_length=256, target_modules="all-linear", init_theta_d_bound=0.3))
        gpu = tiny_llama().to("cuda", dtype)
        adapter = inject_adapter(gpu, UniLoraConfig(r=4, theta_d_length=256, target_modules="all-linear"))
        with torch.no_grad():
            adapter.theta_d.copy_(cpu.unilora_theta_d.float())
        return cpu, gpu, adapter

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
    def test_forward_backward_and_merge_against_float64(self, dtype):
        torch.backends.cuda.matmul.allow_tf32 = False
        cpu, gpu, adapter = self._pair(dtype)
        ids = tokens(cpu)
        with get_adapter(cpu).disabled():
            base = cpu(input_ids=ids).logits
        want = cpu(input_ids=ids).logits
        weights = torch.randn_like(want)
        (want * weights).sum().backward()
        with adapter.disabled():
            got_base = gpu(input_ids=ids.cuda()).logits.double()
        got = gpu(input_ids=ids.cuda()).logits
        (got.double() * weights.cuda()).sum().backward()
        # the adapter's contribution, against float64; the output's own rounding (one step of the dtype)
        # is allowed on top of the per-dtype tolerance
        scale = (want - base).norm().item()
        rounding = torch.finfo(dtype).eps * want.norm().item()
        effect = (got.double() - got_base).cpu()
        assert (effect - (want - base)).norm().item() <= self.TOL[dtype] * scale + 2 * rounding
        g_want = cpu.unilora_theta_d.grad
        g_got = adapter.theta_d.grad.double().cpu()
        assert (g_got - g_want).norm() <= 3 * self.TOL[dtype] * g_want.norm()
        first = adapter.theta_d.grad.clone()  # deterministic: the same bits on a second run
        adapter.theta_d.grad = None
        (gpu(input_ids=ids.cuda()).logits.double() * weights.cuda()).sum().backward()
        assert torch.equal(first, adapter.theta_d.grad)
        with torch.no_grad():
            unmerged = gpu(input_ids=ids.cuda()).logits
            adapter.merge()
            merged = gpu(input_ids=ids.cuda()).logits
            adapter.unmerge()
        assert (merged - unmerged).double().norm().item() <= self.TOL[dtype] * scale + 4 * rounding


def test_autocast_to_the_model_dtype_keeps_the_frozen_path(monkeypatch):
    """A bf16 model under bf16 autocast (``Trainer(bf16=True)`` on a bf16 checkpoint) runs the frozen-linear path,
    with the loss and θ_d gradient of the same pass without autocast; a float32 model under bf16 autocast takes
    the general path (the base computes in bf16 there, so the layer's inputs differ in dtype from its weight)."""
    calls = []
    real = lora_linear.frozen_linear_lora
    monkeypatch.setattr(lora_linear, "frozen_linear_lora", lambda *a: calls.append(1) or real(*a))
    got = {}
    for dtype in (torch.bfloat16, torch.float32):
        model = tiny_llama().to(dtype).train()
        adapter = inject_adapter(model, UniLoraConfig(r=2, theta_d_length=64, target_modules="all-linear"))
        with torch.no_grad():
            adapter.theta_d.uniform_(-0.3, 0.3, generator=torch.Generator().manual_seed(3))
        ids = tokens(model)
        for autocast in (False, True):
            calls.clear()
            adapter.theta_d.grad = None
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            got[dtype, autocast] = (loss.detach().float(), adapter.theta_d.grad.clone(), len(calls))
    layers = 2 * 7
    assert got[torch.bfloat16, False][2] == got[torch.bfloat16, True][2] == layers
    assert torch.equal(got[torch.bfloat16, True][0], got[torch.bfloat16, False][0])
    assert torch.equal(got[torch.bfloat16, True][1], got[torch.bfloat16, False][1])
    assert got[torch.bfloat16, True][1].abs().max() > 0
    assert got[torch.float32, False][2] == layers and got[torch.float32, True][2] == 0


@pytest.mark.parametrize("with_bias", [False, True])
def test_compiled_path_ops_match_the_composite_and_pass_opcheck(with_bias):
    """The ops the compiled layer runs (``unilora_hf::frozen_linear_lora``, its backward's ``..._dx``): their
    registration (fake shapes, autograd) by ``torch.library.opcheck``, values and gradients against the float64
    composite, and gradcheck in x, A and B."""
    torch.manual_seed(2)
    x = torch.randn(6, 9, dtype=torch.float64, requires_grad=True)
    W = torch.randn(5, 9, dtype=torch.float64)
    b = torch.randn(5, dtype=torch.float64) if with_bias else None
    A = torch.randn(3, 9, dtype=torch.float64, requires_grad=True)
    B = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    op, dx_op = torch.ops.unilora_hf.frozen_linear_lora, torch.ops.unilora_hf.frozen_linear_lora_dx
    torch.library.opcheck(op, (x, W, b, A, B))
    torch.library.opcheck(dx_op, (torch.randn(6, 5, dtype=torch.float64, requires_grad=True), W, A, B))
    y, h = op(x, W, b, A, B)
    want = _composite(x, W, b, A, B)
    torch.testing.assert_close(y, want)
    torch.testing.assert_close(h, x @ A.T)
    g = torch.randn(6, 5, dtype=torch.float64)
    for got, expected in zip(torch.autograd.grad(y, (x, A, B), g), torch.autograd.grad(want, (x, A, B), g)):
        torch.testing.assert_close(got, expected)
    assert torch.autograd.gradcheck(lambda x, A, B: op(x, W, b, A, B)[0], (x, A, B))
    assert torch.autograd.gradcheck(lambda x, A, B: op(x, W, b, A, B), (x, A, B))  # h's gradient too
    assert torch.autograd.gradcheck(lambda A, B: op(x.detach(), W, b, A, B)[0], (A, B))  # no dx: no dx op


def test_compiled_path_dx_op_is_twice_differentiable():
    """The backward's op has its own derivative, so a double backward (a gradient penalty) through the compiled
    layer works: gradcheck and gradgradcheck of the op's output in float64 against finite differences."""
    torch.manual_seed(4)
    x = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    W = torch.randn(6, 7, dtype=torch.float64)
    A = torch.randn(2, 7, dtype=torch.float64, requires_grad=True)
    B = torch.randn(6, 2, dtype=torch.float64, requires_grad=True)
    op = torch.ops.unilora_hf.frozen_linear_lora
    g = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    dx_op = torch.ops.unilora_hf.frozen_linear_lora_dx
    assert torch.autograd.gradcheck(lambda g, A, B: dx_op(g, W, A, B), (g, A, B))
    assert torch.autograd.gradgradcheck(lambda x, A, B: op(x, W, None, A, B)[0], (x, A, B))


@pytest.mark.parametrize("with_bias", [False, True])
def test_sibling_ops_match_one_layer_at_a_time_and_pass_opcheck(with_bias):
    """The ops of a compiled sibling set (``unilora_hf::frozen_linear_lora_siblings``, its backward's ``..._dx``):
    opcheck, each output and every gradient (x, the stacked A, each B; an unused member's output too) against the
    float64 composite of the layers one at a time, gradcheck and gradgradcheck in x, A and the Bs."""
    torch.manual_seed(5)
    outs, K, r, M = (7, 3, 3), 9, 2, 6
    x = torch.randn(M, K, dtype=torch.float64, requires_grad=True)
    Ws = [torch.randn(n, K, dtype=torch.float64) for n in outs]
    bs = [torch.randn(n, dtype=torch.float64) if with_bias else None for n in outs]
    As = [torch.randn(r, K, dtype=torch.float64, requires_grad=True) for _ in outs]
    Bs = [torch.randn(n, r, dtype=torch.float64, requires_grad=True) for n in outs]
    op, dx_op = torch.ops.unilora_hf.frozen_linear_lora_siblings, torch.ops.unilora_hf.frozen_linear_lora_siblings_dx
    A = torch.cat(As).detach().requires_grad_()
    torch.library.opcheck(op, (x, Ws, bs, A, Bs))
    gs = [torch.randn(M, n, dtype=torch.float64, requires_grad=True) for n in outs]
    torch.library.opcheck(dx_op, (gs, Ws, A, Bs))
    got = lora_linear.frozen_linear_lora_siblings(x, Ws, bs, As, Bs)
    want = [_composite(x, W, b, a, B) for W, b, a, B in zip(Ws, bs, As, Bs)]
    for y, expected in zip(got, want):
        torch.testing.assert_close(y, expected)
    for used in ([0, 1, 2], [0, 2]):  # every output used, or k's left out (its gradient None)
        inputs = (x, *As, *Bs)
        grads, expected = (torch.autograd.grad(sum((ys[i] * gs[i]).sum() for i in used), inputs, retain_graph=True,
                                               allow_unused=True, materialize_grads=True) for ys in (got, want))
        for a, e in zip(grads, expected):
            torch.testing.assert_close(a, e)
    assert torch.autograd.gradcheck(lambda x, A, *Bs: op(x, Ws, bs, A, list(Bs))[:-1], (x, A, *Bs))
    assert torch.autograd.gradcheck(lambda A, *Bs: op(x.detach(), Ws, bs, A, list(Bs)), (A, *Bs))  # h's too
    assert torch.autograd.gradgradcheck(lambda x, A, *Bs: op(x, Ws, bs, A, list(Bs))[:-1], (x, A, *Bs))
    assert torch.autograd.gradcheck(lambda A, *t: dx_op(list(t[:3]), Ws, A, list(t[3:])), (A, *gs, *Bs))


def _grads_case(outs, K, r, M, dtype, device="cpu", seed=7):
    gen = torch.Generator(device=device).manual_seed(seed)
    rnd = lambda *shape: torch.randn(*shape, generator=gen, device=device, dtype=torch.float32).to(dtype)
    x2, A = rnd(M, K), rnd(len(outs) * r, K)
    Ws, Bs, gs = [rnd(n, K) for n in outs], [rnd(n, r) for n in outs], [rnd(M, n) for n in outs]
    return gs, Ws, A, Bs, x2, x2 @ A.t()


def _grads_by_the_ops(gs, Ws, A, Bs, x2, h):
    """The same backward from the differentiable ops (``..._dx``) and autograd's GEMMs, for comparison."""
    r = A.shape[0] // len(gs)
    if len(gs) == 1:
        dx, gB = torch.ops.unilora_hf.frozen_linear_lora_dx(gs[0], Ws[0], A, Bs[0])
    else:
        dx, gB = torch.ops.unilora_hf.frozen_linear_lora_siblings_dx(gs, Ws, A, Bs)
    return [dx, gB.t() @ x2] + [g.t() @ h[:, i * r:(i + 1) * r] for i, g in enumerate(gs)]


@pytest.mark.parametrize("outs", [(5,), (7, 3, 3)])
def test_backward_op_matches_the_dense_maths_and_the_differentiable_ops(outs, monkeypatch):
    """``unilora_hf::frozen_linear_lora_grads`` (a layer's or a set's whole backward in one op): opcheck, the float64
    dense maths (dx = Σ g_i W_i + Σ g_i B_i A_i, dA_i = (g_i B_i)ᵀ x, dB_i = g_iᵀ x A_iᵀ), and the same bits as the
    differentiable ops it stands in for; the single layer's and the set's backward take it when nothing records,
    and gradcheck (finite differences) passes through it."""
    gs, Ws, A, Bs, x2, h = _grads_case(outs, K=9, r=2, M=6, dtype=torch.float64)
    op = torch.ops.unilora_hf.frozen_linear_lora_grads
    torch.library.opcheck(op, (gs, Ws, A, Bs, x2, h))
    dx, dA, *dBs = op(gs, Ws, A, Bs, x2, h)
    As = A.split(2)
    torch.testing.assert_close(dx, sum(g @ W + (g @ B) @ a for g, W, B, a in zip(gs, Ws, Bs, As)))
    torch.testing.assert_close(dA, torch.cat([(g @ B).t() @ x2 for g, B in zip(gs, Bs)]))
    for g, a, dB in zip(gs, As, dBs):
        torch.testing.assert_close(dB, g.t() @ (x2 @ a.t()))
    for got, want in zip((dx, dA, *dBs), _grads_by_the_ops(gs, Ws, A, Bs, x2, h)):
        assert torch.equal(got, want)
    taken = []
    decide = lora_linear._overlapped_grads
    monkeypatch.setattr(lora_linear, "_overlapped_grads", lambda *a: taken.append(decide(*a)) or taken[-1])
    x = x2.clone().requires_grad_()
    Bs = [B.clone().requires_grad_() for B in Bs]
    A = A.clone().requires_grad_()
    if len(outs) == 1:
        run = lambda x, A, B: torch.ops.unilora_hf.frozen_linear_lora(x, Ws[0], None, A, B)[0]
    else:
        run = lambda x, A, *Bs: torch.ops.unilora_hf.frozen_linear_lora_siblings(x, Ws, [None] * len(outs), A,
                                                                                 list(Bs))[:-1]
    assert torch.autograd.gradcheck(run, (x, A, *Bs))
    assert True in taken


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("outs", [(2048,), (2048, 256, 256)])
def test_backward_op_on_a_second_stream_gives_the_same_bits_eager_and_in_a_cuda_graph(outs):
    """The op's bits equal the differentiable ops' on CUDA: called eagerly (one stream), and replayed from a CUDA graph,
    which it captured with its weight gradients on a second stream (forked and joined), after its inputs changed in
    place."""
    case = _grads_case(outs, K=1024, r=16, M=512, dtype=torch.bfloat16, device="cuda")
    op = torch.ops.unilora_hf.frozen_linear_lora_grads
    for got, want in zip(op(*case), _grads_by_the_ops(*case)):
        assert torch.equal(got, want)
    capture = torch.cuda.Stream()
    capture.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(capture):
        op(*case)  # warm-up outside the capture (cuBLAS workspaces)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=capture):
            out = op(*case)
    torch.cuda.current_stream().wait_stream(capture)
    fresh = _grads_case(outs, K=1024, r=16, M=512, dtype=torch.bfloat16, device="cuda", seed=8)
    for mine, new in zip(case, fresh):
        for t, u in zip(mine if isinstance(mine, list) else [mine], new if isinstance(new, list) else [new]):
            t.copy_(u)
    graph.replay()
    torch.cuda.synchronize()
    for got, want in zip(out, _grads_by_the_ops(*fresh)):
        assert torch.equal(got, want)


def test_sibling_ops_refuse_mixed_ranks_and_biases():
    x = torch.randn(4, 6)
    Ws = [torch.randn(5, 6), torch.randn(3, 6)]
    As, Bs = [torch.randn(2, 6), torch.randn(3, 6)], [torch.randn(5, 2), torch.randn(3, 3)]
    assert lora_linear.frozen_linear_lora_siblings(x, Ws, [None, None], As, Bs) is None
    As, Bs = [torch.randn(2, 6)] * 2, [torch.randn(5, 2), torch.randn(3, 2)]
    assert lora_linear.frozen_linear_lora_siblings(x, Ws, [torch.randn(5), None], As, Bs) is None
    assert len(lora_linear.frozen_linear_lora_siblings(x, Ws, [None, None], As, Bs)) == 2
