"""Adapter files: save -> load gives the same outputs; every bad file gets a clear error."""

import json
import os

import pytest
import torch
from models import STORIES, TINY, minilm_path, output, tiny_bert, tiny_llama, tokens
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from unilora_hf import (
    AdapterFormatError, AdapterIntegrityError, LayoutMismatchError, UniLoraAutoModel, UniLoraConfig, get_adapter, inject_adapter,
    read_adapter,
)


def trained(model, config, seed=3):
    adapter = inject_adapter(model, config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        adapter.theta_d.copy_(torch.randn(config.theta_d_length, generator=g))
        for p in adapter.trainable_state().values():
            p.add_(torch.randn(p.shape, generator=g))
    return adapter


@pytest.mark.parametrize("projection", ["native", "peft"])
@pytest.mark.parametrize("arch", list(TINY))
def test_save_load_round_trip_is_bit_identical(tmp_path, arch, projection):
    cfg = UniLoraConfig(r=2, theta_d_length=77, projection=projection, target_modules="all-linear",
                        modules_to_save=["classifier"] if arch in ("bert", "roberta") else None)
    model = TINY[arch]()
    adapter = trained(model, cfg)
    ids = tokens(model)
    expected = output(model, ids)
    adapter.save_adapter(tmp_path)
    loaded = UniLoraAutoModel.from_pretrained(TINY[arch](), tmp_path)
    assert torch.equal(output(loaded, ids), expected)
    merged = UniLoraAutoModel.from_pretrained(TINY[arch](), tmp_path, merge=True)
    assert not hasattr(merged, "unilora_theta_d")
    assert torch.allclose(output(merged, ids), expected, atol=1e-5)


def test_native_files_are_not_peft_files_and_peft_cannot_load_them(tmp_path):
    model = tiny_llama()
    trained(model, UniLoraConfig(r=2, theta_d_length=64, target_modules=["q_proj", "v_proj"])).save_adapter(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["unilora_config.json", "unilora_model.safetensors"]
    from peft import PeftModel

    with pytest.raises(ValueError):
        PeftModel.from_pretrained(tiny_llama(), str(tmp_path))


def test_adapter_file_for_d_23040_is_theta_plus_a_header(tmp_path):
    model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
    adapter = inject_adapter(model, UniLoraConfig(r=4, theta_d_length=23_040, target_modules=["query", "value"]))
    paths = adapter.save_adapter(tmp_path)
    weights = os.path.getsize(paths[1])
    assert 92_160 < weights < 92_160 + 512, weights
    assert os.path.getsize(paths[0]) < 2048
    meta = json.loads(open(paths[0]).read())
    assert meta["D"] == 12 * 4 * (384 + 384) and meta["projection_spec"] == "native-feistel-v1"
    assert meta["layout"]["groups"][0]["at"] == "0-5"
    assert meta["base_model"]["auto_class"] == "AutoModelForSequenceClassification"


def test_real_minilm_with_classifier_round_trip(tmp_path):
    model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=3)
    adapter = trained(model, UniLoraConfig(r=4, theta_d_length=2000, target_modules=["query", "value"],
                                           modules_to_save=["classifier"]))
    ids = torch.tensor([[101, 2023, 3185, 2001, 2307, 102]])
    expected = output(model, ids)
    adapter.save_adapter(tmp_path)
    loaded = UniLoraAutoModel.from_pretrained(str(minilm_path()), tmp_path)
    assert loaded.config.num_labels == 3
    assert torch.equal(output(loaded, ids), expected)


def test_real_stories260k_round_trip_generates_the_same_text(tmp_path):
    model = AutoModelForCausalLM.from_pretrained(STORIES)
    trained(model, UniLoraConfig(r=4, theta_d_length=512, target_modules="all-linear"))
    get_adapter(model).theta_d.data.mul_(0.05)
    ids = torch.tensor([[1, 403, 407, 261, 378]])
    expected = model.generate(ids, max_new_tokens=12, do_sample=False)
    logits = output(model, ids)
    get_adapter(model).save_adapter(tmp_path)
    loaded = UniLoraAutoModel.from_pretrained(str(STORIES), tmp_path)
    assert torch.equal(output(loaded, ids), logits)
    assert torch.equal(loaded.generate(ids, max_new_tokens=12, do_sample=False), expected)


# -- bad input -----------------------------------------------------------------------------------
@pytest.fixture
def saved(tmp_path):
    model = tiny_llama()
    trained(model, UniLoraConfig(r=2, theta_d_length=50, target_modules=["q_proj", "v_proj"])).save_adapter(tmp_path)
    return tmp_path


def test_truncated_and_corrupt_safetensors(saved):
    path = saved / "unilora_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterFormatError, match="truncated or corrupt"):
        read_adapter(saved)
    path.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(AdapterFormatError, match="not a readable safetensors file"):
        read_adapter(saved)


def peft_written(folder, theta, extra=None, **config):
    """An adapter folder as PEFT itself writes one (no unilora_hf record, so no digest or checksum)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "UNILORA", "r": 2, "theta_d_length": 50, "proj_seed": 0, "target_modules": ["q_proj", "v_proj"],
        **config}))
    save_file({"base_model.unilora_theta_d": theta, **(extra or {})}, str(folder / "adapter_model.safetensors"))
    return folder


def test_theta_of_wrong_length_or_dtype(tmp_path):
    with pytest.raises(AdapterFormatError, match=r"shape \(49,\).*theta_d_length = 50"):
        read_adapter(peft_written(tmp_path / "a", torch.zeros(49)))
    with pytest.raises(AdapterFormatError, match="torch.int32"):
        read_adapter(peft_written(tmp_path / "b", torch.zeros(50, dtype=torch.int32)))
    with pytest.raises(AdapterFormatError, match="torch.float64"):  # widening to float32 would round
        read_adapter(peft_written(tmp_path / "c", torch.zeros(50, dtype=torch.float64)))
    half = read_adapter(peft_written(tmp_path / "d", torch.linspace(-1, 1, 50).half()))  # as PEFT after model.half()
    assert half.theta_d.dtype == torch.float32 and torch.equal(half.theta_d, torch.linspace(-1, 1, 50).half().float())


def test_edited_weights_are_refused_by_the_checksum(saved):
    path = saved / "unilora_model.safetensors"
    save_file({"unilora.theta_d": torch.zeros(50)}, str(path))  # valid safetensors, but not what was saved
    with pytest.raises(AdapterIntegrityError, match="digest"):
        read_adapter(saved)


def test_missing_unknown_config_fields_and_versions(saved):
    path = saved / "unilora_config.json"
    good = json.loads(path.read_text())
    for mutate, message in [
        (lambda c: c.pop("D"), r"lacks the field\(s\) \['D'\]"),
        (lambda c: c["config"].update(alpha=16), "unknown UniLoraConfig field"),
        (lambda c: c["config"].update(r=0), "UniLoraConfig.r = 0"),
        (lambda c: c.update(projection_spec="native-feistel-v9"), "native-feistel-v9.*Upgrade unilora_hf"),
        (lambda c: c.update(format_version=7), "v7.*Upgrade"),
    ]:
        broken = json.loads(json.dumps(good))
        mutate(broken)
        path.write_text(json.dumps(broken))
        with pytest.raises(AdapterFormatError, match=message):
            read_adapter(saved)
    path.write_text("{not json")
    with pytest.raises(AdapterFormatError, match="not valid JSON"):
        read_adapter(saved)


def test_layout_mismatch_names_the_first_differing_module(saved):
    from transformers import LlamaConfig, LlamaForCausalLM

    wider = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=44, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=1, vocab_size=96))
    with pytest.raises(LayoutMismatchError, match=r"'model.layers.0.self_attn.v_proj'.*32x8.*32x16"):
        UniLoraAutoModel.from_pretrained(wider, saved)
    assert not hasattr(wider, "unilora_theta_d")  # nothing was attached
    deeper = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=44, num_hidden_layers=3,
                                          num_attention_heads=4, num_key_value_heads=2, vocab_size=96))
    with pytest.raises(LayoutMismatchError, match="'model.layers.2.self_attn.q_proj'.*not trained on"):
        UniLoraAutoModel.from_pretrained(deeper, saved)


def test_pickle_only_adapter_is_refused_without_unpickling(tmp_path, monkeypatch):
    torch.save({"base_model.unilora_theta_d": torch.zeros(4)}, tmp_path / "adapter_model.bin")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load was called on a download"))
    with pytest.raises(AdapterFormatError, match="never unpickles"):
        read_adapter(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "UNILORA", "r": 4, "theta_d_length": 4,
                                                              "proj_seed": 0, "target_modules": ["q_proj"]}))
    with pytest.raises(AdapterFormatError, match="never unpickles"):
        read_adapter(tmp_path)


def test_other_folders_say_what_they_hold(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    with pytest.raises(AdapterFormatError, match="PEFT LORA adapter, not a Uni-LoRA one"):
        read_adapter(tmp_path)
    os.remove(tmp_path / "adapter_config.json")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(AdapterFormatError, match="holds no Uni-LoRA adapter.*notes.txt"):
        read_adapter(tmp_path)
    with pytest.raises(AdapterFormatError, match="does not exist"):
        read_adapter(tmp_path / "nope")


def test_heads_that_do_not_fit_are_refused(tmp_path):
    model = tiny_bert(num_labels=3)
    trained(model, UniLoraConfig(r=2, theta_d_length=30, target_modules=["query"],
                                 modules_to_save=["classifier"])).save_adapter(tmp_path)
    with pytest.raises(LayoutMismatchError, match=r"classifier\.(weight|bias).*num_labels"):
        UniLoraAutoModel.from_pretrained(tiny_bert(num_labels=5), tmp_path)
    theta = load_file(tmp_path / "unilora_model.safetensors")["unilora.theta_d"]
    head = tiny_bert(num_labels=3).classifier.weight.detach()
    folder = peft_written(tmp_path / "peft", theta[:30].contiguous(), {"base_model.model.classifier.weight": head},
                          theta_d_length=30, target_modules=["query"], modules_to_save=["classifier"])
    with pytest.raises(AdapterFormatError, match=r"missing \['classifier.bias'\]"):
        UniLoraAutoModel.from_pretrained(tiny_bert(num_labels=3), folder)


def test_from_pretrained_passes_dtype_to_the_base_and_keeps_theta_in_float32(tmp_path):
    model = AutoModelForCausalLM.from_pretrained(STORIES)
    trained(model, UniLoraConfig(r=2, theta_d_length=256, target_modules=["q_proj", "v_proj"]))
    get_adapter(model).save_adapter(tmp_path)
    loaded = UniLoraAutoModel.from_pretrained(str(STORIES), tmp_path, dtype=torch.bfloat16)
    assert loaded.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert get_adapter(loaded).theta_d.dtype == torch.float32
    ids = torch.tensor([[1, 403, 407, 261, 378]])
    reference = output(model, ids)
    assert torch.allclose(output(loaded, ids).float(), reference, atol=0.15, rtol=0.05)
