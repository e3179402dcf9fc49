"""Sibling layers (q/k/v, gate/up) sharing one Kernel D launch while decoding (``unilora_hf.siblings``).

Compiled decoding groups by default (``tests/test_compile.py`` counts the op); eager decoding only when asked
(``eager=True``), which these cases do to test the bookkeeping directly;
``test_eager_decoding_keeps_one_launch_per_layer`` checks the default.

CPU cases run the kernels in Triton's interpreter with the triton backend forced; the ``gpu`` cases compare the
grouped launch with one launch per layer on CUDA, bit for bit, at the 1.1B decoding shapes.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from unilora_hf import UniLoraConfig, get_adapter, inject_adapter
from unilora_hf.kernels import force_backend, linear_kernels, lora_linear
from unilora_hf.siblings import SIBLING_NAMES


def adapted(layers: int = 2, bias: bool = False, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=44, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=96, max_position_embeddings=64, attention_bias=bias)
    model = LlamaForCausalLM(cfg).eval()
    inject_adapter(model, UniLoraConfig(r=2, theta_d_length=64, target_modules="all-linear"))
    with torch.no_grad():
        get_adapter(model).theta_d.uniform_(-0.3, 0.3, generator=torch.Generator().manual_seed(seed + 1))
    get_adapter(model)._group_siblings(True, eager=True)  # these cases run eager; by default only compiled graphs group
    return model


def ids(batch: int, length: int) -> torch.Tensor:
    return torch.randint(0, 96, (batch, length), generator=torch.Generator().manual_seed(3))


class Launches:
    """Counts Kernel D launches by kind while inside."""

    def __init__(self, monkeypatch):
        self.single = self.group = self.grouped_layers = 0
        lk = linear_kernels.for_device("cpu")
        forward, forward_group = lk.forward, lk.forward_group

        def counted_forward(*args, **kwargs):
            self.single += 1
            return forward(*args, **kwargs)

        def counted_group(x, weights, *args):
            self.group += 1
            self.grouped_layers += len(weights)
            return forward_group(x, weights, *args)

        monkeypatch.setattr(lk, "forward", counted_forward)
        monkeypatch.setattr(lk, "forward_group", counted_group)


def _kernel_data(M, Ns, K, r, dtype, bias):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(M, K, generator=g).to(dtype)
    Ws = [torch.randn(n, K, generator=g).to(dtype) for n in Ns]
    As = [(torch.randn(r, K, generator=g) * 0.5).to(dtype) for _ in Ns]
    Bs = [(torch.randn(n, r, generator=g) * 0.5).to(dtype) for n in Ns]
    bs = [torch.randn(n, generator=g).to(dtype) if bias else None for n in Ns]
    return x, Ws, bs, As, Bs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M,Ns,bias", [(1, (24, 7, 7), False), (5, (24, 7, 7), True), (3, (40, 17), False),
                                       (16, (9,), True)])
def test_group_launch_equals_one_launch_per_layer(dtype, M, Ns, bias):
    """Each output of the grouped launch has the bits of that layer's own Kernel D launch, and matches float64."""
    lk = linear_kernels.for_device("cpu")
    x, Ws, bs, As, Bs = _kernel_data(M, Ns, 40, 5, dtype, bias)
    got = lk.forward_group(x, Ws, bs, As, Bs)
    for y, W, b, A, B in zip(got, Ws, bs, As, Bs):
        assert torch.equal(y, lk.forward(x, W, b, A, B, False)[0])
        h = (x.double() @ A.double().t()).to(dtype).double()
        want = x.double() @ W.double().t() + h @ B.double().t() + (0 if b is None else b.double())
        tol = 1e-4 if dtype == torch.float32 else 5e-2
        torch.testing.assert_close(y.double(), want, rtol=tol, atol=tol)


def test_group_launch_refuses_what_it_cannot_run():
    lk = linear_kernels.for_device("cpu")
    x, Ws, bs, As, Bs = _kernel_data(1, (8, 8, 8, 8), 16, 2, torch.float32, False)
    with pytest.raises(ValueError, match="cannot share one launch"):
        lk.forward_group(x, Ws, bs, As, Bs)  # four layers: GROUP_MAX is 3
    x17 = torch.randn(17, 16)
    assert lk.group_tiles(17, 16, (8, 8), 2, torch.float32) is None  # more than one row tile
    with pytest.raises(ValueError, match="cannot share one launch"):
        lk.forward_group(x17, Ws[:2], bs[:2], As[:2], Bs[:2])
    with pytest.raises(ValueError, match="contiguous"):
        lk.forward_group(x, [Ws[0].t().contiguous().t(), Ws[1]], bs[:2], As[:2], Bs[:2])
    with pytest.raises(ValueError, match="biases all given or all None"):
        lk.forward_group(x, Ws[:2], [torch.zeros(8), None], As[:2], Bs[:2])


def test_groups_are_the_named_siblings_of_one_module():
    model = adapted(2)
    groups = get_adapter(model)._groups
    names = {tuple(n.rsplit(".", 1)[1] for n in (m.spec.name for m in g.members)) for g in groups}
    assert names == {("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")}
    assert len(groups) == 4
    assert all(groups[m.siblings[0]].members[m.siblings[1]] is m for g in groups for m in g.members)
    assert ("q_proj", "k_proj", "v_proj") in SIBLING_NAMES


@pytest.mark.parametrize("bias", [False, True])
def test_decoding_forward_takes_one_launch_per_sibling_set(monkeypatch, bias):
    """Few-row inference: q/k/v and gate/up each one grouped launch (4 launches per decoder layer instead of 7),
    logits bit-equal to the model without grouping; nothing kept after the pass."""
    model = adapted(2, bias=bias)
    with force_backend("triton"), torch.no_grad():
        launches = Launches(monkeypatch)
        got = model(input_ids=ids(1, 3)).logits
        assert (launches.group, launches.grouped_layers, launches.single) == (4, 10, 4)
        assert all(not g._kept and g._x is None for g in get_adapter(model)._groups)
        get_adapter(model)._group_siblings(False)
        launches = Launches(monkeypatch)
        want = model(input_ids=ids(1, 3)).logits
        assert (launches.group, launches.single) == (0, 14)
    assert torch.equal(got, want)


def test_training_and_many_rows_take_the_gemm_group(monkeypatch):
    """Autograd recording, or more than 16 rows: no Kernel D launch; each sibling set runs as one call of
    ``frozen_linear_lora_siblings`` (cuBLAS GEMMs, x read once for the set's rank-r inputs)."""
    model = adapted(1)
    calls = []
    siblings = lora_linear.frozen_linear_lora_siblings
    monkeypatch.setattr(lora_linear, "frozen_linear_lora_siblings",
                        lambda x, *a: calls.append(x.shape) or siblings(x, *a))
    with force_backend("triton"):
        launches = Launches(monkeypatch)
        model.train()
        model(input_ids=ids(1, 3), labels=ids(1, 3)).loss.backward()
        assert launches.group == 0 and len(calls) == 2
        model.eval()
        with torch.no_grad():
            model(input_ids=ids(2, 9))  # 18 rows
        assert launches.group == 0 and len(calls) == 4 and launches.single == 2 + 2


@pytest.mark.parametrize("bias", [False, True])
def test_training_through_the_gemm_group_equals_one_layer_at_a_time(bias):
    """A training step with the sibling sets grouped gives the loss, the θ_d gradient and the embeddings' gradient
    of the same model with every layer on its own (float32, the same maths in another order of the sums)."""
    results = []
    for grouped in (True, False):
        model = adapted(2, bias=bias).train()
        model.model.embed_tokens.weight.requires_grad_(True)
        if not grouped:
            get_adapter(model)._group_siblings(False)
        loss = model(input_ids=ids(2, 5), labels=ids(2, 5)).loss
        loss.backward()
        results.append((loss.detach(), get_adapter(model).theta_d.grad, model.model.embed_tokens.weight.grad))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert results[0][1].abs().max() > 1e-4 and results[0][2].abs().max() > 1e-4


def test_no_group_while_activation_checkpointing_records():
    """Inside a region that activation checkpointing re-runs, a training call launches per layer (under
    ``torch.compile`` keeping a sibling's output there would break the graph, ``tests/test_compile.py``); with
    checkpointing off, or autograd not recording, the group applies again."""
    model = adapted(1).train()
    group = get_adapter(model)._groups[0]
    assert group.checkpoint is model.model.layers[0]
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    x = torch.randn(1, 20, 32, requires_grad=True)  # more than 16 rows: the GEMM group, on any backend
    assert group.forward(0, x, get_adapter(model)) is None
    with torch.no_grad():
        assert group.forward(0, x, get_adapter(model)) is not None
    group.clear()
    model.gradient_checkpointing_disable()
    assert group.forward(0, x, get_adapter(model)) is not None


def test_a_sibling_called_on_another_input_computes_its_own(monkeypatch):
    """What the first sibling kept is used only for the very same, unmodified x: another tensor, or the same one
    changed in place (its version counter), gets the layer's own output."""
    model = adapted(1)
    attn = model.model.layers[0].self_attn
    x = torch.randn(1, 2, 32)
    with force_backend("triton"), torch.no_grad():
        adapter = get_adapter(model)
        adapter._group_siblings(False)
        own = {name: getattr(attn, name)(t) for name, t in (("k_proj", x), ("v_proj", x + 1), ("q_proj", x))}
        own_changed = attn.k_proj(x * 2)
        adapter._group_siblings(True, eager=True)
        launches = Launches(monkeypatch)
        assert torch.equal(attn.q_proj(x), own["q_proj"])
        assert torch.equal(attn.k_proj(x), own["k_proj"])  # kept from q's launch
        assert launches.group == 1 and launches.single == 0
        assert torch.equal(attn.v_proj(x + 1), own["v_proj"])  # another x: a launch of its own (here the group's)
        assert launches.group == 2
        attn.q_proj(x)
        x.mul_(2)  # in place: k must not take what was kept for the old values
        assert torch.equal(attn.k_proj(x), own_changed)
        adapter._drop_pass_cache()
        assert all(not g._kept for g in adapter._groups)


def test_merged_or_disabled_adapter_leaves_the_groups_alone(monkeypatch):
    model = adapted(1)
    adapter = get_adapter(model)
    with force_backend("triton"), torch.no_grad():
        want = model(input_ids=ids(1, 3)).logits
        adapter.merge()
        launches = Launches(monkeypatch)
        merged = model(input_ids=ids(1, 3)).logits
        assert launches.group == launches.single == 0
        adapter.unmerge()
        with adapter.disabled():
            model(input_ids=ids(1, 3))
        assert launches.group == launches.single == 0
    torch.testing.assert_close(merged, want, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
def test_group_launch_bits_on_cuda():
    """CUDA: at the 1.1B decoding shapes (q/k/v 2048/256/256 × 2048, gate/up 5632 × 2048; r = 16, bf16), M = 1 and
    7, each grouped output equals its own launch's bits."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    lk = linear_kernels.for_device("cuda")
    for Ns in ((2048, 256, 256), (5632, 5632)):
        for M in (1, 7):
            x, Ws, bs, As, Bs = (t.cuda() if isinstance(t, torch.Tensor) else [u.cuda() if u is not None else None
                                                                                   for u in t]
                                 for t in _kernel_data(M, Ns, 2048, 16, torch.bfloat16, False))
            got = lk.forward_group(x, Ws, bs, As, Bs)
            again = lk.forward_group(x, Ws, bs, As, Bs)  # the direct launch from the remembered plan
            for y, y2, W, A, B in zip(got, again, Ws, As, Bs):
                assert torch.equal(y, lk.forward(x, W, None, A, B, False)[0])
                assert torch.equal(y2, y)


def test_inference_mode_and_pre_hooks(monkeypatch):
    """Under ``torch.inference_mode`` (no version counter) the group still forms, with the eager bits; a forward
    pre-hook on a sibling (which may change its input) keeps every layer on its own launch."""
    model = adapted(1)
    with force_backend("triton"):
        with torch.no_grad():
            want = model(input_ids=ids(1, 3)).logits
        launches = Launches(monkeypatch)
        with torch.inference_mode():
            got = model(input_ids=ids(1, 3)).logits
        assert launches.group == 2 and torch.equal(got, want)
        handle = model.model.layers[0].self_attn.k_proj.register_forward_pre_hook(lambda module, args: None)
        launches = Launches(monkeypatch)
        with torch.no_grad():
            hooked = model(input_ids=ids(1, 3)).logits
        handle.remove()
        assert (launches.group, launches.single) == (1, 5) and torch.equal(hooked, want)


def test_eager_decoding_keeps_one_launch_per_layer(monkeypatch):
    """By default an eager forward launches per layer (host-bound there, grouping measured slower); the group op is
    for compiled graphs."""
    model = adapted(1)
    get_adapter(model)._group_siblings(True)
    with force_backend("triton"), torch.no_grad():
        launches = Launches(monkeypatch)
        model(input_ids=ids(1, 3))
    assert (launches.group, launches.single) == (0, 7)
