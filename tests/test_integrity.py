"""Exact or refused: every adapter loads as the function it was saved as, or is refused with one clear error."""

import json

import pytest
import torch
from models import output, tiny_bert, tiny_llama, tokens
from peft import PeftModel, get_peft_model
from peft import UniLoraConfig as PeftUniLoraConfig
from safetensors.torch import save_file
from test_security import peft_written, saved_adapter
from transformers import AutoModel

from unilora_hf import (
    AdapterFormatError, AdapterIntegrityError, InvalidConfigError, LayoutMismatchError, UniLoraAutoModel,
    UniLoraConfig, get_adapter, inject_adapter, load_adapter, read_adapter,
)
from unilora_hf.safe_io import parse_safetensors_header


def trained(model, config):
    adapter = inject_adapter(model, config)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        adapter.theta_d.copy_(torch.randn(adapter.theta_d.shape, generator=g))
        for p in adapter.trainable_state().values():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return adapter


def bert_adapter(folder, projection="native"):
    model = tiny_bert()
    trained(model, UniLoraConfig(r=2, theta_d_length=60, projection=projection, target_modules=["query", "value"],
                                 modules_to_save=["classifier"], bias="unilora_only")).save_adapter(folder)
    return model


@pytest.mark.parametrize("field,value", [
    ("proj_seed", 43), ("r", 3), ("target_modules", ["query"]), ("bias", "none"), ("modules_to_save", None),
    ("projection", "peft"),
])
def test_an_edited_config_field_is_refused(tmp_path, field, value):
    bert_adapter(tmp_path)
    config = json.loads((tmp_path / "unilora_config.json").read_text())
    config["config"][field] = value
    if field == "projection":
        config["projection_spec"] = "peft-0.21"
    (tmp_path / "unilora_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterIntegrityError, match="digest"):
        load_adapter(tiny_bert(), tmp_path)


@pytest.mark.parametrize("field,value", [("D", 10_000), ("layout.fingerprint", "sha256:" + "1" * 64),
                                         ("base_model.auto_class", "AutoModel"),
                                         ("base_model.config_overrides", {"num_labels": 5})])
def test_an_edited_record_that_defines_the_function_is_refused(tmp_path, field, value):
    bert_adapter(tmp_path)
    config = json.loads((tmp_path / "unilora_config.json").read_text())
    *path, key = field.split(".")
    node = config
    for part in path:
        node = node[part]
    node[key] = value
    (tmp_path / "unilora_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterIntegrityError):
        read_adapter(tmp_path)


def test_edits_of_a_peft_format_adapter_written_here_are_refused(tmp_path):
    bert_adapter(tmp_path, projection="peft")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    for key, value in (("r", 4), ("proj_seed", 1), ("theta_d_length", 60), ("target_modules", ["value"])):
        edited = {**config, key: value}
        (tmp_path / "adapter_config.json").write_text(json.dumps(edited))
        if key == "theta_d_length":  # unchanged value: still loads
            read_adapter(tmp_path)
            continue
        with pytest.raises(AdapterIntegrityError, match="digest"):
            read_adapter(tmp_path)
    # Fields PEFT writes that do not define the function may change freely.
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "inference_mode": False,
                                                              "base_model_name_or_path": "elsewhere/bert"}))
    read_adapter(tmp_path)


@pytest.mark.parametrize("tensor", ["unilora.theta_d", "model.classifier.weight",
                                    "model.bert.encoder.layer.0.attention.self.query.bias"])
def test_a_flipped_byte_in_theta_or_a_head_is_refused(tmp_path, tensor):
    bert_adapter(tmp_path)
    path = tmp_path / "unilora_model.safetensors"
    data = bytearray(path.read_bytes())
    entries, _, start = parse_safetensors_header(bytes(data), "x")
    entry = entries[tensor]
    data[start + (entry.begin + entry.end) // 2] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(AdapterIntegrityError, match="checksum"):
        load_adapter(tiny_bert(), tmp_path)


def test_non_finite_theta_or_heads_are_refused(tmp_path):
    theta = torch.zeros(50)
    theta[7] = float("nan")
    with pytest.raises(AdapterIntegrityError, match="1 NaN/inf"):
        read_adapter(_with_theta(peft_written(tmp_path / "a"), theta))
    head = torch.zeros(3, 24)
    head[0, 0] = float("inf")
    folder = peft_written(tmp_path / "b", target_modules=["query"], modules_to_save=["classifier"],
                          tensors={"base_model.model.classifier.weight": head})
    with pytest.raises(AdapterIntegrityError, match="classifier.weight.*NaN/inf"):
        read_adapter(folder)
    model = tiny_llama()  # and nothing of the kind can be saved in the first place
    adapter = inject_adapter(model, UniLoraConfig(r=2, theta_d_length=40, target_modules=["q_proj"]))
    with torch.no_grad():
        adapter.theta_d[3] = float("inf")
    with pytest.raises(AdapterIntegrityError, match="nothing was written"):
        adapter.save_adapter(tmp_path / "c")
    assert not (tmp_path / "c").exists()


def _with_theta(folder, theta):
    save_file({"base_model.unilora_theta_d": theta}, str(folder / "adapter_model.safetensors"))
    return folder


def test_heads_are_cast_between_float_dtypes_and_never_reinterpreted(tmp_path):
    head = torch.randn(3, 24, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    bias = torch.randn(3, generator=torch.Generator().manual_seed(1)).half()
    base = tiny_bert()
    theta = torch.randn(40, generator=torch.Generator().manual_seed(2))
    folder = peft_written(tmp_path / "a", theta_len=40, target_modules=["query"], modules_to_save=["classifier"],
                          tensors={"base_model.model.classifier.weight": head, "base_model.model.classifier.bias": bias})
    save_file({"base_model.unilora_theta_d": theta, "base_model.model.classifier.weight": head,
               "base_model.model.classifier.bias": bias}, str(folder / "adapter_model.safetensors"))
    load_adapter(base, folder)
    assert torch.equal(base.classifier.weight, head.float()) and torch.equal(base.classifier.bias, bias.float())
    as_int = peft_written(tmp_path / "b", theta_len=40, target_modules=["query"], modules_to_save=["classifier"],
                          tensors={"base_model.model.classifier.weight": head.view(torch.int16),
                                   "base_model.model.classifier.bias": bias})
    with pytest.raises(AdapterFormatError, match="torch.int16.*never reinterpreted"):
        load_adapter(tiny_bert(), as_int)


def test_a_folder_with_two_adapters_names_both(tmp_path):
    bert_adapter(tmp_path / "native")
    bert_adapter(tmp_path / "peft", projection="peft")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (tmp_path / "native" / name).write_bytes((tmp_path / "peft" / name).read_bytes())
    with pytest.raises(AdapterFormatError, match=r"two adapters.*unilora_config.json.*adapter_config.json"):
        load_adapter(tiny_bert(), tmp_path / "native")


def test_theta_d_longer_than_D_is_refused(tmp_path):
    with pytest.raises(InvalidConfigError, match=r"theta_d_length = 1,000 exceeds D = 256"):
        inject_adapter(tiny_llama(), UniLoraConfig(r=2, theta_d_length=1000, target_modules=["q_proj"]))
    folder = peft_written(tmp_path / "a", theta_len=1000, target_modules=["q_proj"])
    model = tiny_llama()
    with pytest.raises(LayoutMismatchError, match="exceeds D"):
        load_adapter(model, folder)
    assert not hasattr(model, "unilora_theta_d")


def test_an_adapter_for_another_architecture_is_a_layout_mismatch(tmp_path):
    saved_adapter(tmp_path / "llama")
    with pytest.raises(LayoutMismatchError, match="does not fit the adapter.*matched no module"):
        load_adapter(tiny_bert(), tmp_path / "llama")
    peft_dir = tmp_path / "peft"
    pm = get_peft_model(tiny_llama(), PeftUniLoraConfig(r=2, theta_d_length=64, target_modules=["q_proj"]))
    pm.save_pretrained(str(peft_dir))
    with pytest.raises(LayoutMismatchError, match="q_proj"):
        load_adapter(tiny_bert(), peft_dir)


def test_a_smaller_base_is_refused_for_a_peft_format_adapter_written_here(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    saved_adapter(tmp_path / "a", projection="peft")  # 2 layers: D = 384
    one_layer = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=44, num_hidden_layers=1,
                                             num_attention_heads=4, num_key_value_heads=2, vocab_size=96))
    with pytest.raises(LayoutMismatchError, match="not trained on|does not adapt|D ="):
        load_adapter(one_layer, tmp_path / "a")


@pytest.mark.parametrize("task", [None, "SEQ_CLS"])
def test_the_base_folder_architecture_is_built_when_the_adapter_names_no_task(tmp_path, task):
    base = tiny_bert()
    base.save_pretrained(tmp_path / "base")
    pm = get_peft_model(tiny_bert(), PeftUniLoraConfig(r=2, theta_d_length=64, target_modules=["query"],
                                                       modules_to_save=["classifier"], task_type=task))
    with torch.no_grad():
        pm.base_model.unilora_theta_d["default"].normal_()
    pm.save_pretrained(str(tmp_path / "adapter"))
    ids = tokens(base)
    expected = output(pm.eval(), ids)
    model = UniLoraAutoModel.from_pretrained(str(tmp_path / "base"), tmp_path / "adapter")
    assert type(model).__name__ == "BertForSequenceClassification"
    assert torch.equal(output(model, ids), expected)
    plain = AutoModel.from_pretrained(tmp_path / "base")  # what the base folder gives without its architecture
    assert type(plain).__name__ == "BertModel"


def test_peft_projection_on_a_bf16_base_uses_peft_s_bf16_scales(tmp_path):
    """PEFT 0.21.2 keeps its scales in the base weight's dtype: on a bf16 base, 1/sqrt(n) is rounded to bf16
    (0.40825 -> 0.40820 for n = 6). The peft projection reproduces what PEFT computes there, bit for bit in
    A and B; the products then run in bf16 (PEFT runs them in float32), so the logits agree to bf16 rounding."""
    pm = get_peft_model(tiny_llama().to(torch.bfloat16), PeftUniLoraConfig(
        r=2, theta_d_length=70, target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        pm.base_model.unilora_theta_d["default"].normal_()
    pm.save_pretrained(str(tmp_path))
    layer = pm.base_model.model.model.layers[0].self_attn.q_proj
    scales = layer.unilora_scales_A["default"]  # rounded to bf16 at injection (then upcast by PEFT's autocast)
    assert torch.equal(scales, scales.to(torch.bfloat16).float()) and (scales - 0.3162).abs().min() > 1e-4
    peft_A, peft_B = layer._get_lora_matrices("default")
    model = tiny_llama().to(torch.bfloat16)
    adapter = load_adapter(model, tmp_path)
    ours_A, ours_B = model.model.layers[0].self_attn.q_proj.lora_matrices()
    assert torch.equal(ours_A, peft_A.float()) and torch.equal(ours_B, peft_B.float())
    assert adapter.projection.scale_dtype == torch.bfloat16
    on_fp32 = tiny_llama()
    load_adapter(on_fp32, tmp_path)  # the same file on a float32 base: PEFT's float32 scales
    A32, _ = on_fp32.model.layers[0].self_attn.q_proj.lora_matrices()
    assert not torch.equal(A32, ours_A)
    ids = tokens(model)
    ours, theirs = output(model, ids).float(), output(pm.eval(), ids).float()
    assert (ours - theirs).abs().max() <= 0.02 * theirs.abs().max()
