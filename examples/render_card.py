"""Render the model card of a real (tiny) Uni-LoRA training run, without pushing it anywhere.

Fine-tunes the real stories260K Llama (examples/data/stories260K) on the 300 GSM8K training problems
shipped in examples/data/gsm8k for a few dozen steps on the CPU with `UniLoraTrainer`, evaluates on the
100 test problems, and writes the README.md that `push_adapter` / `trainer.push_to_hub()` would upload,
plus its loss chart:

    python examples/render_card.py                     # writes runs/card/README.md + runs/card/training_loss.svg
    python examples/render_card.py --out docs/example_card.md   # refreshes the example in the docs
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def gsm8k(tokenizer, split: str, max_length: int) -> list[dict]:
    rows = [json.loads(line) for line in (HERE / "data" / "gsm8k" / f"{split}.jsonl").read_text().splitlines()]
    texts = [f"Question: {r['question']}\nAnswer: {r['answer']}{tokenizer.eos_token}" for r in rows]
    return [{"input_ids": ids} for ids in tokenizer(texts, truncation=True, max_length=max_length).input_ids]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs") / "card" / "README.md")
    parser.add_argument("--repo-id", default="your-name/stories260K-unilora-gsm8k",
                        help="the repo id the card is written for")
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()

    import torch
    from transformers import (
        AutoModelForCausalLM, AutoTokenizer, DataCollatorForLanguageModeling, TrainingArguments, set_seed,
    )

    from unilora_hf import UniLoraConfig, UniLoraTrainer, read_adapter
    from unilora_hf.push import base_parameter_count, loss_svg, render_card

    set_seed(0)  # θ_d is drawn when the trainer attaches the adapter, before Trainer seeds anything
    base = HERE / "data" / "stories260K"
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.pad_token = tokenizer.unk_token
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = UniLoraConfig(r=4, theta_d_length=4096, target_modules="all-linear")
    with tempfile.TemporaryDirectory() as tmp:
        training = TrainingArguments(
            output_dir=tmp, max_steps=args.steps, per_device_train_batch_size=8, learning_rate=5e-3,
            lr_scheduler_type="cosine", warmup_steps=2, logging_steps=2, eval_strategy="no", save_strategy="no",
            report_to=[], use_cpu=True, seed=0, disable_tqdm=True)
        trainer = UniLoraTrainer(model, training, unilora_config=config,
                                 train_dataset=gsm8k(tokenizer, "train", 192), eval_dataset=gsm8k(tokenizer, "test", 192),
                                 data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
        trainer.train()
        trainer.evaluate()
        trainer.save_model(tmp)
        files = read_adapter(tmp)
        adapter_bytes = (Path(tmp) / "unilora_model.safetensors").stat().st_size
    summary = trainer.training_summary()
    card = render_card(files, args.repo_id, summary, base_params=base_parameter_count(model), license="mit",
                       datasets=["openai/gsm8k"], adapter_bytes=adapter_bytes)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(card)
    (args.out.parent / "training_loss.svg").write_text(loss_svg(summary["loss_history"]))
    print(f"wrote {args.out} and {args.out.parent / 'training_loss.svg'} "
          f"(eval_loss {summary['metrics'].get('eval_loss', float('nan')):.4f} after {args.steps} steps)")


if __name__ == "__main__":
    main()
