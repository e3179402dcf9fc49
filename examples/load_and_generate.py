"""Load a base model plus a Uni-LoRA adapter with UniLoraAutoModel.from_pretrained, then use it:
generate text with a causal LM, or classify texts with a sequence classifier.

The adapter is a local folder (for example one written by examples/sft.py or examples/glue.py) or a Hub
repo id; the base is a local folder or a Hub id, or left out to use the base the adapter records. The
model class (causal LM or sequence classifier, with its labels) comes from the adapter.

    python examples/load_and_generate.py --base examples/data/stories260K --adapter runs/sft/adapter \\
        --prompt "Once upon a time"
    python examples/load_and_generate.py --adapter user/minilm-sst2-unilora --text "a gripping, funny film"
    python examples/load_and_generate.py --adapter runs/sft/adapter --merge   # ΔW merged: base model speed
"""

from __future__ import annotations

import argparse
import json

DTYPES = ("auto", "float32", "bfloat16", "float16")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--adapter", required=True, help="adapter folder or Hub repo id")
    p.add_argument("--base", default=None, help="base model folder or Hub id (None: the one the adapter records)")
    p.add_argument("--revision", default=None, help="adapter revision on the Hub")
    p.add_argument("--endpoint", default=None, help="Hub URL (None: huggingface_hub's, i.e. HF_ENDPOINT)")
    p.add_argument("--token", default=None, help="Hub token for a private adapter repo")
    p.add_argument("--prompt", action="append", default=None,
                   help="causal LM: a prompt to continue (repeat for several; None: 'Once upon a time')")
    p.add_argument("--text", action="append", default=None, help="sequence classifier: a text to classify (repeat)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--sample", action="store_true", help="sample (temperature, top-p) instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--merge", action="store_true", help="merge ΔW into the weights and drop the adapter wrappers")
    p.add_argument("--dtype", choices=DTYPES, default="auto", help="dtype to load the base in")
    p.add_argument("--device", default=None, help="cuda or cpu (None: cuda when there is one)")
    p.add_argument("--json", action="store_true", help="print the results as one JSON list")
    return p.parse_args(argv)


def main(argv=None) -> list[dict]:
    """Run the command line; returns the results as a list of dicts (one per prompt or text)."""
    args = parse_args(argv)  # before the heavy imports: --help answers at once
    import torch
    from transformers import AutoTokenizer

    from unilora_hf import UniLoraAutoModel, get_adapter, read_adapter
    from unilora_hf.hub import resolve_adapter

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    folder = resolve_adapter(args.adapter, revision=args.revision, token=args.token, endpoint=args.endpoint)
    base = args.base or read_adapter(folder).base_model.get("name_or_path")
    if not base:
        raise SystemExit(f"{args.adapter} records no base model: pass --base")
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    model = UniLoraAutoModel.from_pretrained(base, folder, merge=args.merge, dtype=dtype)
    model = model.to(args.device)
    tokenizer = AutoTokenizer.from_pretrained(base)
    if not args.json:
        adapter = None if args.merge else get_adapter(model)
        state = "merged" if args.merge else f"unmerged, d = {adapter.config.theta_d_length:,}, D = {adapter.D:,}"
        print(f"{type(model).__name__} from {base} with the Uni-LoRA adapter {args.adapter} ({state})")

    if type(model).__name__.endswith("ForSequenceClassification"):
        if args.prompt:
            raise SystemExit("this adapter makes a sequence classifier: pass --text, not --prompt")
        results = classify(model, tokenizer, args.text or ["a gripping, funny and moving film"], args.device)
        for r in results:
            if not args.json:
                print(f"{r['label']:>12}  {r['score']:.3f}  {r['text']!r}")
    elif getattr(model, "can_generate", lambda: False)():
        if args.text:
            raise SystemExit("this adapter makes a causal LM: pass --prompt, not --text")
        torch.manual_seed(args.seed)
        results = generate(model, tokenizer, args.prompt or ["Once upon a time"], args)
        for r in results:
            if not args.json:
                print(f"--- {r['prompt']!r}\n{r['prompt']}{r['generation']}")
    else:
        raise SystemExit(f"{type(model).__name__} neither generates nor classifies sequences; load it in Python with "
                         "UniLoraAutoModel.from_pretrained and use it directly")
    if args.json:
        print(json.dumps(results))
    return results


def generate(model, tokenizer, prompts: list[str], args) -> list[dict]:
    """One completion per prompt (prompts run one at a time, so no padding is involved). generate() runs
    without autograd on its own."""
    out = []
    for prompt in prompts:
        enc = tokenizer(prompt, return_tensors="pt").to(args.device)
        options = dict(do_sample=True, temperature=args.temperature, top_p=args.top_p) if args.sample else \
            dict(do_sample=False)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        ids = model.generate(**enc, max_new_tokens=args.max_new_tokens, pad_token_id=pad, **options)
        out.append({"prompt": prompt,
                    "generation": tokenizer.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)})
    return out


def classify(model, tokenizer, texts: list[str], device: str) -> list[dict]:
    """The predicted label and its probability for every text (softmax; a 1-output head is a regression)."""
    import torch

    enc = tokenizer(texts, return_tensors="pt", padding=True, truncation=True).to(device)
    with torch.no_grad():
        logits = model(**enc).logits.float()
    out = []
    for text, row in zip(texts, logits):
        if row.numel() == 1:
            out.append({"text": text, "label": "score", "score": row.item()})
            continue
        probs = row.softmax(-1)
        best = int(probs.argmax())
        out.append({"text": text, "label": model.config.id2label.get(best, str(best)), "score": probs[best].item(),
                    "probabilities": probs.tolist()})
    return out


if __name__ == "__main__":
    main()
