"""Instruction tuning with UniLoraSFTTrainer, end to end: train, save the adapter, load it back, evaluate.

The defaults run offline on a CPU in a couple of minutes: the real pretrained stories260K (a 260K-parameter
Llama, examples/data/stories260K) tuned on the GSM8K sample shipped in examples/data/gsm8k, every linear
layer adapted with r = 4 and one θ_d of d = 8,192 values. The records become prompt/completion pairs, so
the loss covers the answers only (trl's completion-only loss). After training the adapter is saved (a few
KiB), loaded back onto a fresh base with UniLoraAutoModel.from_pretrained, and evaluated: the completion
loss on held-out records (base model, trained model, reloaded model: the last two must agree), a greedy
sample, and with --gsm8k-accuracy the share of exact final answers ("#### N"). A 260K-parameter story
model does not learn arithmetic: expect its accuracy to stay near 0 and its loss to fall.

    python examples/sft.py                                                   # GSM8K sample, stories260K
    python examples/sft.py --data examples/data/alpaca/alpaca_300.json       # Alpaca-format instructions
    python examples/sft.py --gsm8k-accuracy --eval-limit 100
    python examples/sft.py --model path/to/llama --theta-d-length 524288 --unilora-lr 2e-3 --bf16 --max-length 1024

Writes OUTPUT_DIR/adapter (the adapter) and OUTPUT_DIR/results.json (the numbers printed at the end).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
STORIES = HERE / "data" / "stories260K"
GSM8K_TRAIN, GSM8K_TEST = HERE / "data" / "gsm8k" / "train.jsonl", HERE / "data" / "gsm8k" / "test.jsonl"
ALPACA_HEADER = ("Below is an instruction that describes a task{with_input}. Write a response that appropriately "
                 "completes the request.\n\n### Instruction:\n{instruction}\n\n")
ANSWER = re.compile(r"####\s*(-?[\d,]*\.?\d+)")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=str(STORIES), help="base causal LM: a Hub id or a local folder")
    p.add_argument("--data", default=str(GSM8K_TRAIN),
                   help="training records: GSM8K jsonl ({question, answer}) or Alpaca json "
                        "({instruction, input, output})")
    p.add_argument("--eval-data", default=None,
                   help="held-out records in the same format (default: the GSM8K test sample for GSM8K data, "
                        "else the last --eval-limit records of --data, left out of training)")
    p.add_argument("--train-limit", type=int, default=None, help="use at most this many training records")
    p.add_argument("--eval-limit", type=int, default=32, help="evaluate on this many held-out records")
    p.add_argument("--output-dir", default="runs/sft", help="where the adapter and results.json go")
    p.add_argument("--r", type=int, default=4, help="rank of every adapted layer")
    p.add_argument("--theta-d-length", type=int, default=8192, help="d, the length of the one trained vector θ_d")
    p.add_argument("--targets", default="all-linear",
                   help="'all-linear' (every linear layer but the LM head) or comma-separated module-name suffixes")
    p.add_argument("--proj-seed", type=int, default=0, help="seed of the projection")
    p.add_argument("--unilora-lr", type=float, default=2e-2,
                   help="θ_d's learning rate (the paper: 2e-3 for 7B models on math; tiny models want more)")
    p.add_argument("--max-steps", type=int, default=40, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--max-length", type=int, default=384, help="tokens per record (longer ones are truncated)")
    p.add_argument("--packing", action="store_true", help="pack records into rows of --max-length tokens")
    p.add_argument("--bf16", action="store_true", help="bf16 mixed precision (θ_d stays float32)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--gsm8k-accuracy", action="store_true",
                   help="also generate answers for the held-out records and score the final '#### N'")
    p.add_argument("--max-new-tokens", type=int, default=96, help="generation length for samples and accuracy")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def read_records(path: str | Path) -> list[dict]:
    """A list of records from a .jsonl file (one JSON object per line) or a .json file (a JSON list)."""
    text = Path(path).read_text(encoding="utf-8")
    if str(path).endswith(".jsonl"):
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    records = json.loads(text)
    if not isinstance(records, list):
        raise SystemExit(f"{path}: expected a JSON list of records")
    return records


def to_prompt_completion(record: dict) -> dict:
    """A GSM8K or Alpaca record as {prompt, completion, answer}; ``answer`` is GSM8K's final number, else None."""
    if "question" in record and "answer" in record:
        final = record["answer"].split("####")[-1].strip().replace(",", "")
        return {"prompt": f"Question: {record['question']}\nAnswer:", "completion": " " + record["answer"],
                "answer": final}
    if "instruction" in record and "output" in record:
        extra = record.get("input") or ""
        with_input = ", paired with an input that provides further context" if extra else ""
        prompt = ALPACA_HEADER.format(with_input=with_input, instruction=record["instruction"])
        if extra:
            prompt += f"### Input:\n{extra}\n\n"
        return {"prompt": prompt + "### Response:\n", "completion": record["output"], "answer": None}
    raise SystemExit(f"unknown record format with keys {sorted(record)}: expected GSM8K {{question, answer}} or "
                     "Alpaca {instruction, input, output}")


def load_data(args) -> tuple[list[dict], list[dict]]:
    train = [to_prompt_completion(r) for r in read_records(args.data)]
    if args.eval_data is not None:
        held_out = [to_prompt_completion(r) for r in read_records(args.eval_data)]
    elif Path(args.data).resolve() == GSM8K_TRAIN.resolve():
        held_out = [to_prompt_completion(r) for r in read_records(GSM8K_TEST)]
    else:
        if len(train) <= args.eval_limit:
            raise SystemExit(f"{args.data} has {len(train)} records: too few to hold out {args.eval_limit}; "
                             "pass --eval-data or a smaller --eval-limit")
        train, held_out = train[:-args.eval_limit], train[-args.eval_limit:]
    return train[:args.train_limit], held_out[:args.eval_limit]


def completion_loss(model, dataset, pad_token_id: int, batch_size: int) -> float:
    """Mean cross-entropy per completion token of a prepared dataset (``input_ids`` and ``labels``, where
    the prompt carries -100), in right-padded batches."""
    import torch

    with torch.no_grad():
        return _completion_loss(model, dataset, pad_token_id, batch_size)


def _completion_loss(model, dataset, pad_token_id: int, batch_size: int) -> float:
    import torch

    model.eval()
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for start in range(0, len(dataset), batch_size):
        rows = dataset[start:start + batch_size]
        width = max(len(ids) for ids in rows["input_ids"])
        ids = torch.tensor([x + [pad_token_id] * (width - len(x)) for x in rows["input_ids"]], device=device)
        labels = torch.tensor([y + [-100] * (width - len(y)) for y in rows["labels"]], device=device)
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in rows["input_ids"]], device=device)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        target = labels[:, 1:]
        total += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1),
                                                   ignore_index=-100, reduction="sum").item()
        count += int((target != -100).sum())
    return total / max(count, 1)


def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 8) -> list[str]:
    """Greedy completions of ``prompts`` (left-padded batches)."""
    import torch

    with torch.no_grad():
        return _generate(model, tokenizer, prompts, max_new_tokens, batch_size)


def _generate(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int) -> list[str]:
    model.eval()
    tokenizer.padding_side = "left"
    out = []
    for start in range(0, len(prompts), batch_size):
        enc = tokenizer(prompts[start:start + batch_size], return_tensors="pt", padding=True).to(model.device)
        ids = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
        out += tokenizer.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    tokenizer.padding_side = "right"
    return out


def gsm8k_accuracy(generations: list[str], answers: list[str]) -> float:
    """Share of generations whose first '#### N' equals the reference final answer."""
    def number(text):
        match = ANSWER.search(text)
        return match.group(1).replace(",", "").rstrip(".") if match else None

    return sum(number(g) == a for g, a in zip(generations, answers)) / max(len(answers), 1)


def main(argv=None) -> dict:
    args = parse_args(argv)  # before the heavy imports: --help answers at once
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig

    from unilora_hf import UniLoraAutoModel, UniLoraConfig, UniLoraSFTTrainer, get_adapter

    out = Path(args.output_dir)
    train, held_out = load_data(args)
    print(f"data: {len(train)} training records from {args.data}, {len(held_out)} held out")
    if args.gsm8k_accuracy and any(r["answer"] is None for r in held_out):
        raise SystemExit("--gsm8k-accuracy needs GSM8K held-out records ({question, answer} ending in '#### N')")

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if tokenizer.pad_token is None:  # e.g. stories260K: pad with <unk>, so EOS stays a real, trained token
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    targets = args.targets if args.targets == "all-linear" else [t.strip() for t in args.targets.split(",")]
    unilora_config = UniLoraConfig(r=args.r, theta_d_length=args.theta_d_length, target_modules=targets,
                                   proj_seed=args.proj_seed)
    sft_config = SFTConfig(
        output_dir=str(out), max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size, gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.unilora_lr, lr_scheduler_type="cosine", warmup_steps=max(1, args.max_steps // 20),
        max_length=args.max_length, packing=args.packing, eval_packing=False, bf16=args.bf16,
        gradient_checkpointing=args.gradient_checkpointing, logging_steps=max(1, args.max_steps // 10),
        save_strategy="no", report_to=[], seed=args.seed, data_seed=args.seed, disable_tqdm=True,
    )
    columns = ["prompt", "completion"]
    trainer = UniLoraSFTTrainer(
        args.model, sft_config,  # a model id or folder: the trainer loads it, as trl's SFTTrainer does
        train_dataset=Dataset.from_list([{k: r[k] for k in columns} for r in train]),
        eval_dataset=Dataset.from_list([{k: r[k] for k in columns} for r in held_out]),
        processing_class=tokenizer, unilora_config=unilora_config, unilora_learning_rate=args.unilora_lr,
    )
    model, adapter = trainer.model, get_adapter(trainer.model)
    base_params = sum(p.numel() for p in model.parameters() if p is not adapter.theta_d)
    print(f"model: {args.model} ({base_params:,} parameters, frozen); adapted layers: {len(adapter.layers)}, "
          f"D = {adapter.D:,} LoRA values read out of θ_d with d = {adapter.config.theta_d_length:,} trained values")

    with adapter.disabled():
        loss_base = completion_loss(model, trainer.eval_dataset, tokenizer.pad_token_id, args.batch_size)
    started = time.time()
    trainer.train()
    train_seconds = time.time() - started
    loss_trained = completion_loss(model, trainer.eval_dataset, tokenizer.pad_token_id, args.batch_size)

    adapter_dir = out / "adapter"
    trainer.save_model(str(adapter_dir))
    sizes = {f.name: f.stat().st_size for f in sorted(adapter_dir.iterdir()) if f.name.startswith("unilora_")}
    print(f"saved {adapter_dir}: " + ", ".join(f"{name} {size:,} B" for name, size in sizes.items())
          + " (and the tokenizer, which stays local)")

    loaded = UniLoraAutoModel.from_pretrained(args.model, adapter_dir).to(model.device)
    loss_loaded = completion_loss(loaded, trainer.eval_dataset, tokenizer.pad_token_id, args.batch_size)
    if not math.isclose(loss_loaded, loss_trained, rel_tol=1e-4, abs_tol=1e-5):
        raise SystemExit(f"the reloaded adapter gives loss {loss_loaded:.6f}, the trained model {loss_trained:.6f}")

    results = {
        "model": args.model, "data": args.data, "train_records": len(train), "eval_records": len(held_out),
        "r": args.r, "theta_d_length": args.theta_d_length, "D": adapter.D, "steps": trainer.state.global_step,
        "train_seconds": round(train_seconds, 1), "adapter_bytes": sum(sizes.values()),
        "train_loss_history": [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h],
        "eval_loss_base": loss_base, "eval_loss_trained": loss_trained, "eval_loss_reloaded": loss_loaded,
    }
    sample_prompt = held_out[0]["prompt"]
    results["sample"] = {"prompt": sample_prompt,
                         "generation": generate(loaded, tokenizer, [sample_prompt], args.max_new_tokens)[0]}
    if args.gsm8k_accuracy:
        answers = [r["answer"] for r in held_out]
        generations = generate(loaded, tokenizer, [r["prompt"] for r in held_out], args.max_new_tokens,
                               args.batch_size)
        with adapter.disabled():
            base_generations = generate(model, tokenizer, [r["prompt"] for r in held_out], args.max_new_tokens,
                                        args.batch_size)
        results["gsm8k_accuracy_base"] = gsm8k_accuracy(base_generations, answers)
        results["gsm8k_accuracy"] = gsm8k_accuracy(generations, answers)

    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"trained {results['steps']} steps in {train_seconds:.1f} s")
    print(f"held-out completion loss: base {loss_base:.4f} -> trained {loss_trained:.4f} "
          f"(reloaded from {adapter_dir}: {loss_loaded:.4f})")
    if args.gsm8k_accuracy:
        print(f"GSM8K exact final answers: base {100 * results['gsm8k_accuracy_base']:.1f}% -> "
              f"trained {100 * results['gsm8k_accuracy']:.1f}% of {len(held_out)}")
    print(f"sample (reloaded model, greedy):\n{sample_prompt}{results['sample']['generation']}")
    print(f"results: {out / 'results.json'}")
    return results


if __name__ == "__main__":
    main()
