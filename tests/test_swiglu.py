"""The adapted SwiGLU MLP as one op (``unilora_hf.swiglu``, ``kernels.lora_mlp``, ``kernels.swiglu_kernels``).

Kernels F and G (Triton's interpreter on CPU, compiled on CUDA with the ``gpu`` marker) against their PyTorch reference;
the op's outputs and gradients (first order through ``lora_swiglu_mlp_grads``, second order through the reference)
against float64 autograd of the three layers one by one; which modules are fused and that the fused forward leaves
the model as it found it; and a compiled training step of a bfloat16 Llama whose graphs run the MLPs as the op, against
the eager step.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from models import compile_keeping_graphs
from transformers import LlamaConfig, LlamaForCausalLM

from unilora_hf import UniLoraConfig, get_adapter, inject_adapter
from unilora_hf.kernels import force_backend, lora_mlp, swiglu_kernels
from unilora_hf.kernels.triton_modes import interpreter_switch
from unilora_hf.swiglu import find_mlps, swiglu_forward

BF16 = torch.bfloat16


def operands(M, K, F_, N, r, rd, dtype=BF16, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    x = rand(M, K)
    weights = [rand(F_, K, scale=K ** -0.5), rand(F_, K, scale=K ** -0.5), rand(N, F_, scale=F_ ** -0.5)]
    As = [rand(r, K, scale=K ** -0.5), rand(r, K, scale=K ** -0.5), rand(rd, F_, scale=F_ ** -0.5)]
    Bs = [rand(F_, r, scale=0.5), rand(F_, r, scale=0.5), rand(N, rd, scale=0.5)]
    return x, weights, As, Bs


def three_layers(x, weights, biases, As, Bs):
    """The MLP as the unfused layers compute it: ``down(silu(gate(x)) · up(x))``, each ``x Wᵀ + b + (x Aᵀ) Bᵀ``."""
    def layer(v, i):
        return F.linear(v, weights[i], biases[i]) + (v @ As[i].t()) @ Bs[i].t()

    return layer(F.silu(layer(x, 0)) * layer(x, 1), 2)


def _ulp_close(got, want, scale):
    """Within a few bfloat16 roundings of values of magnitude ``scale``."""
    scale = float(scale.detach()) if torch.is_tensor(scale) else float(scale)
    torch.testing.assert_close(got.detach().double(), want.detach().double(), rtol=0, atol=4 * 2 ** -8 * scale)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(37, 72, 4, 6), (16, 32, 16, 16), (5, 50, 3, 1)])
def test_kernels_equal_their_reference(monkeypatch, dtype, shape):
    """Kernels F and G on odd shapes (rows and columns not multiples of the tiles, ranks below the padded 16) against
    ``swiglu_forward_reference`` / ``swiglu_backward_reference``."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    M, F_, r, rd = shape
    k = swiglu_kernels.for_device("cpu")
    x, weights, As, Bs = operands(M, 24, F_, 20, r, rd, dtype)
    gate, up, h = x @ weights[0].t(), x @ weights[1].t(), x @ torch.cat(As[:2]).t()
    a, hd = k.forward(gate, up, h, Bs[0], Bs[1], As[2])
    ra, rhd = lora_mlp.swiglu_forward_reference(gate, up, h, Bs[0], Bs[1], As[2])
    _ulp_close(a, ra, ra.abs().max())
    _ulp_close(hd, rhd, rhd.abs().max())
    g = torch.Generator().manual_seed(5)
    da = torch.randn(M, F_, generator=g).to(dtype)
    gbd = torch.randn(M, rd, generator=g).to(dtype)
    got = k.backward(da, gbd, As[2], gate, up, h, Bs[0], Bs[1])
    want = lora_mlp.swiglu_backward_reference(da, gbd, As[2], gate, up, h, Bs[0], Bs[1])
    for p, q in zip(got, want):
        assert p.shape == q.shape and p.dtype == dtype
        _ulp_close(p, q, q.abs().max())


def test_kernels_refuse_what_they_cannot_take(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    k = swiglu_kernels.for_device("cpu")
    x, weights, As, Bs = operands(8, 16, 32, 16, 2, 2)
    gate = up = x @ weights[0].t()
    h = x @ torch.cat(As[:2]).t()
    with pytest.raises(TypeError, match="one of"):
        k.forward(gate.float(), up.float(), h.float(), Bs[0].float(), Bs[1].float(), As[2].float())
    with pytest.raises(ValueError, match="inconsistent shapes"):
        k.forward(gate, up, h[:, :3], Bs[0], Bs[1], As[2])
    with pytest.raises(ValueError, match="unit stride"):
        k.forward(gate.t().contiguous().t(), up, h, Bs[0], Bs[1], As[2])
    with pytest.raises(ValueError, match="ranks 1..64"):
        big = torch.zeros(32, 65, dtype=BF16)
        k.forward(gate, up, torch.zeros(8, 130, dtype=BF16), big, big, As[2])


def _op_gradients(backend, biases, create_graph=False):
    x, weights, As, Bs = operands(23, 16, 40, 12, 3, 5)
    leaves = [t.clone().requires_grad_() for t in (x, *As, *Bs)]
    with interpreter_switch(True), force_backend(backend):
        y = lora_mlp.lora_swiglu_mlp(leaves[0], weights, biases, leaves[1:4], leaves[4:])
        gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(9)).to(BF16)
        grads = torch.autograd.grad(y, leaves, gy, create_graph=create_graph)
    wide = [t.detach().double().requires_grad_() for t in (x, *As, *Bs)]
    want = three_layers(wide[0], [w.double() for w in weights], [b if b is None else b.double() for b in biases],
                        wide[1:4], wide[4:])
    want_grads = torch.autograd.grad(want, wide, gy.double(), create_graph=create_graph)
    return y, want, grads, want_grads, leaves, wide


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_op_and_its_gradients_equal_the_three_layers(backend, with_bias):
    """y and the gradients of x and every A, B (through ``lora_swiglu_mlp_grads``) against float64 autograd of the
    layers one by one, with and without biases; the triton backend runs Kernels F and G in the interpreter."""
    g = torch.Generator().manual_seed(4)
    biases = [torch.randn(n, generator=g).to(BF16) * 0.1 for n in (40, 40, 12)] if with_bias else [None] * 3
    y, want, grads, want_grads, _, _ = _op_gradients(backend, biases)
    _ulp_close(y, want, want.abs().max())
    for got, ref in zip(grads, want_grads):
        assert ref.abs().max() > 1e-3
        _ulp_close(got, ref, ref.abs().max())


def test_double_backward_differentiates_the_reference():
    """A recording backward (``create_graph=True``) is exact at second order: the gradient of ⟨∂y/∂x, v⟩ against
    float64 autograd of the three layers."""
    y, want, grads, want_grads, leaves, wide = _op_gradients("triton", [None] * 3, create_graph=True)
    v = torch.randn(grads[0].shape, generator=torch.Generator().manual_seed(2))
    second = torch.autograd.grad((grads[0].float() * v).sum(), [leaves[0], leaves[4]])
    want_second = torch.autograd.grad((want_grads[0] * v.double()).sum(), [wide[0], wide[4]])
    for got, ref in zip(second, want_second):
        assert ref.abs().max() > 1e-3
        _ulp_close(got, ref, ref.abs().max())


def llama(layers=2, act="silu", seed=0, dtype=BF16):
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=44, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=96, max_position_embeddings=64, hidden_act=act)
    return LlamaForCausalLM(cfg).to(dtype)


def adapted(targets="all-linear", **kwargs):
    model = llama(**kwargs)
    inject_adapter(model, UniLoraConfig(r=2, theta_d_length=64, target_modules=targets))
    adapter = get_adapter(model)
    with torch.no_grad():
        adapter.theta_d.uniform_(-0.3, 0.3, generator=torch.Generator().manual_seed(1))
    return model


def test_which_mlps_are_fused():
    """Fused: Llama's MLP with its three projections adapted and SiLU. Not: GELU, a projection not adapted, a class
    whose forward differs from the known ones."""
    from unilora_hf.layer import UniLoraLinear

    model = adapted()
    mlps = [layer.mlp for layer in model.model.layers]
    assert get_adapter(model)._mlps == mlps
    assert all(m.forward.func is swiglu_forward and m.forward.args == (m,) for m in mlps)
    assert get_adapter(adapted(act="gelu"))._mlps == []
    assert get_adapter(adapted(targets=["q_proj", "gate_proj", "up_proj"]))._mlps == []

    class Scaled(type(mlps[0])):
        def forward(self, x):
            return 2 * self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))

    other = adapted()
    other.model.layers[0].mlp.__class__ = Scaled
    assert find_mlps(other, UniLoraLinear) == [other.model.layers[1].mlp]


def test_unload_and_the_ab_switch_take_the_forward_off():
    model = adapted()
    mlp = model.model.layers[0].mlp
    clone = copy.deepcopy(model)
    assert clone.model.layers[0].mlp.forward.args[0] is clone.model.layers[0].mlp
    get_adapter(model)._fuse_swiglu(False)
    assert "forward" not in mlp.__dict__
    get_adapter(model)._fuse_swiglu(True)
    assert mlp.forward.func is swiglu_forward
    get_adapter(model).unload()
    assert "forward" not in mlp.__dict__ and type(mlp.down_proj) is nn.Linear


def test_eager_calls_run_the_layers_one_by_one():
    """Outside torch.compile the block's own forward runs (each layer on its own path): the same output bits as with
    the fused forward taken off."""
    model = adapted().float()
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        fused_on = model(input_ids=ids).logits
        get_adapter(model)._fuse_swiglu(False)
        assert torch.equal(model(input_ids=ids).logits, fused_on)


def _compiled_step(model, ids, fuse: bool):
    get_adapter(model)._fuse_swiglu(fuse)
    torch._dynamo.reset()
    compiled, graphs = compile_keeping_graphs(model)
    loss = compiled(input_ids=ids, labels=ids).loss
    loss.backward()
    theta = get_adapter(model).theta_d
    grad, theta.grad = theta.grad, None
    ops = {kind: [str(n.target) for gm in gms for n in gm.graph.nodes if "unilora_hf" in str(n.target)]
           for kind, gms in graphs.items()}
    return loss.detach(), grad, ops


def test_compiled_training_step_runs_each_mlp_as_the_op():
    """A bfloat16 Llama (θ_d float32), compiled, triton backend forced (Kernels F and G in the interpreter): the forward
    graph has one ``lora_swiglu_mlp`` per decoder layer and no gate/up sibling set, the backward one
    ``lora_swiglu_mlp_grads`` per layer; loss and θ_d gradient equal the eager step's and the unfused compiled step's
    to bfloat16 rounding."""
    model = adapted()
    get_adapter(model).theta_d.data = get_adapter(model).theta_d.data.float()
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(3))
    with interpreter_switch(True), force_backend("triton"):
        eager_loss = model(input_ids=ids, labels=ids).loss
        eager_loss.backward()
        theta = get_adapter(model).theta_d
        eager_grad, theta.grad = theta.grad, None
        loss, grad, ops = _compiled_step(model, ids, fuse=True)
        unfused_loss, unfused_grad, unfused_ops = _compiled_step(model, ids, fuse=False)
    torch._dynamo.reset()
    assert ops["forward"].count("unilora_hf.lora_swiglu_mlp.default") == 2
    assert ops["forward"].count("unilora_hf.frozen_linear_lora_siblings.default") == 2  # q/k/v only
    assert ops["backward"].count("unilora_hf.lora_swiglu_mlp_grads.default") == 2
    assert "unilora_hf.lora_swiglu_mlp.default" not in unfused_ops["forward"]
    assert unfused_ops["forward"].count("unilora_hf.frozen_linear_lora_siblings.default") == 4
    assert eager_grad.abs().max() > 1e-4
    for got_loss, got_grad in ((loss, grad), (unfused_loss, unfused_grad)):
        torch.testing.assert_close(got_loss, eager_loss.detach(), rtol=2e-3, atol=0)
        assert F.cosine_similarity(got_grad, eager_grad, dim=0) > 0.999
        torch.testing.assert_close(got_grad, eager_grad, rtol=0, atol=0.03 * eager_grad.abs().max().item())


def test_compiled_step_under_activation_checkpointing_and_dynamic_shapes():
    """The op inside transformers' activation checkpointing (re-run in the backward) and in a graph traced with
    symbolic row counts: no break with a reason, and the θ_d gradient of the eager step."""
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(3))
    grads = {}
    with interpreter_switch(True), force_backend("triton"):
        for case in ("eager", "checkpointed", "dynamic"):
            torch._dynamo.reset()
            model = adapted()
            get_adapter(model).theta_d.data = get_adapter(model).theta_d.data.float()
            if case == "checkpointed":
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                explained = torch._dynamo.explain(model)(input_ids=ids, labels=ids)
                assert explained.break_reasons == [], [b.reason for b in explained.break_reasons]
                torch._dynamo.reset()
            run = model if case == "eager" else torch.compile(model, dynamic=case == "dynamic")
            run(input_ids=ids, labels=ids).loss.backward()
            grads[case] = get_adapter(model).theta_d.grad
    torch._dynamo.reset()
    for case in ("checkpointed", "dynamic"):
        assert F.cosine_similarity(grads[case], grads["eager"], dim=0) > 0.999


@pytest.mark.gpu
class TestCuda:
    @pytest.fixture(autouse=True)
    def _cuda(self):
        if not torch.cuda.is_available():
            pytest.skip("needs CUDA")

    def test_kernels_at_the_1b_shape(self):
        """Kernels F and G compiled, at the 1.1B training shape (4,096 rows, F = 5,632, r = 16), against the
        reference."""
        x, weights, As, Bs = operands(4096, 2048, 5632, 2048, 16, 16, device="cuda")
        gate, up, h = x @ weights[0].t(), x @ weights[1].t(), x @ torch.cat(As[:2]).t()
        k = swiglu_kernels.for_device("cuda")
        for got, want in zip(k.forward(gate, up, h, Bs[0], Bs[1], As[2]),
                             lora_mlp.swiglu_forward_reference(gate, up, h, Bs[0], Bs[1], As[2])):
            _ulp_close(got, want, want.abs().max())
        da, gbd = torch.randn_like(gate), torch.randn_like(h[:, :16])
        for got, want in zip(k.backward(da, gbd, As[2], gate, up, h, Bs[0], Bs[1]),
                             lora_mlp.swiglu_backward_reference(da, gbd, As[2], gate, up, h, Bs[0], Bs[1])):
            _ulp_close(got, want, want.abs().max())

    @pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
    def test_compiled_step_with_the_op_equals_the_unfused_step(self, mode):
        """Compiled steps with and without the fused MLP (the second stream on under CUDA graphs), over steps that
        change θ_d: losses and θ_d gradients agree to bfloat16 rounding."""
        models = [adapted(layers=2).cuda() for _ in range(2)]
        get_adapter(models[1])._fuse_swiglu(False)
        for m in models:
            get_adapter(m).theta_d.data = get_adapter(m).theta_d.data.float()
        runs = [torch.compile(m, mode=mode) for m in models]
        opts = [torch.optim.SGD([get_adapter(m).theta_d], lr=0.5) for m in models]
        ids = torch.randint(0, 96, (4, 64), generator=torch.Generator().manual_seed(3)).cuda()
        for _ in range(4):
            got = []
            for m, run, opt in zip(models, runs, opts):
                if mode == "reduce-overhead":
                    torch.compiler.cudagraph_mark_step_begin()
                loss = run(input_ids=ids, labels=ids).loss
                loss.backward()
                # the loss is a CUDA graph's output, which the next replay overwrites: copied
                got.append((loss.detach().float().clone(), get_adapter(m).theta_d.grad.clone()))
                opt.step()
                opt.zero_grad()
            torch.testing.assert_close(got[0][0], got[1][0], rtol=5e-3, atol=0)
            assert F.cosine_similarity(got[0][1], got[1][1], dim=0) > 0.999
