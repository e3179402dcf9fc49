"""UniLoraSFTTrainer: trl's SFTTrainer training θ_d (and heads) only, on the real stories260K."""

import os
import subprocess
import sys

import pytest
import torch

# trl and datasets are dev extras (CI installs them); an image without them (the GPU machine's) skips this file
# instead of failing the whole collection.
pytest.importorskip("trl")
pytest.importorskip("datasets")

from datasets import Dataset  # noqa: E402
from models import REPO, STORIES  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from trl import SFTConfig  # noqa: E402

from unilora_hf import AdapterStateError, UniLoraConfig, get_adapter, read_adapter  # noqa: E402
from unilora_hf.sft_trainer import UniLoraSFTTrainer  # noqa: E402

CFG = UniLoraConfig(r=4, theta_d_length=1024, target_modules="all-linear")
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}Q: {{ m['content'] }}\n"
    "{% else %}A: {% generation %}{{ m['content'] }}{{ eos_token }}{% endgeneration %}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}A: {% endif %}"
)


def sft_args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=4, learning_rate=1e-2,
                logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, seed=0, data_seed=0,
                disable_tqdm=True, max_length=64, gradient_checkpointing=False, lr_scheduler_type="constant")
    return SFTConfig(**{**base, **kw})


def prompt_completion(n=24):
    return Dataset.from_list([{"prompt": f"Tom had {i} red balls. He gave one to Lily. How many are left?",
                               "completion": f" Tom has {i - 1} red balls."} for i in range(2, n + 2)])


def stories(n=24):
    names = ["Lily", "Tom", "Sue", "Ben"]
    return Dataset.from_list([{"text": f"Once upon a time, {names[i % 4]} found a big red ball in the park. "
                                       f"{names[(i + 1) % 4]} wanted to play too."} for i in range(n)])


def losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def assert_loss_falls(trainer):
    got = losses(trainer)
    assert sum(got[-3:]) / 3 < sum(got[:3]) / 3 - 0.1, got


def assert_only_adapter_changed(model, theta0, heads=()):
    """θ_d and the named head copies changed; every base weight equals the real stories260K's."""
    reference = AutoModelForCausalLM.from_pretrained(STORIES).state_dict()
    theta = get_adapter(model).theta_d
    assert theta.dtype == torch.float32 and not torch.equal(theta.detach(), theta0)
    for name, param in model.named_parameters():
        if param is theta:
            continue
        base_name = name.replace(".base_layer.", ".").replace(".original_module.", ".")
        if ".modules_to_save." in name:
            assert name.split(".modules_to_save.")[0] in heads, name
            assert not torch.equal(param.detach().float(), reference[name.replace(".modules_to_save.", ".")]), name
        else:
            assert not param.requires_grad, name
            assert torch.equal(param.detach().float(), reference[base_name].float()), name


def test_string_model_id_completion_only_loss_kilobyte_checkpoints_and_exact_resume(tmp_path):
    def run(out, **kw):
        # SFTConfig's default activation checkpointing (non-reentrant) stays on here
        return UniLoraSFTTrainer(str(STORIES), sft_args(out, save_strategy="steps", save_steps=3,
                                                        gradient_checkpointing=True, **kw),
                                 train_dataset=prompt_completion(), unilora_config=CFG, unilora_learning_rate=2e-2)

    trainer = run(tmp_path / "full")
    model = trainer.model
    assert type(model).__name__ == "LlamaForCausalLM" and get_adapter(model).config == CFG
    assert trainer.processing_class is not None  # loaded from the id, as SFTTrainer does
    assert trainer.optimizer is None and trainer.create_optimizer().param_groups[0]["params"] == [
        get_adapter(model).theta_d]
    # Completion-only loss: the tokens that carry a label are exactly the completion and EOS.
    batch = next(iter(trainer.get_train_dataloader()))
    tok = trainer.processing_class
    for ids, labels in zip(batch["input_ids"], batch["labels"]):
        kept = labels[labels != -100]
        assert torch.equal(kept, ids[labels != -100])
        assert tok.decode(kept).strip().startswith("Tom has") and kept[-1] == tok.eos_token_id
        assert (labels[:5] == -100).all()
    theta0 = get_adapter(model).theta_d.detach().clone()
    trainer.train()
    assert_loss_falls(trainer)
    assert_only_adapter_changed(model, theta0)

    ckpt = tmp_path / "full" / "checkpoint-3"
    files = {f: os.path.getsize(ckpt / f) for f in os.listdir(ckpt)}
    assert {"unilora_config.json", "unilora_model.safetensors"} <= set(files)
    assert not any(f.startswith("model") for f in files), files
    adapter_only = {f: n for f, n in files.items() if not f.startswith(("tokenizer", "special_tokens", "chat_template"))}
    assert sum(adapter_only.values()) < 64 * 1024, files  # the base model's safetensors alone is 1 MB
    assert files["unilora_model.safetensors"] < 4 * CFG.theta_d_length + 1024
    card = (tmp_path / "full" / "README.md").read_text()
    assert "library_name: unilora_hf" in card and "UniLoraAutoModel" in card and "pipeline(" not in card

    resumed = run(tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(ckpt))
    assert torch.equal(get_adapter(resumed.model).theta_d, get_adapter(model).theta_d)
    saved = read_adapter(tmp_path / "full" / "checkpoint-6")
    assert torch.equal(saved.theta_d, get_adapter(model).theta_d.detach())


def test_model_object_with_packing_and_a_trained_head(tmp_path):
    model = AutoModelForCausalLM.from_pretrained(STORIES)
    tok = AutoTokenizer.from_pretrained(STORIES)
    cfg = UniLoraConfig(r=4, theta_d_length=1024, target_modules="all-linear", modules_to_save=["lm_head"])
    data = stories()
    trainer = UniLoraSFTTrainer(model, sft_args(tmp_path, packing=True, max_length=96), train_dataset=data,
                                processing_class=tok, unilora_config=cfg, unilora_learning_rate=2e-2)
    assert trainer.model is model
    # Packed: fewer rows than examples, no padding, every row ≤ max_length, no token lost or added.
    prepared = trainer.train_dataset
    assert len(prepared) < len(data)
    assert all(len(r) <= 96 for r in prepared["input_ids"])
    n_tokens = sum(len(tok(t)["input_ids"]) + 1 for t in data["text"])  # + EOS
    assert sum(len(r) for r in prepared["input_ids"]) == n_tokens
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["input_ids"].shape[0] == 1 and (batch["position_ids"][0] == 0).sum() > 1  # padding-free
    theta0 = get_adapter(model).theta_d.detach().clone()
    trainer.train()
    assert_loss_falls(trainer)
    assert_only_adapter_changed(model, theta0, heads=("lm_head",))
    assert model.lm_head.modules_to_save.weight.dtype == torch.float32


def test_model_init_kwargs_bf16_base_keeps_trainable_params_in_fp32(tmp_path):
    cfg = UniLoraConfig(r=4, theta_d_length=1024, target_modules="all-linear", modules_to_save=["lm_head"])
    trainer = UniLoraSFTTrainer(str(STORIES), sft_args(tmp_path, bf16=True, model_init_kwargs={"dtype": "bfloat16"}),
                                train_dataset=prompt_completion(), unilora_config=cfg, unilora_learning_rate=2e-2)
    model = trainer.model
    assert model.model.layers[0].self_attn.q_proj.base_layer.weight.dtype == torch.bfloat16
    assert get_adapter(model).theta_d.dtype == torch.float32
    assert model.lm_head.modules_to_save.weight.dtype == torch.float32
    assert trainer.args.model_init_kwargs == {"dtype": "bfloat16"}
    trainer.train()
    assert_loss_falls(trainer)
    assert get_adapter(model).theta_d.dtype == torch.float32
    assert model.lm_head.modules_to_save.weight.dtype == torch.float32


def test_conversational_data_assistant_only_loss_and_reentrant_checkpointing(tmp_path):
    tok = AutoTokenizer.from_pretrained(STORIES)
    tok.chat_template = CHAT_TEMPLATE
    data = Dataset.from_list([{"messages": [{"role": "user", "content": f"Where is the {c} ball?"},
                                            {"role": "assistant", "content": f"The {c} ball is in the park."}]}
                              for c in ["red", "blue", "big", "small"] * 6])
    trainer = UniLoraSFTTrainer(
        str(STORIES), sft_args(tmp_path, assistant_only_loss=True, gradient_checkpointing=True,
                               gradient_checkpointing_kwargs={"use_reentrant": True}),
        train_dataset=data, processing_class=tok, unilora_config=CFG, unilora_learning_rate=5e-2)
    model = trainer.model
    batch = next(iter(trainer.get_train_dataloader()))
    for labels in batch["labels"]:
        answer = tok.decode(labels[labels != -100])
        assert answer.startswith("The ") and answer.endswith("ball is in the park.</s>"), answer
    theta0 = get_adapter(model).theta_d.detach().clone()
    trainer.train()
    assert model.model.is_gradient_checkpointing
    assert_loss_falls(trainer)
    assert_only_adapter_changed(model, theta0)


def test_push_to_hub_uploads_the_adapter_repo_with_our_card(tmp_path, hub_server, hf_cache):
    from unilora_hf import UniLoraAutoModel

    trainer = UniLoraSFTTrainer(
        str(STORIES), sft_args(tmp_path, max_steps=2, hub_model_id="alice/stories-sft", hub_token="hf_test_token"),
        train_dataset=prompt_completion(8), unilora_config=CFG, hub_endpoint=hub_server.url)
    trainer.train()
    assert "alice/stories-sft" in trainer.push_to_hub()
    files = hub_server.repo_files("alice/stories-sft")
    assert {"unilora_config.json", "unilora_model.safetensors", "README.md"} <= set(files)
    assert not {"training_args.bin", "tokenizer.json", "model.safetensors"} & set(files)
    card = files["README.md"].decode()
    assert "library_name: unilora_hf" in card and "UniLoraAutoModel.from_pretrained" in card
    assert "pipeline(" not in card  # trl's card would tell users to load the adapter repo as a full model
    loaded = UniLoraAutoModel.from_pretrained(str(STORIES), "alice/stories-sft", endpoint=hub_server.url,
                                              token="hf_test_token", cache_dir=str(hf_cache))
    assert torch.equal(get_adapter(loaded).theta_d.detach(), get_adapter(trainer.model).theta_d.detach())


def test_mixin_on_a_subclass_taking_args_and_kwargs(tmp_path):
    from peft import LoraConfig
    from trl import SFTTrainer

    from unilora_hf import UniLoraSFTMixin

    class MySFTTrainer(SFTTrainer):
        def __init__(self, *args, note="", **kwargs):
            self.note = note
            super().__init__(*args, **kwargs)

    class Mine(UniLoraSFTMixin, MySFTTrainer):
        pass

    trainer = Mine(str(STORIES), sft_args(tmp_path, max_steps=2), None, prompt_completion(8), note="hello",
                   unilora_config=CFG, unilora_learning_rate=3e-2)
    assert trainer.note == "hello" and type(trainer.model).__name__ == "LlamaForCausalLM"
    assert trainer.create_optimizer().param_groups[0]["lr"] == 3e-2
    theta0 = get_adapter(trainer.model).theta_d.detach().clone()
    trainer.train()
    assert not torch.equal(get_adapter(trainer.model).theta_d.detach(), theta0)
    with pytest.raises(ValueError, match="peft_config together with unilora_config"):
        Mine(str(STORIES), sft_args(tmp_path), train_dataset=prompt_completion(8), unilora_config=CFG,
             peft_config=LoraConfig(target_modules=["q_proj"]))


def test_bad_input(tmp_path):
    from peft import LoraConfig, get_peft_model

    args = sft_args(tmp_path)
    with pytest.raises(ValueError, match="peft_config together with unilora_config"):
        UniLoraSFTTrainer(str(STORIES), args, train_dataset=stories(), unilora_config=CFG,
                          peft_config=LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"got peft_config \(trl's --use_peft makes one\): it trains a Uni-LoRA adapter"):
        UniLoraSFTTrainer(str(STORIES), args, train_dataset=stories(),
                          peft_config=LoraConfig(target_modules=["q_proj"]))
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(STORIES), LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(AdapterStateError, match="PEFT adapter"):
        UniLoraSFTTrainer(peft_model, args, train_dataset=stories(), unilora_config=CFG)
    with pytest.raises(ValueError, match="lm_head.weight directly"):
        UniLoraSFTTrainer(str(STORIES), args, train_dataset=stories(),
                          unilora_config=UniLoraConfig(theta_d_length=256, target_modules=["q_proj", "lm_head"]))
    with pytest.raises(ValueError, match="unquantized bases only"):
        UniLoraSFTTrainer(str(STORIES), args, train_dataset=stories(), unilora_config=CFG,
                          quantization_config=object())
    with pytest.raises(ValueError, match="no unilora_config"):
        UniLoraSFTTrainer(str(STORIES), args, train_dataset=stories())


BLOCK_TRL = """
import importlib.abc, sys

class NoTrl(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "trl" or name.startswith("trl."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, NoTrl())
"""


def test_package_imports_without_trl_and_the_sft_trainer_says_how_to_install_it():
    code = BLOCK_TRL + """
import unilora_hf
from unilora_hf import *
assert UniLoraTrainer is unilora_hf.UniLoraTrainer
assert "UniLoraSFTTrainer" not in unilora_hf.__all__
for name in ("UniLoraSFTTrainer", "UniLoraSFTMixin"):
    try:
        getattr(unilora_hf, name)
    except ImportError as exc:
        assert 'pip install "unilora_hf[trl]"' in str(exc), exc
    else:
        raise AssertionError(name + " imported without trl")
try:
    from unilora_hf.sft_trainer import UniLoraSFTTrainer
except ImportError as exc:
    assert 'pip install "unilora_hf[trl]"' in str(exc), exc
else:
    raise AssertionError("unilora_hf.sft_trainer imported without trl")
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]

    with_trl = "import sys, unilora_hf; assert 'trl' not in sys.modules; " \
               "assert 'UniLoraSFTTrainer' in unilora_hf.__all__; " \
               "from unilora_hf import UniLoraSFTTrainer, UniLoraSFTMixin; assert 'trl' in sys.modules; print('ok')"
    done = subprocess.run([sys.executable, "-c", with_trl], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
