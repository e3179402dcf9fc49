"""The adapter under ``torch.compile`` (CPU inductor here; CUDA and CUDA graphs with the ``gpu`` marker).

Compiled must equal eager (outputs, losses, θ_d gradients and the trained θ_d), the adapted layers must add
no graph break (the graph count does not grow with the number of adapted layers, and no break has a reason),
repeated steps and in-place θ_d changes must not recompile, and a compiled inference graph (or a captured
CUDA graph) must read the θ_d it is replayed with, not the one it was traced with.
"""

from __future__ import annotations

import re

import pytest
import torch
import torch._dynamo as dynamo
from models import compile_keeping_graphs, tokens
from torch._dynamo.utils import counters
from transformers import LlamaConfig, LlamaForCausalLM

from unilora_hf import UniLoraConfig, get_adapter, inject_adapter

CFG = UniLoraConfig(r=2, theta_d_length=64, target_modules="all-linear")


def llama(layers: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=44, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=96, max_position_embeddings=64)
    return LlamaForCausalLM(cfg)


def adapted(layers: int = 2, config: UniLoraConfig = CFG, seed: int = 0):
    model = llama(layers, seed)
    inject_adapter(model, config)
    with torch.no_grad():
        get_adapter(model).theta_d.uniform_(-0.2, 0.2, generator=torch.Generator().manual_seed(seed + 1))
    return model


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """A fresh Dynamo, and Triton's interpreter switch off: other modules of the run set TRITON_INTERPRET=1 for
    their CPU kernel cases, and here the CPU path is the reference (CUDA: the compiled kernels)."""
    from unilora_hf.kernels.triton_modes import interpreter_switch

    dynamo.reset()
    counters.clear()
    with interpreter_switch(False):
        yield
    dynamo.config.error_on_recompile = False
    dynamo.reset()


@pytest.mark.parametrize("kind", ["native", "peft"])
def test_no_graph_break_per_adapted_layer(kind):
    """Training and inference: one graph for the model's forward (θ_D read out inside it in training), the same count
    at 2 and 4 layers, and no break with a reason."""
    config = UniLoraConfig(r=2, theta_d_length=64, target_modules="all-linear", projection=kind)
    counts = {}
    for layers in (2, 4):
        for training in (True, False):
            model = adapted(layers, config).train(training)
            ids = tokens(model, 2, 6)
            with torch.set_grad_enabled(training):
                explained = dynamo.explain(model)(input_ids=ids, labels=ids)
            assert explained.break_reasons == [], [b.reason for b in explained.break_reasons]
            counts[layers, training] = explained.graph_count
    assert counts[2, True] == counts[4, True] == 1 and counts[2, False] == counts[4, False] == 1, counts


def test_compiled_training_graph_returns_no_readout_views():
    """θ_D is read out inside the forward's graph and its views stay there: the compiled training graph returns what
    the unadapted model's graph returns (loss, logits, the key/value cache), not one tensor per layer view. Views
    left in Python state would be graph outputs that AOT autograd and CUDA graph trees rebuild at every step."""
    outputs = {}
    for adapter in (False, True):
        model = adapted() if adapter else llama(2)
        ids = tokens(model, 2, 6)
        graphs = []

        def backend(gm, example_inputs, graphs=graphs):
            graphs.append(gm)
            return gm.forward

        torch.compile(model, backend=backend)(input_ids=ids, labels=ids).loss.backward()
        outputs[adapter] = [len(next(n for n in gm.graph.nodes if n.op == "output").args[0]) for gm in graphs]
    assert outputs[True] == outputs[False] and len(outputs[True]) == 1, outputs


def test_compiled_training_equals_eager_without_recompiles():
    eager, compiled_model = adapted(), adapted()
    compiled = torch.compile(compiled_model)
    ids = tokens(eager, 2, 7)
    opts = [torch.optim.SGD([get_adapter(m).theta_d], lr=0.5) for m in (eager, compiled_model)]
    for step in range(3):
        if step == 1:  # the first step compiles; no later step may compile again
            dynamo.config.error_on_recompile = True
        losses, grads = [], []
        for model, run, opt in ((eager, eager, opts[0]), (compiled_model, compiled, opts[1])):
            loss = run(input_ids=ids, labels=ids).loss
            loss.backward()
            losses.append(loss.detach())
            grads.append(get_adapter(model).theta_d.grad.clone())
            opt.step()
            opt.zero_grad()
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)
        assert grads[0].abs().max() > 1e-4
    torch.testing.assert_close(get_adapter(compiled_model).theta_d, get_adapter(eager).theta_d, rtol=1e-5,
                               atol=1e-6)
    assert dict(counters.get("recompiles", {})) == {}


@pytest.mark.parametrize("reentrant", [False, True])
def test_compiled_training_with_activation_checkpointing(reentrant):
    """With transformers' activation checkpointing the sibling sets launch per layer (keeping an output on the group
    inside the checkpointed region would break the graph at every decoder layer): no break with a reason, no more
    graphs than with the groups off, and the compiled step's loss and θ_d gradient equal the eager step's."""
    counts, results = [], []
    for grouped in (True, False):
        dynamo.reset()
        model = adapted()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        if not grouped:
            get_adapter(model)._group_siblings(False)
        ids = tokens(model, 2, 6)
        explained = dynamo.explain(model)(input_ids=ids, labels=ids)
        assert explained.break_reasons == [], [b.reason for b in explained.break_reasons]
        counts.append(explained.graph_count)
        dynamo.reset()
        torch.compile(model)(input_ids=ids, labels=ids).loss.backward()
        results.append(get_adapter(model).theta_d.grad)
    assert counts[0] == counts[1], counts
    eager = adapted()
    eager.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    eager(input_ids=ids, labels=ids).loss.backward()
    for got in results:
        torch.testing.assert_close(got, get_adapter(eager).theta_d.grad, rtol=1e-4, atol=1e-6)
    assert results[0].abs().max() > 1e-4


def test_compiled_inference_reads_the_current_theta():
    model = adapted().eval()
    reference = adapted().eval()
    compiled = torch.compile(model)
    ids = tokens(model, 2, 6)
    with torch.no_grad():
        first = compiled(input_ids=ids).logits
        dynamo.config.error_on_recompile = True
        torch.testing.assert_close(first, reference(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
        for m in (model, reference):  # an in-place change, as an optimizer step makes it
            get_adapter(m).theta_d.mul_(-1.5)
        second = compiled(input_ids=ids).logits
        torch.testing.assert_close(second, reference(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
        assert (second - first).abs().max() > 1e-3
    assert dict(counters.get("recompiles", {})) == {}


def test_compiled_inference_after_an_eager_pass_keeps_theta_D():
    """After an eager inference pass (which creates the kept θ_D), compiled inference calls the refresh op once per
    pass, with no graph break: unchanged θ_d → no readout, an in-place change → one readout and the new logits."""
    from unilora_hf.kernels import dispatch
    from unilora_hf.kernels import readout_cache as rc

    model, reference = adapted().eval(), adapted().eval()
    ids = tokens(model, 2, 6)
    graphs, calls = [], []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    original = rc._readout_native
    rc._readout_native = lambda *a: calls.append(1) or dispatch._readout_native(*a)
    try:
        with torch.no_grad():
            model(input_ids=ids)
            explained = dynamo.explain(model)(input_ids=ids)
            assert explained.break_reasons == [] and explained.graph_count == 1
            dynamo.reset()
            torch.compile(model, backend=capture)(input_ids=ids)
            assert sum("refresh_theta_D" in str(n.target) for gm in graphs for n in gm.graph.nodes) == 1
            dynamo.reset()
            compiled = torch.compile(model)
            calls.clear()
            first = compiled(input_ids=ids).logits
            dynamo.config.error_on_recompile = True
            compiled(input_ids=ids)
            assert calls == []
            torch.testing.assert_close(first, reference(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
            for m in (model, reference):
                get_adapter(m).theta_d.mul_(-1.5)
            calls.clear()
            second = compiled(input_ids=ids).logits
            assert len(calls) == 1
            torch.testing.assert_close(second, reference(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
            assert (second - first).abs().max() > 1e-3
    finally:
        rc._readout_native = original
    assert dict(counters.get("recompiles", {})) == {}


def test_compiled_inference_returns_no_adapter_tensors():
    """``model.forward`` compiled (the root's hooks stay outside the graph, as in ``generate``'s compiled step): the
    graph's outputs do not grow with the layers. A tensor of a layer left in Python state would be an extra output,
    rebuilt view by view on the host at every call."""
    outputs = {}
    for layers in (2, 4):
        dynamo.reset()
        model, graphs = adapted(layers).eval(), []

        def capture(gm, example_inputs):
            graphs.append(gm)
            return gm.forward

        ids = tokens(model, 1, 5)
        with torch.no_grad():
            model.forward = torch.compile(model.forward, backend=capture)  # compiled before any eager pass
            got = model(input_ids=ids, use_cache=False).logits
            assert torch.equal(got, adapted(layers).eval()(input_ids=ids, use_cache=False).logits)
        outputs[layers] = [len(gm.graph.output_node().args[0]) for gm in graphs]
        # the root's eager pre-hook allocated the kept θ_D, so the graph refreshes it (one op) instead of reading out
        assert [sum("refresh_theta_D" in str(n.target) for n in gm.graph.nodes) for gm in graphs] == [1]
    assert outputs[2] == outputs[4] == [1], outputs


def test_compiled_forward_with_static_cache_generates_the_eager_tokens():
    model = adapted().eval()
    with torch.no_grad():
        get_adapter(model).theta_d.mul_(25.0)  # a strong adapter, so that it changes the greedy tokens
    ids = tokens(model, 2, 5)
    kwargs = dict(input_ids=ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0,
                  cache_implementation="static")
    eager = model.generate(**kwargs)
    with torch.no_grad():
        with get_adapter(model).disabled():
            base_tokens = model.generate(**kwargs)
    model.forward = torch.compile(model.forward)
    compiled = model.generate(**kwargs)
    assert torch.equal(compiled, eager)
    assert not torch.equal(eager, base_tokens)  # the adapter changes what is generated


def _fused_op_calls(model, ids, training: bool, dynamic: bool | None = None) -> tuple[int, torch.Tensor, torch.Tensor]:
    """(custom-op calls in the traced graph, compiled logits, eager logits) with the triton backend forced (CPU:
    Triton's interpreter)."""
    from unilora_hf.kernels import force_backend
    from unilora_hf.kernels.triton_modes import interpreter_switch

    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    model.train(training)
    with interpreter_switch(True), force_backend("triton"), torch.set_grad_enabled(training):
        want = model(input_ids=ids).logits
        got = torch.compile(model, backend=capture, dynamic=dynamic)(input_ids=ids).logits
    calls = 0  # adapted layers computed by the op: one per single-layer call, one per member of a group call
    for node in (n for gm in graphs for n in gm.graph.nodes):
        if "frozen_linear_lora_inference_group" in str(node.target):
            calls += len(node.args[1])
        elif "frozen_linear_lora_inference" in str(node.target):
            calls += 1
    return calls, got, want


def _op_nodes(model, ids) -> dict[str, int]:
    """Calls of each inference op in the graph traced for few-row inference (triton backend forced)."""
    from unilora_hf.kernels import force_backend
    from unilora_hf.kernels.triton_modes import interpreter_switch

    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    dynamo.reset()
    with interpreter_switch(True), force_backend("triton"), torch.no_grad():
        torch.compile(model.eval(), backend=capture, fullgraph=True)(input_ids=ids)
    names = [str(n.target) for gm in graphs for n in gm.graph.nodes if "unilora_hf" in str(n.target)]
    return {name: names.count(name) for name in set(names)}


def test_compiled_decoding_runs_kernel_d_as_one_op_per_layer():
    """Compiled inference on at most 64 rows calls Kernel D through the custom op, once per adapted layer, with
    the eager layer's bits; training, and inference on more rows, keep the traced PyTorch ops."""
    model = adapted(2)
    calls, got, want = _fused_op_calls(model, tokens(model, 1, 3), training=False)
    assert calls == len(get_adapter(model).layers) == 14
    assert torch.equal(got, want)
    assert _fused_op_calls(model, tokens(model, 2, 40), training=False)[0] == 0
    dynamo.reset()
    calls, got, want = _fused_op_calls(model, tokens(model, 1, 3), training=True)
    assert calls == 0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_compiled_decoding_runs_sibling_layers_as_one_launch():
    """q/k/v and gate/up read the same input: while decoding, each set is one call of the group op (4 launches per
    decoder layer instead of 7), with no graph break, and the logits keep the eager bits (checked above)."""
    model = adapted(2)
    nodes = _op_nodes(model, tokens(model, 1, 3))
    assert nodes == {"unilora_hf.frozen_linear_lora_inference_group": 4, "unilora_hf.frozen_linear_lora_inference": 4,
                     "unilora_hf.project_theta_native": 1}
    get_adapter(model)._group_siblings(False)
    assert _op_nodes(model, tokens(model, 1, 3)) == {"unilora_hf.frozen_linear_lora_inference": 14,
                                                     "unilora_hf.project_theta_native": 1}


def test_compiled_decoding_with_dynamic_shapes_takes_the_op():
    """Traced with symbolic row counts (``dynamic=True``), few-row inference still calls the op once per layer."""
    model = adapted(2)
    for n in (3, 5):
        dynamo.reset()
        calls, got, want = _fused_op_calls(model, tokens(model, 1, n), training=False, dynamic=True)
        assert calls == 14
        assert torch.equal(got, want)


def _guard_text(model, ids) -> str:
    """The guard tree that a compiled call of ``model`` on ``ids`` evaluates before each run (few-row inference,
    triton backend forced so that sibling groups apply)."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    from unilora_hf.kernels import force_backend
    from unilora_hf.kernels.triton_modes import interpreter_switch

    def step(input_ids):
        return model(input_ids=input_ids).logits

    dynamo.reset()
    with interpreter_switch(True), force_backend("triton"), torch.no_grad():
        torch.compile(step, backend="eager", fullgraph=True)(ids)
    (entry,) = _debug_get_cache_entry_list(step.__code__)
    return str(entry.guard_manager)


def test_compiled_model_guards_each_adapted_layer_lightly():
    """Every guard is evaluated at every call of a compiled model (the host time of a decoded token), so an adapted
    layer may be guarded on its type, its one tuple of state (``_state``: merged, sibling group, slot, slice, shape,
    whether it has dropout) and its base layer's parameters, and nothing else (not its spec, dropout module, training
    flag or root), and a
    sibling group reaches its members through their parent module, not through references of its own. The root each
    layer holds costs one identity check per layer."""
    model = adapted(2).eval()
    text = _guard_text(model, tokens(model, 1, 3))
    names = {name.rsplit(".", 1)[1] for name, _ in get_adapter(model).wrapped_layers()}
    reads = set()
    for source in re.findall(r"source=(.+?), accessed_by", text):
        for name in names:
            _, found, rest = source.partition(f"._modules['{name}']")
            if found:
                reads.add(re.match(r"(\.\w+(\['\w+'\])?)?", rest).group(0))
    assert reads == {"", ".__dict__", "._state", "._modules", "._modules['base_layer']"}
    # the root, reached from each layer: one identity check per layer, nothing read through it
    roots = [line for line in text.splitlines() if "_unilora_root" in line]
    assert len(roots) == len(names) * 2 and all("LAMBDA_GUARD: L['model'] is L['model']" in r for r in roots)
    assert ".spec" not in text
    # and few guard lines per adapted layer over the base's (about 26; before the state tuple about 39)
    base = llama(2).eval()
    extra = len(text.splitlines()) - len(_guard_text(base, tokens(base, 1, 3)).splitlines())
    bigger = adapted(4).eval()
    extra4 = len(_guard_text(bigger, tokens(bigger, 1, 3)).splitlines()) - len(
        _guard_text(llama(4).eval(), tokens(bigger, 1, 3)).splitlines())
    assert (extra4 - extra) / 14 < 32


def test_compiled_model_sees_a_new_adapter_on_the_same_model():
    """The layer constants are guarded by value: a compiled model whose adapter is unloaded and replaced by another
    of another layout recompiles and computes the new adapter, not the traced one."""
    model = adapted(2).eval()
    ids = tokens(model, 1, 3)
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad():
        first = compiled(input_ids=ids).logits
        torch.testing.assert_close(first, model(input_ids=ids).logits)
        get_adapter(model).unload()
        inject_adapter(model, UniLoraConfig(r=3, theta_d_length=40, target_modules=["q_proj", "v_proj", "up_proj"]))
        get_adapter(model).theta_d.uniform_(-0.3, 0.3, generator=torch.Generator().manual_seed(5))
        want = model(input_ids=ids).logits
        got = compiled(input_ids=ids).logits
    torch.testing.assert_close(got, want)
    assert (got - first).abs().max() > 1e-3


def test_inductor_decoding_with_kernel_d_matches_eager():
    """The custom op inside an Inductor graph (CPU inductor, Kernel D in Triton's interpreter) over a static-cache
    generation: the eager tokens."""
    from unilora_hf.kernels import force_backend
    from unilora_hf.kernels.triton_modes import interpreter_switch

    model = adapted().eval()
    with torch.no_grad():
        get_adapter(model).theta_d.mul_(25.0)
    ids = tokens(model, 1, 5)
    kwargs = dict(input_ids=ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0,
                  cache_implementation="static")
    with interpreter_switch(True), force_backend("triton"):
        eager = model.generate(**kwargs)
        model.forward = torch.compile(model.forward)
        compiled = model.generate(**kwargs)
    assert torch.equal(compiled, eager)


@pytest.mark.gpu
class TestCuda:
    @pytest.fixture(autouse=True)
    def _cuda(self):
        if not torch.cuda.is_available():
            pytest.skip("needs CUDA")

    @pytest.mark.parametrize("mode", ["default", "max-autotune-no-cudagraphs", "reduce-overhead"])
    def test_compiled_training_step_on_cuda(self, mode):
        """bf16 base, fp32 θ_d: loss and θ_d gradient of the compiled step equal eager's (bf16 tolerance), over
        steps that change θ_d (a CUDA-graph replay must read the new θ_d)."""
        eager, other = (adapted(2).cuda().to(torch.bfloat16) for _ in range(2))
        for m in (eager, other):
            get_adapter(m).theta_d.data = get_adapter(m).theta_d.data.float()
        compiled = torch.compile(other, mode=mode)
        ids = tokens(eager, 4, 16).cuda()
        opts = [torch.optim.SGD([get_adapter(m).theta_d], lr=0.5) for m in (eager, other)]
        for _ in range(3):
            got = []
            for model, run, opt in ((eager, eager, opts[0]), (other, compiled, opts[1])):
                loss = run(input_ids=ids, labels=ids).loss
                loss.backward()
                got.append((loss.detach().float(), get_adapter(model).theta_d.grad.clone()))
                opt.step()
                opt.zero_grad()
            torch.testing.assert_close(got[1][0], got[0][0], rtol=2e-2, atol=2e-2)
            cos = torch.nn.functional.cosine_similarity(got[1][1], got[0][1], dim=0)
            assert cos > 0.99, cos

    def test_reduce_overhead_inference_replays_read_the_new_theta(self):
        model = adapted(2).cuda().eval()
        reference = adapted(2).cuda().eval()
        compiled = torch.compile(model, mode="reduce-overhead")
        ids = tokens(model, 2, 8).cuda()
        with torch.no_grad():
            for step in range(4):  # warm-up, record, replays
                if step == 3:
                    for m in (model, reference):
                        get_adapter(m).theta_d.mul_(-2.0)
                got = compiled(input_ids=ids).logits.clone()
                torch.testing.assert_close(got, reference(input_ids=ids).logits, rtol=1e-4, atol=1e-4)

    def test_reduce_overhead_replays_keep_theta_D_and_see_changes(self):
        """Eager pass first (the kept θ_D), then CUDA-graph replays: no cudagraph skip, logits of the live θ_d."""
        model = adapted(2).cuda().eval()
        reference = adapted(2).cuda().eval()
        ids = tokens(model, 2, 8).cuda()
        with torch.no_grad():
            model(input_ids=ids)
            compiled = torch.compile(model, mode="reduce-overhead")
            for step in range(6):  # warm-up, record, replays; θ_d changes before replays 3 and 5
                if step in (3, 5):
                    for m in (model, reference):
                        get_adapter(m).theta_d.mul_(-2.0)
                got = compiled(input_ids=ids).logits.clone()
                torch.testing.assert_close(got, reference(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
        assert counters["inductor"]["cudagraph_skips"] == 0  # a mutated input that is not static would skip

    def test_static_cache_compiled_generate_on_cuda(self):
        model = adapted(2).cuda().eval()
        ids = tokens(model, 2, 5).cuda()
        kwargs = dict(input_ids=ids, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0,
                      cache_implementation="static")
        eager = model.generate(**kwargs, disable_compile=True)
        compiled = model.generate(**kwargs)  # transformers compiles the decoding step for a static cache on CUDA
        assert torch.equal(compiled, eager)



def test_compiled_training_adds_the_lora_product_in_place():
    """Traced as plain ops, ``y.addmm_(h, Bᵀ)`` becomes an out-of-place addmm that first copies y (one more read
    and write of every projection's output). The compiled step instead runs each adapted layer as the op
    ``frozen_linear_lora`` and its dx as ``frozen_linear_lora_dx`` (both add in place), and each sibling set (q/k/v,
    gate/up) as ``frozen_linear_lora_siblings``: per decoder layer two sets and two single layers (o, down) in the
    forward graph. In the backward each of them is one ``frozen_linear_lora_grads`` where the input needs a gradient
    (its dx adds in place, as ``frozen_linear_lora_dx`` and ``frozen_linear_lora_siblings_dx``, which a double
    backward takes), and no addmm in either graph."""
    layers = 2
    model = adapted(layers).train()
    ids = tokens(model, 2, 6)
    compiled, graphs = compile_keeping_graphs(model)
    compiled(input_ids=ids, labels=ids).loss.backward()

    def count(kind, name):
        return sum(name == str(node.target) for gm in graphs[kind] for node in gm.graph.nodes)

    assert count("forward", "unilora_hf.frozen_linear_lora.default") == 2 * layers
    assert count("forward", "unilora_hf.frozen_linear_lora_siblings.default") == 2 * layers
    # each layer's whole backward is one op (its weight gradients on a second stream on CUDA), except the first
    # layer's q, k and v, which read the frozen embeddings' norm: no dx wanted there, dA and dB traced GEMMs
    assert count("backward", "unilora_hf.frozen_linear_lora_grads.default") == 4 * layers - 1
    assert count("backward", "unilora_hf.frozen_linear_lora_dx.default") == 0
    assert count("backward", "unilora_hf.frozen_linear_lora_siblings_dx.default") == 0
    assert count("forward", "aten.addmm.default") == count("backward", "aten.addmm.default") == 0
    assert get_adapter(model).theta_d.grad.abs().max() > 0
