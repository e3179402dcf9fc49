"""Exact interchange with the installed PEFT (0.21.2): both directions, and export to plain LoRA."""

import pytest
import torch
from models import output, tiny_bert, tiny_gpt2, tiny_llama, tokens
from peft import PeftModel, get_peft_model
from peft import UniLoraConfig as PeftUniLoraConfig

from unilora_hf import UniLoraAutoModel, UniLoraConfig, export_lora, get_adapter, inject_adapter

CASES = {
    "llama": (tiny_llama, dict(target_modules=["q_proj", "v_proj", "down_proj"]), "CAUSAL_LM"),
    "gpt2": (tiny_gpt2, dict(target_modules=["c_attn", "c_proj"]), "CAUSAL_LM"),
    "bert": (tiny_bert, dict(target_modules=["query", "value"], modules_to_save=["classifier"]), "SEQ_CLS"),
}


def randomize(theta, heads=()):
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        theta.copy_(torch.randn(theta.shape, generator=g) * 0.5)
        for p in heads:
            p.add_(torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("arch", list(CASES))
def test_our_peft_kind_adapter_loads_in_peft_with_identical_logits(tmp_path, arch):
    build, targets, _ = CASES[arch]
    model = build()
    adapter = inject_adapter(model, UniLoraConfig(r=3, theta_d_length=101, proj_seed=7, projection="peft", **targets))
    randomize(adapter.theta_d, adapter.trainable_state().values())
    ids = tokens(model)
    ours = output(model, ids)
    adapter.save_adapter(tmp_path)
    peft_model = PeftModel.from_pretrained(build(), str(tmp_path)).eval()
    assert torch.equal(output(peft_model, ids), ours)


@pytest.mark.parametrize("arch", list(CASES))
def test_peft_saved_adapter_loads_here_with_identical_logits(tmp_path, arch):
    build, targets, task = CASES[arch]
    peft_model = get_peft_model(build(), PeftUniLoraConfig(r=3, theta_d_length=101, proj_seed=5, task_type=task,
                                                           **targets))
    theta = peft_model.base_model.unilora_theta_d["default"]
    heads = [p for n, p in peft_model.named_parameters() if "modules_to_save" in n]
    randomize(theta, heads)
    peft_model.save_pretrained(str(tmp_path))
    peft_model.eval()
    ids = tokens(peft_model)
    theirs = output(peft_model, ids)
    ours = UniLoraAutoModel.from_pretrained(build(), tmp_path)
    assert get_adapter(ours).config.projection == "peft"
    assert torch.equal(output(ours, ids), theirs)


@pytest.mark.parametrize("projection", ["native", "peft"])
@pytest.mark.parametrize("arch", list(CASES))
def test_export_to_plain_lora_gives_the_same_outputs(tmp_path, arch, projection):
    build, targets, _ = CASES[arch]
    model = build()
    adapter = inject_adapter(model, UniLoraConfig(r=2, theta_d_length=64, projection=projection, **targets))
    randomize(adapter.theta_d, adapter.trainable_state().values())
    ids = tokens(model)
    ours = output(model, ids)
    export_lora(model, tmp_path)
    lora = PeftModel.from_pretrained(build(), str(tmp_path)).eval()
    assert lora.peft_config["default"].peft_type.value == "LORA"
    assert torch.allclose(output(lora, ids), ours, atol=1e-6, rtol=1e-5)
