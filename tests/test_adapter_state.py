"""Nothing lost: a refused load leaves the model bit-identical; disabled() and unload() give the base back
exactly (trained biases and heads included); a merge never writes a weight another module shares."""

import pytest
import torch
from models import output, tiny_bert, tokens
from test_integrity import bert_adapter
from test_security import peft_written, saved_adapter
from transformers import LlamaConfig, LlamaForCausalLM

from unilora_hf import (
    UniLoraAutoModel, UniLoraConfig, UniLoraError, UniLoraLinear, inject_adapter, load_adapter,
)
from unilora_hf import layer as layer_module


def snapshot(model):
    return {
        "tensors": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "modules": {n: (type(m), id(m)) for n, m in model.named_modules()},
        "hooks": (len(model._forward_pre_hooks), len(model._forward_hooks)),
        "attrs": sorted(k for k in model.__dict__ if "unilora" in k) + sorted(model._parameters),
    }


def assert_same(model, before):
    after = snapshot(model)
    assert after["modules"] == before["modules"]
    assert after["grad"] == before["grad"]
    assert after["hooks"] == before["hooks"] and after["attrs"] == before["attrs"]
    assert after["tensors"].keys() == before["tensors"].keys()
    for k, v in before["tensors"].items():
        assert torch.equal(after["tensors"][k], v), k


def test_refused_loads_leave_the_model_bit_identical(tmp_path):
    bert_adapter(tmp_path / "good")
    bad = {
        "other arch": saved_adapter(tmp_path / "llama"),
        "head shape": peft_written(tmp_path / "head", theta_len=40, target_modules=["query"],
                                   modules_to_save=["classifier"],
                                   tensors={"base_model.model.classifier.weight": torch.zeros(5, 24),
                                            "base_model.model.classifier.bias": torch.zeros(5)}),
        "missing bias": peft_written(tmp_path / "bias", theta_len=40, target_modules=["query"], bias="all"),
        "d > D": peft_written(tmp_path / "big", theta_len=10_000, target_modules=["query"]),
    }
    model = tiny_bert()
    model.bert.embeddings.word_embeddings.weight.requires_grad_(False)  # a flag of the user's own
    before = snapshot(model)
    for name, folder in bad.items():
        with pytest.raises(UniLoraError):
            load_adapter(model, folder)
        assert_same(model, before)


def test_a_failure_half_way_through_injection_is_undone(monkeypatch, tmp_path):
    model = tiny_bert()
    before = snapshot(model)
    built = []
    real_init = layer_module.ModulesToSave.__init__

    def failing_init(self, *args, **kwargs):
        built.append(1)
        raise MemoryError("simulated: out of memory while copying the head")

    monkeypatch.setattr(layer_module.ModulesToSave, "__init__", failing_init)
    with pytest.raises(MemoryError):
        inject_adapter(model, UniLoraConfig(r=2, theta_d_length=60, target_modules=["query", "value"],
                                            modules_to_save=["classifier"], bias="all"))
    assert built  # it did fail after the layers were replaced
    monkeypatch.setattr(layer_module.ModulesToSave, "__init__", real_init)
    assert_same(model, before)
    inject_adapter(model, UniLoraConfig(r=2, theta_d_length=60, target_modules=["query"]))  # and it still works


@pytest.mark.parametrize("bias", ["all", "unilora_only"])
def test_disabled_and_unload_give_back_the_base_exactly(tmp_path, bias):
    model = tiny_bert()
    ids = tokens(model)
    base = output(model, ids)
    before = snapshot(model)
    adapter = inject_adapter(model, UniLoraConfig(r=2, theta_d_length=60, target_modules=["query", "value"],
                                                  modules_to_save=["classifier"], bias=bias))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        adapter.theta_d.normal_(generator=g)
        for p in adapter.trainable_state().values():
            p.add_(torch.randn(p.shape, generator=g))
    adapted = output(model, ids)
    assert not torch.equal(adapted, base)
    with adapter.disabled():
        assert torch.equal(output(model, ids), base)
    assert torch.equal(output(model, ids), adapted)
    adapter.save_adapter(tmp_path)
    adapter.unload()
    assert torch.equal(output(model, ids), base)
    assert_same(model, before)
    fresh = tiny_bert()
    loaded = load_adapter(fresh, tmp_path)  # the trained biases come back from the file, the base's stay apart
    assert torch.equal(output(fresh, ids), adapted)
    with loaded.disabled():
        assert torch.equal(output(fresh, ids), base)


def tied_llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=44, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=96, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


def test_merging_into_a_tied_output_head_never_changes_the_embeddings(tmp_path):
    model = tied_llama()
    ids = tokens(model)
    embeddings = model.model.embed_tokens.weight.detach().clone()
    adapter = inject_adapter(model, UniLoraConfig(r=2, theta_d_length=100, target_modules=["lm_head", "q_proj"]))
    with torch.no_grad():
        adapter.theta_d.normal_()
    unmerged = output(model, ids)
    adapter.save_adapter(tmp_path / "adapter")
    adapter.merge()
    assert torch.equal(model.model.embed_tokens.weight, embeddings)
    assert (output(model, ids) - unmerged).abs().max() < 1e-4
    adapter.unmerge()
    assert model.lm_head.base_layer.weight is model.model.embed_tokens.weight  # the shared weight, untouched
    assert (output(model, ids) - unmerged).abs().max() < 1e-4  # q_proj: W + ΔW - ΔW, rounded in float32
    merged = adapter.merge_and_unload()
    assert not isinstance(merged.lm_head, UniLoraLinear)
    assert merged.lm_head.weight is not merged.model.embed_tokens.weight
    assert torch.equal(merged.model.embed_tokens.weight, embeddings)
    assert merged.config.tie_word_embeddings is False
    merged.save_pretrained(tmp_path / "merged")
    again = LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert (output(again, ids) - unmerged).abs().max() < 1e-4
    # The one-call paths merge the same way.
    one_call = UniLoraAutoModel.from_pretrained(tied_llama(), tmp_path / "adapter", merge=True)
    assert torch.equal(one_call.model.embed_tokens.weight, embeddings)
    assert (output(one_call, ids) - unmerged).abs().max() < 1e-4

