"""UniLoraTrainer: a one-line swap for Trainer that trains θ_d (and heads) only."""

import os

import pytest
import torch
from models import STORIES, tiny_bert, tiny_llama
from torch.utils.data import Dataset
from transformers import AutoModelForCausalLM, TrainingArguments

from unilora_hf import LayoutMismatchError, UniLoraConfig, get_adapter
from unilora_hf.trainer import UniLoraTrainer


class Toy(Dataset):
    """A learnable classification task: the label is whether token 5 occurs."""

    def __init__(self, n=64, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(6, 80, (n, 8), generator=g)
        self.labels = torch.randint(0, 2, (n,), generator=g)
        self.ids[self.labels == 1, 3] = 5

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


class Stories(Dataset):
    def __init__(self, n=16, vocab=512):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(3, vocab, (n, 12), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=8, learning_rate=1e-2, report_to=[],
                logging_steps=1, save_strategy="no", use_cpu=True, seed=0, data_seed=0, disable_tqdm=True)
    return TrainingArguments(**{**base, **kw})


CFG = UniLoraConfig(r=4, theta_d_length=200, target_modules=["query", "value"], modules_to_save=["classifier"])


def test_loss_falls_and_only_theta_and_head_change(tmp_path):
    model = tiny_bert(num_labels=2)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = UniLoraTrainer(model, args(tmp_path, num_train_epochs=8), train_dataset=Toy(),
                             unilora_config=CFG, unilora_learning_rate=5e-2)
    assert type(trainer.model).__name__ == "BertForSequenceClassification"
    groups = trainer.create_optimizer().param_groups
    assert groups[0]["params"] == [get_adapter(model).theta_d] and groups[0]["lr"] == 5e-2
    assert groups[0]["weight_decay"] == 0.0
    theta0 = get_adapter(model).theta_d.detach().clone()
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4
    assert not torch.equal(get_adapter(model).theta_d, theta0)
    for name, param in model.named_parameters():
        if name in frozen:  # base weights (also the original head) keep their values
            assert torch.equal(param, frozen[name]), name
    head = model.classifier.modules_to_save.weight
    assert not torch.equal(head, frozen["classifier.weight"])


def test_checkpoints_are_kilobytes_and_resume_is_exact(tmp_path):
    def run(out, **kw):
        model = tiny_bert(num_labels=2)
        torch.manual_seed(0)
        trainer = UniLoraTrainer(model, args(out, max_steps=6, save_strategy="steps", save_steps=3, **kw),
                                 train_dataset=Toy(), unilora_config=CFG, unilora_learning_rate=5e-2)
        return trainer, model

    full, full_model = run(tmp_path / "full")
    full.train()
    ckpt = tmp_path / "full" / "checkpoint-3"
    adapter_files = {"unilora_config.json", "unilora_model.safetensors"}
    assert adapter_files <= set(os.listdir(ckpt))
    assert "model.safetensors" not in os.listdir(ckpt)  # kilobytes: the base model is never written
    assert sum(os.path.getsize(ckpt / f) for f in adapter_files) < 8 * 1024
    resumed, resumed_model = run(tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(ckpt))
    assert torch.equal(get_adapter(resumed_model).theta_d, get_adapter(full_model).theta_d)
    assert torch.equal(resumed_model.classifier.modules_to_save.weight, full_model.classifier.modules_to_save.weight)


def test_resume_from_another_layout_is_refused(tmp_path):
    model = tiny_bert(num_labels=2)
    trainer = UniLoraTrainer(model, args(tmp_path / "a", max_steps=1, save_strategy="steps", save_steps=1),
                             train_dataset=Toy(), unilora_config=CFG)
    trainer.train()
    other = UniLoraTrainer(tiny_bert(num_labels=2), args(tmp_path / "b", max_steps=2), train_dataset=Toy(),
                           unilora_config=UniLoraConfig(r=4, theta_d_length=200, target_modules=["query"],
                                                        modules_to_save=["classifier"]))
    with pytest.raises(LayoutMismatchError, match="another adapter layout"):
        other.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-1"))


def test_load_best_model_at_end_and_eval(tmp_path):
    def metrics(p):
        return {"accuracy": float((p.predictions.argmax(-1) == p.label_ids).mean())}

    model = tiny_bert(num_labels=2)
    trainer = UniLoraTrainer(
        model, args(tmp_path, max_steps=6, eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=2,
                    load_best_model_at_end=True, metric_for_best_model="accuracy"),
        train_dataset=Toy(), eval_dataset=Toy(32, seed=1), compute_metrics=metrics, unilora_config=CFG,
        unilora_learning_rate=5e-2)
    trainer.train()
    best = trainer.state.best_model_checkpoint
    from unilora_hf import read_adapter

    assert torch.equal(get_adapter(model).theta_d.detach(), read_adapter(best).theta_d)
    assert "eval_accuracy" in trainer.evaluate()


def test_real_stories260k_with_gradient_accumulation_and_checkpointing(tmp_path):
    model = AutoModelForCausalLM.from_pretrained(STORIES)
    trainer = UniLoraTrainer(
        model, args(tmp_path, max_steps=8, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                    gradient_checkpointing=True),
        train_dataset=Stories(), unilora_config=UniLoraConfig(r=4, theta_d_length=2048, target_modules="all-linear"),
        unilora_learning_rate=2e-2)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < losses[0]
    trainer.save_model(str(tmp_path / "final"))
    assert sorted(os.listdir(tmp_path / "final")) == ["training_args.bin", "unilora_config.json",
                                                      "unilora_model.safetensors"]


def test_model_init_gets_a_fresh_adapter_each_time(tmp_path):
    trainer = UniLoraTrainer(args=args(tmp_path, max_steps=2), train_dataset=Toy(),
                             model_init=lambda *a: tiny_bert(num_labels=2), unilora_config=CFG)
    first = trainer.model
    trainer.train()
    assert get_adapter(trainer.model).config == CFG and trainer.model is not first


def test_bad_trainer_input(tmp_path):
    with pytest.raises(ValueError, match="no unilora_config"):
        UniLoraTrainer(tiny_bert(), args(tmp_path))
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(tiny_bert(), LoraConfig(target_modules=["query"]))
    with pytest.raises(Exception, match="PEFT adapter"):
        UniLoraTrainer(peft_model.base_model.model, args(tmp_path), unilora_config=CFG)
    with pytest.raises(ValueError, match="matched no module"):
        UniLoraTrainer(tiny_bert(), args(tmp_path), unilora_config=UniLoraConfig(target_modules=["nothing"]))


def test_training_summary_lists_only_what_applied(tmp_path):
    with_head = UniLoraTrainer(tiny_bert(num_labels=2), args(tmp_path, max_steps=2), train_dataset=Toy(),
                               unilora_config=CFG, unilora_learning_rate=5e-2)
    hyper = with_head.training_summary()["hyperparameters"]
    assert hyper["unilora_learning_rate"] == 5e-2 and hyper["learning_rate (heads)"] == 1e-2
    assert hyper["max_steps"] == 2 and "num_train_epochs" not in hyper  # Trainer ignores epochs then
    no_head = UniLoraTrainer(tiny_bert(num_labels=2), args(tmp_path, num_train_epochs=2), train_dataset=Toy(),
                             unilora_config=UniLoraConfig(r=2, theta_d_length=50, target_modules=["query"]))
    hyper = no_head.training_summary()["hyperparameters"]
    assert "learning_rate (heads)" not in hyper and "max_steps" not in hyper
    assert hyper["num_train_epochs"] == 2 and hyper["unilora_learning_rate"] == 1e-2


def test_args_seed_sets_theta_d_initial_values(tmp_path):
    thetas = []
    for _ in range(2):
        torch.manual_seed(len(thetas))  # a different global RNG state each time
        trainer = UniLoraTrainer(tiny_bert(num_labels=2), args(tmp_path, seed=7), train_dataset=Toy(),
                                 unilora_config=CFG)
        thetas.append(get_adapter(trainer.model).theta_d.detach().clone())
    assert torch.equal(thetas[0], thetas[1])


@pytest.mark.parametrize("base_dtype", [torch.float32, torch.bfloat16])
def test_bf16_mixed_precision_keeps_trainable_params_in_fp32(tmp_path, base_dtype):
    model = tiny_bert(num_labels=2).to(base_dtype)
    trainer = UniLoraTrainer(model, args(tmp_path, num_train_epochs=8, bf16=True), train_dataset=Toy(),
                             unilora_config=CFG, unilora_learning_rate=5e-2)
    adapter = get_adapter(model)
    assert adapter.theta_d.dtype == torch.float32
    assert model.classifier.modules_to_save.weight.dtype == torch.float32  # upcast from a bf16 base
    assert model.bert.encoder.layer[0].attention.self.query.base_layer.weight.dtype == base_dtype
    theta0 = adapter.theta_d.detach().clone()
    seen = []
    hook = model.bert.encoder.layer[0].attention.self.query.register_forward_hook(
        lambda mod, inp, out: seen.append(out.dtype))
    trainer.train()
    hook.remove()
    assert seen and set(seen) == {torch.bfloat16}  # autocast ran the forward in bf16
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4
    assert adapter.theta_d.dtype == torch.float32 and not torch.equal(adapter.theta_d.detach(), theta0)
    assert model.classifier.modules_to_save.weight.dtype == torch.float32


@pytest.mark.slow
def test_torch_compile_trains_like_eager(tmp_path):
    """torch_compile=True with CPU inductor (needs a C++ compiler): the compiled run reaches the eager θ_d
    (the default, native projection: its readout is a custom op inside the graph)."""
    cfg = UniLoraConfig(r=4, theta_d_length=200, target_modules=["query", "value"], modules_to_save=["classifier"])

    def run(out, compile_):
        model = tiny_bert(num_labels=2)
        for module in model.modules():  # compiled and eager dropout draw different masks
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        torch.manual_seed(0)
        trainer = UniLoraTrainer(model, args(out, max_steps=3, torch_compile=compile_), train_dataset=Toy(),
                                 unilora_config=cfg, unilora_learning_rate=5e-2)
        theta0 = get_adapter(model).theta_d.detach().clone()
        trainer.train()
        assert not torch.equal(get_adapter(model).theta_d.detach(), theta0)
        return trainer, model

    eager, eager_model = run(tmp_path / "eager", False)
    compiled, compiled_model = run(tmp_path / "compiled", True)
    assert isinstance(compiled.model_wrapped, torch._dynamo.eval_frame.OptimizedModule)
    assert compiled.model is compiled_model
    torch.testing.assert_close(get_adapter(compiled_model).theta_d, get_adapter(eager_model).theta_d,
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(compiled_model.classifier.modules_to_save.weight,
                               eager_model.classifier.modules_to_save.weight, rtol=1e-5, atol=1e-5)
    compiled.save_model(str(tmp_path / "final"))
    assert sorted(os.listdir(tmp_path / "final")) == ["training_args.bin", "unilora_config.json",
                                                      "unilora_model.safetensors"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_torch_compile_on_cuda_trains_like_eager(tmp_path, mode):
    """``TrainingArguments(torch_compile=True, torch_compile_mode=mode)`` on CUDA, what a user sets for speed: the
    Trainer's compiled model runs the adapter inside the graph (no graph break, and under ``reduce-overhead`` no
    step skips its CUDA graph), and θ_d moves as in the eager run (same steps, same data)."""
    from torch._dynamo.utils import counters

    cfg = UniLoraConfig(r=4, theta_d_length=256, target_modules="all-linear")

    def run(out, **kw):
        model = tiny_llama().cuda()
        trainer = UniLoraTrainer(model, args(out, max_steps=4, use_cpu=False, **kw), train_dataset=Stories(vocab=96),
                                 unilora_config=cfg, unilora_learning_rate=1e-2)
        theta0 = get_adapter(model).theta_d.detach().clone()
        trainer.train()
        return trainer, get_adapter(model).theta_d.detach() - theta0

    _, eager = run(tmp_path / "eager")
    torch._dynamo.reset()
    counters.clear()
    compiled, moved = run(tmp_path / "compiled", torch_compile=True, torch_compile_mode=mode)
    assert isinstance(compiled.model_wrapped, torch._dynamo.eval_frame.OptimizedModule)
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    assert counters["inductor"]["cudagraph_skips"] == 0
    assert eager.norm() > 0
    assert torch.nn.functional.cosine_similarity(moved, eager, dim=0) > 0.999
    torch.testing.assert_close(moved.norm(), eager.norm(), rtol=1e-2, atol=0)
