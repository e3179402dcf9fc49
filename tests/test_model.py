"""Injection, training state, gradients against a dense float64 P, merge/unmerge/unload."""

import pytest
import torch
from models import TINY, output, tiny_bert, tiny_gpt2, tiny_llama, tokens
from transformers.pytorch_utils import Conv1D

from unilora_hf import AdapterStateError, UniLoraConfig, UniLoraLinear, get_adapter, inject_adapter

CONFIGS = {
    "llama": UniLoraConfig(r=2, theta_d_length=97, target_modules="all-linear"),
    "gpt2": UniLoraConfig(r=3, theta_d_length=50, target_modules=["c_attn", "c_fc"]),
    "bert": UniLoraConfig(r=4, theta_d_length=64, target_modules=["query", "value"], modules_to_save=["classifier"]),
    "roberta": UniLoraConfig(r=1, theta_d_length=40, target_modules=r".*attention\.self\.(query|value)",
                             modules_to_save=["classifier"]),
}


@pytest.mark.parametrize("arch", list(TINY))
def test_adapted_output_is_base_plus_BAx(arch):
    model = TINY[arch]()
    originals = {n: m for n, m in model.named_modules()}
    ids = tokens(model)
    base = output(model, ids)
    adapter = inject_adapter(model, CONFIGS[arch])
    assert type(model).__name__ == type(originals[""]).__name__  # the class is untouched
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable[0] == "unilora_theta_d" or "unilora_theta_d" in trainable
    assert all(n == "unilora_theta_d" or ".modules_to_save." in n for n in trainable)
    assert sum(1 for p in model.parameters() if p is adapter.theta_d) == 1
    for name, layer in adapter.wrapped_layers():
        assert layer.base_layer is originals[name]
    with adapter.disabled():
        assert torch.equal(output(model, ids), base)
    # each layer computes base(x) + (x Aᵀ) Bᵀ: check one layer directly
    name, layer = next(adapter.wrapped_layers())
    x = torch.randn(3, layer.in_features)
    A, B = layer.lora_matrices()
    assert torch.allclose(layer(x), layer.base_layer(x) + x @ A.T @ B.T, atol=1e-6)
    assert (output(model, ids) - base).abs().max() > 0


def test_injection_keeps_the_model_mode():
    """Layers wrapped in a model in eval mode are in eval mode: with dropout configured, two inference passes agree
    (before, a new wrapper started in training mode and applied dropout to the adapter's branch). In training mode
    the dropout is active."""
    config = UniLoraConfig(r=2, theta_d_length=64, target_modules="all-linear", unilora_dropout=0.5)
    model = tiny_llama().eval()
    adapter = inject_adapter(model, config)
    with torch.no_grad():
        adapter.theta_d.uniform_(-0.3, 0.3, generator=torch.Generator().manual_seed(2))
    ids = tokens(model)
    assert not any(layer.training or layer.unilora_dropout.training for _, layer in adapter.wrapped_layers())
    assert torch.equal(output(model, ids), output(model, ids))
    model.train()
    torch.manual_seed(0)
    first = model(input_ids=ids).logits.detach()
    assert not torch.equal(first, model(input_ids=ids).logits.detach())
    trained = tiny_llama().train()
    assert all(layer.training for _, layer in inject_adapter(trained, config).wrapped_layers())


def test_theta_gradient_matches_dense_projection_in_float64():
    model = tiny_llama()
    adapter = inject_adapter(model, UniLoraConfig(r=2, theta_d_length=131, target_modules="all-linear"))
    ids = tokens(model)
    weights = torch.randn_like(output(model, ids))
    (model(input_ids=ids).logits * weights).sum().backward()
    ours = adapter.theta_d.grad.double()
    # grad with respect to θ_D: run the same forward with A, B as free leaves
    leaves, pairs = [], {}
    for _, layer in adapter.wrapped_layers():
        A, B = (t.detach().clone().requires_grad_(True) for t in layer.lora_matrices())
        leaves += [A, B]
        pairs[layer.spec.offset] = (A, B)
    adapter.lora_pair = lambda constants, device, dtype: pairs[constants[1]]  # (slot, offset, ...)
    (model(input_ids=ids).logits * weights).sum().backward()
    g_D = torch.cat([t.grad.flatten() for t in leaves]).double()
    theta_D = torch.cat([t.detach().flatten() for t in leaves]).double()
    P = adapter.projection.dense(torch.float64)
    assert P.shape == (adapter.D, 131)
    assert torch.allclose(theta_D, P @ adapter.theta_d.detach().double(), atol=1e-7)
    expected = P.T @ g_D
    assert torch.allclose(ours, expected, rtol=1e-5, atol=1e-6 * expected.abs().max().item())


def test_theta_gradient_matches_finite_differences():
    model = tiny_bert().double()
    adapter = inject_adapter(model, UniLoraConfig(r=2, theta_d_length=30, target_modules=["query", "value"]))
    ids = tokens(model)
    model(input_ids=ids).logits.sum().backward()
    theta = adapter.theta_d
    for j in (0, 7, 29):
        eps = 1e-3
        with torch.no_grad():
            theta[j] += eps
            up = model(input_ids=ids).logits.sum().item()
            theta[j] -= 2 * eps
            down = model(input_ids=ids).logits.sum().item()
            theta[j] += eps
        assert abs((up - down) / (2 * eps) - theta.grad[j].item()) < 1e-3 * max(1.0, abs(theta.grad[j].item()))


@pytest.mark.parametrize("arch", list(TINY))
def test_merge_unmerge_unload(arch):
    model = TINY[arch]()
    ids = tokens(model)
    base = output(model, ids)
    originals = {n: (m, m.weight.detach().clone()) for n, m in model.named_modules()
                 if isinstance(m, (torch.nn.Linear, Conv1D))}
    adapter = inject_adapter(model, CONFIGS[arch])
    with torch.no_grad():
        adapter.theta_d.mul_(20)  # a visible change
    adapted = output(model, ids)
    adapter.merge()
    assert torch.allclose(output(model, ids), adapted, atol=1e-5)
    adapter.unmerge()
    assert torch.allclose(output(model, ids), adapted, atol=1e-5)
    restored = adapter.unload()
    assert restored is model and not hasattr(model, "unilora_theta_d")
    assert not any(isinstance(m, UniLoraLinear) for m in model.modules())
    for name, (module, weight) in originals.items():
        assert model.get_submodule(name) is module
        assert torch.allclose(module.weight, weight, atol=1e-6)
    assert torch.allclose(output(model, ids), base, atol=1e-5)


def test_merged_adapter_takes_its_pass_hooks_off_the_root():
    """A merged adapter reads nothing per pass: merge() removes the root's two pass hooks (and the kept readout),
    unmerge() puts them back, and the adapter then trains and infers as before."""
    model = tiny_llama()
    hooks = (len(model._forward_pre_hooks), len(model._forward_hooks))
    adapter = inject_adapter(model, CONFIGS["llama"])
    ids = tokens(model)
    with torch.no_grad():
        adapter.theta_d.mul_(20)
    model.eval()
    adapted = output(model, ids)
    assert adapter._static  # the inference readout, kept between passes
    assert (len(model._forward_pre_hooks), len(model._forward_hooks)) == (hooks[0] + 1, hooks[1] + 1)
    adapter.merge()
    assert (len(model._forward_pre_hooks), len(model._forward_hooks)) == hooks and not adapter._static
    torch.testing.assert_close(output(model, ids), adapted, rtol=1e-5, atol=1e-5)
    adapter.unmerge()
    assert (len(model._forward_pre_hooks), len(model._forward_hooks)) == (hooks[0] + 1, hooks[1] + 1)
    torch.testing.assert_close(output(model, ids), adapted, rtol=1e-5, atol=1e-5)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    assert adapter.theta_d.grad.abs().max() > 0


def test_merge_and_unload_keeps_the_adapted_function():
    model = tiny_gpt2()
    ids = tokens(model)
    adapter = inject_adapter(model, CONFIGS["gpt2"])
    with torch.no_grad():
        adapter.theta_d.normal_()
    adapted = output(model, ids)
    plain = adapter.merge_and_unload()
    assert not any(isinstance(m, UniLoraLinear) for m in plain.modules())
    assert torch.allclose(output(plain, ids), adapted, atol=1e-4)


def test_merge_in_bfloat16_computes_the_delta_in_float32():
    model = tiny_llama().to(torch.bfloat16)
    adapter = inject_adapter(model, UniLoraConfig(r=4, theta_d_length=64, target_modules=["q_proj"]))
    name, layer = next(adapter.wrapped_layers())
    before = layer.base_layer.weight.detach().float().clone()
    delta = layer.delta_weight()
    assert delta.dtype == torch.float32 and adapter.theta_d.dtype == torch.float32
    adapter.merge()
    expected = (before + delta).to(torch.bfloat16)
    assert torch.equal(layer.base_layer.weight, expected)  # rounded once, from the float32 sum


def test_nan_theta_refuses_to_merge_and_changes_nothing():
    model = tiny_llama()
    adapter = inject_adapter(model, UniLoraConfig(r=2, theta_d_length=40, target_modules=["q_proj"]))
    weights = {n: l.base_layer.weight.clone() for n, l in adapter.wrapped_layers()}
    with torch.no_grad():
        adapter.theta_d[3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        adapter.merge()
    with torch.no_grad():
        adapter.theta_d[3] = float("inf")
    with pytest.raises(ValueError, match="NaN/inf"):
        adapter.merge()
    for n, l in adapter.wrapped_layers():
        assert torch.equal(l.base_layer.weight, weights[n]) and not l.merged


def test_injecting_twice_is_refused():
    model = tiny_llama()
    inject_adapter(model, UniLoraConfig(theta_d_length=10, target_modules=["q_proj"]))
    with pytest.raises(AdapterStateError, match="already has a Uni-LoRA adapter"):
        inject_adapter(model, UniLoraConfig(theta_d_length=10, target_modules=["v_proj"]))


def test_model_with_a_peft_adapter_is_refused():
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(AdapterStateError, match="PEFT adapter"):
        inject_adapter(peft_model.base_model.model, UniLoraConfig(target_modules=["v_proj"]))


def test_targets_matching_nothing_list_the_linear_modules():
    with pytest.raises(ValueError) as err:
        inject_adapter(tiny_llama(), UniLoraConfig(target_modules=["qkv"]))
    assert "matched no module" in str(err.value) and "model.layers.0.self_attn.q_proj" in str(err.value)
    with pytest.raises(ValueError, match="no default for model type"):
        inject_adapter(torch.nn.Sequential(torch.nn.Linear(2, 2)), UniLoraConfig())
    with pytest.raises(ValueError, match="LlamaRMSNorm"):
        inject_adapter(tiny_llama(), UniLoraConfig(target_modules=["input_layernorm"]))


def test_all_linear_leaves_out_the_output_head_and_layers_to_transform_selects():
    model = tiny_llama()
    adapter = inject_adapter(model, UniLoraConfig(theta_d_length=512, target_modules="all-linear"))
    names = [s.name for s in adapter.layers]
    assert "lm_head" not in names and len(names) == 14
    model = tiny_llama()
    adapter = inject_adapter(model, UniLoraConfig(theta_d_length=100, target_modules=["q_proj", "v_proj"],
                                                  layers_to_transform=[1]))
    assert [s.name for s in adapter.layers] == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]


def test_modules_to_save_is_a_trainable_copy_and_bias_modes():
    model = tiny_bert()
    head = model.classifier
    adapter = inject_adapter(model, UniLoraConfig(theta_d_length=100, target_modules=["query"],
                                                  modules_to_save=["classifier"], bias="unilora_only"))
    assert model.classifier.original_module is head and model.classifier.weight is not head.weight
    names = set(adapter.trainable_state())
    assert names == {"classifier.weight", "classifier.bias", "bert.encoder.layer.0.attention.self.query.bias",
                     "bert.encoder.layer.1.attention.self.query.bias"}
    with torch.no_grad():
        model.classifier.modules_to_save.weight.add_(1.0)
    adapter.unload()
    assert model.classifier is head
    with pytest.raises(ValueError, match="modules_to_save"):
        inject_adapter(tiny_bert(), UniLoraConfig(theta_d_length=100, target_modules=["query"],
                                                  modules_to_save=["pooler_head"]))


def test_get_adapter_on_a_plain_model_says_how_to_attach_one():
    with pytest.raises(AdapterStateError, match="inject_adapter"):
        get_adapter(tiny_llama())
