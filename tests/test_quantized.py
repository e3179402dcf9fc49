"""A bitsandbytes 4-bit base (QLoRA-style): θ_d trains on top of frozen quantized weights, through
UniLoraTrainer, against the same adapter on the dequantized base in bf16. Needs CUDA and bitsandbytes
(run on the GPU machine); on CPU only the refusal of other quantization methods is checked."""

import importlib.util

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, TrainingArguments

from unilora_hf import AdapterStateError, UniLoraAutoModel, UniLoraConfig, UniLoraTrainer, get_adapter, inject_adapter
from unilora_hf.trainer import _refuse_quantized

CFG = UniLoraConfig(r=4, theta_d_length=512, target_modules="all-linear", init_theta_d_bound=0.2)


def test_quantization_methods_other_than_bitsandbytes_are_refused():
    class Quantizer:
        class quantization_config:
            quant_method = "gptq"

    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, vocab_size=64))
    model.hf_quantizer = Quantizer()
    with pytest.raises(ValueError, match="quantized with 'gptq'.*bitsandbytes"):
        _refuse_quantized(model)


needs_bnb = pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("bitsandbytes") is None,
    reason="needs CUDA and bitsandbytes",
)


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, max_position_embeddings=128)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def _load_4bit(path):
    from transformers import BitsAndBytesConfig

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_type="nf4")
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=q, device_map={"": 0})


def _dequantized_bf16(path, quantized):
    """The same base in bf16 with every 4-bit weight replaced by its dequantized value."""
    import bitsandbytes as bnb

    dense = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda()
    for name, module in quantized.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            w = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
            dense.get_submodule(name).weight.data.copy_(w.to(torch.bfloat16))
    return dense


@pytest.mark.gpu
@needs_bnb
def test_4bit_base_matches_dequantized_reference_and_trains(checkpoint, tmp_path):
    import bitsandbytes as bnb

    quantized = _load_4bit(checkpoint)
    dense = _dequantized_bf16(checkpoint, quantized)
    torch.manual_seed(1)
    adapter = inject_adapter(quantized, CFG)
    assert sum(isinstance(m.base_layer, bnb.nn.Linear4bit) for _, m in adapter.wrapped_layers()) == 14
    inject_adapter(dense, CFG, theta_d=adapter.theta_d.detach().cpu())
    ids = torch.randint(0, 256, (2, 24), device="cuda")
    with torch.no_grad():
        with adapter.disabled():
            base_q = quantized(input_ids=ids).logits.float()
        got = quantized(input_ids=ids).logits.float()
        want = dense(input_ids=ids).logits.float()
    effect = (got - base_q).norm()
    assert effect > 0.01 * base_q.norm()  # the adapter acts on a 4-bit base (PEFT's uint8 scales zero it)
    assert (got - want).norm() <= 0.05 * effect + 0.01 * want.norm()
    (quantized(input_ids=ids).logits.float().square().mean()).backward()
    grad = adapter.theta_d.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    with pytest.raises(AdapterStateError, match="quantized weight"):
        adapter.merge()

    # UniLoraTrainer accepts the 4-bit base (transformers' own check refuses non-PEFT quantized models)
    quantized = _load_4bit(checkpoint)
    frozen = {n: p.detach().clone() for n, p in quantized.named_parameters()}
    rows = [{"input_ids": ids[0].tolist(), "labels": ids[0].tolist()}] * 16
    args = TrainingArguments(str(tmp_path / "run"), per_device_train_batch_size=4, max_steps=12, learning_rate=2e-3,
                             logging_steps=1, report_to=[], save_strategy="no", bf16=True)
    trainer = UniLoraTrainer(quantized, args, train_dataset=rows, unilora_config=CFG, unilora_learning_rate=2e-2)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < losses[0]
    for n, p in get_adapter(quantized).model.named_parameters():
        if n != "unilora_theta_d":
            key = n.replace(".base_layer.", ".")
            assert torch.equal(p.detach(), frozen[key]), n
    trainer.save_model(str(tmp_path / "adapter"))
    with torch.no_grad():
        trained = quantized(input_ids=ids).logits
    reloaded = UniLoraAutoModel.from_pretrained(_load_4bit(checkpoint), str(tmp_path / "adapter"))
    assert torch.equal(get_adapter(reloaded).theta_d, get_adapter(quantized).theta_d)
    with torch.no_grad():  # the trained model's forward still runs under accelerate's bf16 autocast wrapper
        again = reloaded(input_ids=ids).logits.float()
    assert (again - trained.float()).norm() <= 2e-2 * trained.float().norm()
