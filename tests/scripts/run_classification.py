"""A text-classification training script in the shape of transformers' examples (run_glue.py): dataclass
arguments parsed by HfArgumentParser, AutoConfig / AutoTokenizer / AutoModelForSequenceClassification from
``--model_name_or_path``, ``--do_train/--do_eval/--do_predict``, checkpoint detection and
``resume_from_checkpoint``, metrics files, ``push_to_hub(**kwargs)`` or ``create_model_card(**kwargs)`` at
the end. Written for the tests; the one line a user changes is marked ``# Uni-LoRA``.

Data: a GLUE-style tsv folder (``sentence`` and ``label`` columns), e.g. examples/data/sst2.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "model id or folder"})
    config_name: str | None = field(default=None, metadata={"help": "config id or folder, if not the model's"})
    tokenizer_name: str | None = field(default=None, metadata={"help": "tokenizer id or folder, if not the model's"})


@dataclass
class DataArguments:
    data_dir: str = field(metadata={"help": "folder with train.tsv and dev.tsv"})
    max_seq_length: int = field(default=64)
    max_train_samples: int | None = field(default=None)
    max_eval_samples: int | None = field(default=None)


LABELS = ["negative", "positive"]


def read_tsv(path: Path, limit: int | None) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [{"sentence": r["sentence"], "label": int(r["label"])} for r in rows[:limit]]


def main(argv: list[str] | None = None) -> dict:
    from transformers import HfArgumentParser, TrainingArguments

    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)

    import numpy as np
    import torch
    from transformers import (
        AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, set_seed,
    )
    from transformers.trainer_utils import get_last_checkpoint

    from unilora_hf import UniLoraConfig, UniLoraTrainer

    last_checkpoint = None
    if os.path.isdir(training_args.output_dir) and training_args.do_train:
        last_checkpoint = get_last_checkpoint(training_args.output_dir)
    set_seed(training_args.seed)

    train = read_tsv(Path(data_args.data_dir) / "train.tsv", data_args.max_train_samples)
    dev = read_tsv(Path(data_args.data_dir) / "dev.tsv", data_args.max_eval_samples)

    config = AutoConfig.from_pretrained(model_args.config_name or model_args.model_name_or_path,
                                        num_labels=len(LABELS), id2label=dict(enumerate(LABELS)),
                                        label2id={label: i for i, label in enumerate(LABELS)})
    tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name or model_args.model_name_or_path)
    model = AutoModelForSequenceClassification.from_pretrained(model_args.model_name_or_path, config=config)

    class Encoded(torch.utils.data.Dataset):
        def __init__(self, rows):
            self.enc = tokenizer([r["sentence"] for r in rows], truncation=True, max_length=data_args.max_seq_length)
            self.labels = [r["label"] for r in rows]

        def __len__(self):
            return len(self.labels)

        def __getitem__(self, i):
            return {**{k: v[i] for k, v in self.enc.items()}, "labels": self.labels[i]}

    def compute_metrics(pred):
        return {"accuracy": float((np.argmax(pred.predictions, -1) == pred.label_ids).mean())}

    trainer = UniLoraTrainer(  # Uni-LoRA: was Trainer(
        model=model, args=training_args, train_dataset=Encoded(train) if training_args.do_train else None,
        eval_dataset=Encoded(dev) if training_args.do_eval or training_args.do_predict else None,
        processing_class=tokenizer, data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=compute_metrics,
        unilora_config=UniLoraConfig(r=4, theta_d_length=4096, target_modules=["query", "value"],
                                     modules_to_save=["classifier"]),
        unilora_learning_rate=2e-2,
    )

    results = {}
    if training_args.do_train:
        checkpoint = training_args.resume_from_checkpoint or last_checkpoint
        train_result = trainer.train(resume_from_checkpoint=checkpoint)
        trainer.save_model()
        trainer.log_metrics("train", train_result.metrics)
        trainer.save_metrics("train", train_result.metrics)
        trainer.save_state()
        results.update(train_result.metrics)
    if training_args.do_eval:
        metrics = trainer.evaluate()
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
        results.update(metrics)
    if training_args.do_predict:
        predictions = trainer.predict(Encoded(dev)).predictions.argmax(-1)
        if trainer.is_world_process_zero():
            with open(os.path.join(training_args.output_dir, "predict_results.txt"), "w") as f:
                f.write("index\tprediction\n")
                for i, p in enumerate(predictions):
                    f.write(f"{i}\t{LABELS[p]}\n")
    kwargs = {"finetuned_from": model_args.model_name_or_path, "tasks": "text-classification",
              "dataset_tags": "glue", "dataset_args": "sst2", "dataset": "GLUE SST2", "language": "en"}
    if training_args.push_to_hub:
        trainer.push_to_hub(**kwargs)
    elif training_args.do_train:
        trainer.create_model_card(**kwargs)
    print(json.dumps({k: v for k, v in results.items() if isinstance(v, (int, float))}))
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
