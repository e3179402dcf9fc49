"""A causal-LM training script in the shape of transformers' examples (run_clm.py): text is tokenized,
concatenated and cut into ``--block_size`` blocks (``group_texts``), labels are the inputs, evaluation reports
perplexity. Written for the tests; the one line a user changes is marked ``# Uni-LoRA``.

Data: a JSON-lines file with a ``question`` and an ``answer`` per line (examples/data/gsm8k/train.jsonl).
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from itertools import chain


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "model id or folder"})
    config_name: str | None = field(default=None)


@dataclass
class DataArguments:
    train_file: str = field(metadata={"help": "a JSON-lines file"})
    block_size: int = field(default=64)
    max_train_samples: int | None = field(default=None)


def main(argv: list[str] | None = None) -> dict:
    from transformers import HfArgumentParser, TrainingArguments

    model_args, data_args, training_args = HfArgumentParser(
        (ModelArguments, DataArguments, TrainingArguments)).parse_args_into_dataclasses(args=argv)

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, default_data_collator, set_seed

    from unilora_hf import UniLoraConfig, UniLoraTrainer

    set_seed(training_args.seed)
    with open(data_args.train_file) as f:
        texts = [f"Q: {r['question']}\nA: {r['answer']}" for r in map(json.loads, f)]
    texts = texts[: data_args.max_train_samples]
    config = AutoConfig.from_pretrained(model_args.config_name or model_args.model_name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path)
    model = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path, config=config)

    def group_texts(ids: list[list[int]]) -> list[list[int]]:
        joined = list(chain(*ids))
        total = (len(joined) // data_args.block_size) * data_args.block_size
        return [joined[i : i + data_args.block_size] for i in range(0, total, data_args.block_size)]

    blocks = group_texts(tokenizer(texts)["input_ids"])
    split = max(1, len(blocks) // 10)

    class Blocks(torch.utils.data.Dataset):
        def __init__(self, rows):
            self.rows = rows

        def __len__(self):
            return len(self.rows)

        def __getitem__(self, i):
            ids = torch.tensor(self.rows[i])
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    trainer = UniLoraTrainer(  # Uni-LoRA: was Trainer(
        model=model, args=training_args, train_dataset=Blocks(blocks[split:]) if training_args.do_train else None,
        eval_dataset=Blocks(blocks[:split]) if training_args.do_eval else None, processing_class=tokenizer,
        data_collator=default_data_collator,
        unilora_config=UniLoraConfig(r=4, theta_d_length=2048, target_modules="all-linear"), unilora_learning_rate=2e-2,
    )
    results = {}
    if training_args.do_train:
        train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        trainer.save_model()
        trainer.save_metrics("train", train_result.metrics)
        trainer.save_state()
        results.update(train_result.metrics)
    if training_args.do_eval:
        metrics = trainer.evaluate()
        metrics["perplexity"] = math.exp(metrics["eval_loss"])
        trainer.save_metrics("eval", metrics)
        results.update(metrics)
    kwargs = {"finetuned_from": model_args.model_name_or_path, "tasks": "text-generation", "dataset": "gsm8k"}
    if training_args.push_to_hub:
        trainer.push_to_hub(**kwargs)
    elif training_args.do_train:
        trainer.create_model_card(**kwargs)
    print(json.dumps({k: v for k, v in results.items() if isinstance(v, (int, float))}))
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
