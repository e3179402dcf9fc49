"""Inference benchmark: prefill and greedy decoding with each way of serving an adapter.

On the reference 1.1B Llama shape (random weights, bf16): prefill = one no-grad forward of
1 × ``--prompt`` (512) tokens, median of ``--repeats`` (10) after 3 warm-ups; decode = ``generate`` of
exactly ``--new-tokens`` (128) greedy tokens after that prompt (``min_new_tokens = max_new_tokens``, no EOS),
median of ``--gen-repeats`` (3) after one warm-up; decode tokens/s = new tokens / generate seconds.
Every row starts from the same freshly built base (same seed); the adapters (r = 16, all 7 projections,
d = 2^19 for Uni-LoRA) are saved to a temporary folder first, and "attach s" is the time to load one
onto the base already on the device; "merge s" the time to merge it into the weights.

Rows (``--only`` picks some): ``base``; ``unilora_hf_merged`` (``UniLoraAutoModel.from_pretrained``, then
``get_adapter(model).merge()``: wrappers stay, for hot-swapping); ``unilora_hf_unloaded``
(``from_pretrained(..., merge=True)``: merged and unwrapped, a plain transformers model; its attach time
includes the merge); ``unilora_hf_unmerged``; ``unilora_hf_ungrouped`` (unmerged, sibling layers not sharing a
launch); ``peft_lora`` (``PeftModel.from_pretrained``, unmerged);
``peft_unilora`` (unmerged); ``peft_unilora_merged`` (``merge_adapter()``); ``base_again`` (the base
measured once more at the end, to show drift of the device over the run).
Checks recorded per row: the largest change of the prompt's last-token logits against the base (a live
adapter changes them), and for merged rows the largest difference against the same adapter unmerged.

    python benchmarks/inference.py --out results/inference.json            # GPU, ~3-4 min
    python benchmarks/inference.py --tiny --out /tmp/i.json                # CPU, seconds

``--compile``: decoding as users make it fast: ``generate(..., cache_implementation="static")``, which on CUDA
compiles the decoding step (transformers' default ``compile_config``: CUDA graphs, ``reduce-overhead``). Rows
``base``, ``unilora_hf_merged``, ``unilora_hf_unmerged``, ``unilora_hf_ungrouped`` (unmerged, with the sibling
layers q/k/v and gate/up launched one by one: the A/B of their shared launch) and ``peft_lora`` are all resident;
each is warmed up (compilation) and then timed over ``--rounds`` (3) interleaved rounds (A B C D A B C D ...): per
round and row one generate of ``--new-tokens`` and one of 1 token; time per decoded token = (t_N - t_1) / (N - 1).
Reported: the median over rounds, the spread, and the ratio to the base's time per token.

    python benchmarks/inference.py --compile --out results/inference_compile.json

``--compile --profile``: after the rounds, per row the CUDA kernels of one decoded token, grouped by name: one
generate of ``--new-tokens`` and one of 1 token under ``torch.profiler``, their difference divided by N - 1
(calls and GPU µs per token, and the GPU busy time per token: what the graph's kernels cost, without the host).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import common
import torch

ROWS = {
    "base": "base model",
    "unilora_hf_merged": "unilora_hf, merged (merge())",
    "unilora_hf_unloaded": "unilora_hf, merged and unloaded",
    "unilora_hf_unmerged": "unilora_hf, unmerged",
    "unilora_hf_ungrouped": "unilora_hf, unmerged, one launch per layer (siblings not grouped)",
    "peft_lora": "PEFT LoRA, unmerged",
    "peft_unilora": "PEFT UniLoRA, unmerged",
    "peft_unilora_merged": "PEFT UniLoRA, merged (merge_adapter())",
    "base_again": "base model (again, at the end)",
}
COMPILED_ROWS = ("base", "unilora_hf_merged", "unilora_hf_unmerged", "unilora_hf_ungrouped", "peft_lora")
# Which saved adapter each row loads, and which unmerged row its merged output is compared with.
ADAPTER_OF = {"unilora_hf_merged": "unilora_hf", "unilora_hf_unloaded": "unilora_hf",
              "unilora_hf_unmerged": "unilora_hf", "unilora_hf_ungrouped": "unilora_hf", "peft_lora": "peft_lora",
              "peft_unilora": "peft_unilora",
              "peft_unilora_merged": "peft_unilora"}
UNMERGED_OF = {"unilora_hf_merged": "unilora_hf_unmerged", "unilora_hf_unloaded": "unilora_hf_unmerged",
               "peft_unilora_merged": "peft_unilora"}
def parse_args(argv=None) -> argparse.Namespace:
    p = common.base_parser(__doc__, "tiny Llama, short prompt: a CPU smoke test of the script")
    p.add_argument("--prompt", type=int, default=None, help="prompt tokens (default 512; tiny 8)")
    p.add_argument("--new-tokens", type=int, default=None, help="tokens to generate (default 128; tiny 4)")
    p.add_argument("--repeats", type=int, default=None, help="timed prefills (default 10; tiny 2)")
    p.add_argument("--gen-repeats", type=int, default=None, help="timed generate calls (default 3; tiny 1)")
    p.add_argument("--r", type=int, default=None, help="rank (default 16; tiny 4)")
    p.add_argument("--d", type=int, default=None, help="theta_d_length (default 2^19; tiny 512)")
    p.add_argument("--only", default=None, help=f"comma-separated rows out of {','.join(ROWS)}")
    p.add_argument("--compile", action="store_true", help="static cache + compiled decoding, rows interleaved")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds with --compile (default 3)")
    p.add_argument("--profile", action="store_true", help="with --compile: CUDA kernels per decoded token, per row")
    p.add_argument("--top", type=int, default=25, help="with --profile: kernel names listed per row")
    args = p.parse_args(argv)
    if args.compile and args.only is None:
        args.only = ",".join(COMPILED_ROWS)
    tiny = args.tiny
    args.dtype = args.dtype or ("fp32" if tiny else "bf16")
    for name, full, small in (("prompt", 512, 8), ("new_tokens", 128, 4), ("repeats", 10, 2),
                              ("gen_repeats", 3, 1), ("r", 16, 4), ("d", 2**19, 512)):
        if getattr(args, name) is None:
            setattr(args, name, small if tiny else full)
    args.prefill_warmup, args.gen_warmup = (1, 0) if tiny else (3, 1)
    args.rows = list(ROWS) if args.only is None else [k.strip() for k in args.only.split(",") if k.strip()]
    unknown = [k for k in args.rows if k not in ROWS]
    if unknown or not args.rows:
        p.error(f"--only {args.only!r}: unknown row(s) {unknown}; rows are {','.join(ROWS)}")
    if min(args.prompt, args.new_tokens, args.repeats, args.gen_repeats, args.rounds) < 1:
        p.error("--prompt, --new-tokens, --repeats, --gen-repeats and --rounds must be >= 1")
    if args.compile and args.new_tokens < 2:
        p.error("--compile needs --new-tokens >= 2 (time per token is (t_N - t_1) / (N - 1))")
    if args.profile and not args.compile:
        p.error("--profile needs --compile")
    if args.compile and not set(args.rows) <= set(COMPILED_ROWS):
        p.error(f"--compile runs the rows {','.join(COMPILED_ROWS)} only")
    return args


def save_adapters(needed: set[str], cfg, args, device, dtype, tmp: Path) -> dict[str, Path]:
    """Save each needed adapter (θ at its random init; PEFT LoRA at PEFT's init, B = 0) from a fresh base."""
    folders = {}
    for name in sorted(needed):
        base = common.build_llama(cfg, device, dtype, seed=0)
        folder = folders[name] = tmp / name
        if name == "unilora_hf":
            from unilora_hf import UniLoraConfig, inject_adapter

            inject_adapter(base, UniLoraConfig(r=args.r, theta_d_length=args.d, proj_seed=42,
                                               target_modules=common.LLAMA_TARGETS)).save_adapter(folder)
        else:
            from peft import LoraConfig, get_peft_model
            from peft import UniLoraConfig as PeftUniLoraConfig

            config = (LoraConfig(r=args.r, lora_alpha=args.r, target_modules=common.LLAMA_TARGETS)
                      if name == "peft_lora" else
                      PeftUniLoraConfig(r=args.r, theta_d_length=args.d, proj_seed=42,
                                        target_modules=common.LLAMA_TARGETS))
            get_peft_model(base, config).save_pretrained(str(folder))
        del base
        common.free(device)
    return folders


def attach(key: str, base, folder: Path | None) -> tuple[torch.nn.Module, dict]:
    """The model of row ``key`` built on ``base``, with the attach and merge seconds."""
    times: dict = {}
    device = next(base.parameters()).device
    if key in ("base", "base_again"):
        return base, times
    if key.startswith("unilora_hf"):
        from unilora_hf import UniLoraAutoModel, get_adapter

        merge_on_load = key == "unilora_hf_unloaded"
        times["attach_s"], model = common.timed(
            lambda: UniLoraAutoModel.from_pretrained(base, folder, merge=merge_on_load), device)
        if key == "unilora_hf_merged":
            times["merge_s"], _ = common.timed(lambda: get_adapter(model).merge(), device)
        if key == "unilora_hf_ungrouped":  # the A/B of siblings.py: q/k/v and gate/up as one launch each
            get_adapter(model)._group_siblings(False)
        return model, times
    from peft import PeftModel

    times["attach_s"], model = common.timed(lambda: PeftModel.from_pretrained(base, str(folder)), device)
    if key == "peft_unilora_merged":
        times["merge_s"], _ = common.timed(model.merge_adapter, device)
    return model.eval(), times


def measure(key: str, args, cfg, device, dtype, folders, prompt) -> dict:
    base = common.build_llama(cfg, device, dtype, seed=0).eval()
    base.generation_config.eos_token_id = None
    base.generation_config.pad_token_id = 0
    model, rec = attach(key, base, folders.get(ADAPTER_OF.get(key)))
    rec["label"] = ROWS[key]
    common.free(device)
    common.reset_peak(device)

    def prefill():
        return model(input_ids=prompt).logits[0, -1]

    def generate():
        return model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                              max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, pad_token_id=0)

    with torch.no_grad():
        rec["last_logits"] = prefill().float().cpu()
        for _ in range(args.prefill_warmup):
            prefill()
        rec.update(common.summary_ms([common.timed(prefill, device)[0] for _ in range(args.repeats)]))
        rec["prefill_median_ms"], rec["prefill_min_ms"] = rec.pop("median_ms"), rec.pop("min_ms")
        rec["prefill_all_ms"] = rec.pop("all_ms")
        for _ in range(args.gen_warmup):
            generate()
        gen_times = []
        for _ in range(args.gen_repeats):
            seconds, out = common.timed(generate, device)
            gen_times.append(seconds)
    rec["generated_tokens"] = int(out.shape[1] - prompt.shape[1])
    if rec["generated_tokens"] != args.new_tokens:
        raise RuntimeError(f"generate returned {rec['generated_tokens']} new tokens, expected {args.new_tokens}")
    rec["generate_s"] = statistics.median(gen_times)
    rec["generate_all_s"] = gen_times
    rec["decode_tok_s"] = args.new_tokens / rec["generate_s"]
    rec["peak_bytes"] = common.peak(device)
    del model, base, out
    return rec


def run_compiled(args, cfg, device, dtype, folders, prompt, record: dict) -> None:
    """``--compile``: every row resident, static-cache generate, rows interleaved round by round."""
    started = time.perf_counter()
    kwargs = dict(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False, pad_token_id=0,
                  cache_implementation="static")
    models = {}
    for key in args.rows:
        try:
            base = common.build_llama(cfg, device, dtype, seed=0).eval()
            base.generation_config.eos_token_id = None
            base.generation_config.pad_token_id = 0
            model, rec = attach(key, base, folders.get(ADAPTER_OF.get(key)))
            # transformers compiles the static-cache decoding step on CUDA only: on CPU the rows run eager
            rec["label"] = ROWS[key] + (", static cache, compiled" if device.type == "cuda" else ", static cache")
            with torch.no_grad():
                rec["last_logits"] = model(input_ids=prompt).logits[0, -1].float().cpu()
                rec["warmup_s"], out = common.timed(
                    lambda m=model: [m.generate(**kwargs, max_new_tokens=n, min_new_tokens=n)
                                     for n in (args.new_tokens, 1, args.new_tokens)][-1], device)
            rec["first_tokens"] = out[0, prompt.shape[1]:prompt.shape[1] + 8].tolist()
            compile_config = getattr(model.generation_config, "compile_config", None)
            rec["compile_config"] = repr(compile_config)
            rec["rounds_ms_per_token"] = []
            models[key] = (model, rec)
        except Exception as exc:
            import traceback

            traceback.print_exc()
            record["rows"][key] = {"error": f"{type(exc).__name__}: {exc}"}
    n = args.new_tokens
    for r in range(args.rounds):
        for key, (model, rec) in models.items():
            with torch.no_grad():
                t_n, _ = common.timed(lambda: model.generate(**kwargs, max_new_tokens=n, min_new_tokens=n), device)
                t_1, _ = common.timed(lambda: model.generate(**kwargs, max_new_tokens=1, min_new_tokens=1), device)
            rec["rounds_ms_per_token"].append((t_n - t_1) / (n - 1) * 1e3)
            rec.setdefault("generate_all_s", []).append(t_n)
        print(f"[{time.strftime('%H:%M:%S')}] round {r + 1}/{args.rounds} done", flush=True)
    if args.profile:
        for key, (model, rec) in models.items():
            rec["per_token_kernels"] = kernels_per_token(model, kwargs, n, args.top)
    for key, (model, rec) in models.items():
        per = rec["rounds_ms_per_token"]
        rec["ms_per_token"] = statistics.median(per)
        rec["spread_pct"] = 100 * (max(per) - min(per)) / rec["ms_per_token"]
        rec["decode_tok_s"] = 1e3 / rec["ms_per_token"]
        record["rows"][key] = rec
    base = record["rows"].get("base", {})
    for key, rec in record["rows"].items():
        if "ms_per_token" in rec and "ms_per_token" in base:
            rec["per_token_vs_base"] = rec["ms_per_token"] / base["ms_per_token"]
            if "rounds_ms_per_token" in rec and len(rec["rounds_ms_per_token"]) == len(base["rounds_ms_per_token"]):
                # rows of one round share the host's state: the ratio within each round, and their median
                ratios = [t / b for t, b in zip(rec["rounds_ms_per_token"], base["rounds_ms_per_token"])]
                rec["rounds_vs_base"] = ratios
                rec["rounds_vs_base_median"] = statistics.median(ratios)
            rec["max_logit_change_vs_base"] = (rec["last_logits"] - base["last_logits"]).abs().max().item()
    for rec in record["rows"].values():
        rec.pop("last_logits", None)
    targets = {}
    for key, name, limit in (("unilora_hf_unmerged", "unmerged, static cache + compile <= 1.10 x base per token", 1.10),
                             ("unilora_hf_merged", "merged, static cache + compile <= 1.02 x base per token", 1.02)):
        if "per_token_vs_base" in record["rows"].get(key, {}):
            targets[name] = record["rows"][key]["per_token_vs_base"] <= limit
    record["targets"] = targets
    headers = ["run", "ms per token (median of rounds)", "round values ms", "spread %", "x base per token",
               "x base, median of per-round ratios", "warm-up s (compile)", "max logit change vs base"]
    table = [[rec["label"], rec["ms_per_token"], " / ".join(f"{v:.2f}" for v in rec["rounds_ms_per_token"]),
              rec["spread_pct"], rec.get("per_token_vs_base"), rec.get("rounds_vs_base_median"), rec["warmup_s"],
              rec.get("max_logit_change_vs_base")]
             if "ms_per_token" in rec else [key, "error: " + rec.get("error", "?")[:80]] + [None] * 6
             for key, rec in record["rows"].items()]
    s = record["settings"]
    record["total_s"] = time.perf_counter() - started
    print(f"\n### Decoding with a static cache, compiled: {s['size']} Llama shape, {s['dtype']}, prompt {s['prompt']}, "
          f"{s['new_tokens']} new tokens, {args.rounds} interleaved rounds; {record['environment']['device_name']}\n")
    common.print_footer(headers, table, record)
    for key, rec in record["rows"].items():
        if "per_token_kernels" in rec:
            k = rec["per_token_kernels"]
            host = ", ".join(f"{name} {us:.0f}" for name, us in k["host_us"].items())
            print(f"\n{key}: {k['kernels']:.1f} kernels and {k['gpu_busy_us']:.1f} GPU µs per token; host µs per "
                  f"token (profiled): {host}; top (calls, µs):")
            for t in k["top"]:
                print(f"  {t['calls']:7.2f} {t['gpu_us']:9.2f}   {t['name']}")


# Host-side profiler ranges of a compiled call: guard evaluation before each run, then the compiled region (for
# reduce-overhead / CUDA graphs, the replay's host work).
HOST_RANGES = ("TorchDynamo Cache Lookup", "Torch-Compiled Region")


def kernels_per_token(model, kwargs: dict, n: int, top: int) -> dict:
    """CUDA kernels and the host time of `HOST_RANGES` for one decoded token: (generate of n tokens) - (generate of
    1), divided by n - 1."""
    from torch.profiler import ProfilerActivity, profile

    counts, hosts = [], []
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if model.device.type == "cuda" else [])
    for tokens in (n, 1):
        with torch.no_grad(), profile(activities=activities) as prof:
            model.generate(**kwargs, max_new_tokens=tokens, min_new_tokens=tokens)
            common.sync(model.device)
        counts.append(common.kernels_by_name(prof))
        host = {name: 0.0 for name in HOST_RANGES}
        for e in prof.events():
            name = e.name.split(":")[0]  # "Torch-Compiled Region: 1/0" -> one entry for all frames
            if name in host:
                host[name] += e.cpu_time_total  # µs
        hosts.append(host)
    full, one = counts
    per = {name: ((c - one.get(name, [0, 0.0])[0]) / (n - 1), 1e3 * (t - one.get(name, [0, 0.0])[1]) / (n - 1))
           for name, (c, t) in full.items()}
    ranked = sorted(per.items(), key=lambda kv: -kv[1][1])
    return {"kernels": sum(c for c, _ in per.values()), "gpu_busy_us": sum(t for _, t in per.values()),
            "host_us": {name: (hosts[0][name] - hosts[1][name]) / (n - 1) for name in HOST_RANGES},
            "top": [{"name": k, "calls": c, "gpu_us": t} for k, (c, t) in ranked[:top]]}


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = common.pick_device("cpu" if args.tiny and args.device is None else args.device)
    dtype = common.DTYPES[args.dtype]
    cfg = common.llama_config("tiny" if args.tiny else args.size)
    prompt = common.random_tokens(cfg.vocab_size, 1, args.prompt, device)
    record = {
        "benchmark": "inference",
        "environment": common.environment(device),
        "settings": {"size": "tiny" if args.tiny else args.size, "layers": cfg.num_hidden_layers,
                     "hidden": cfg.hidden_size, "dtype": args.dtype, "prompt": args.prompt,
                     "new_tokens": args.new_tokens, "repeats": args.repeats, "gen_repeats": args.gen_repeats,
                     "r": args.r, "d": args.d, "D": args.r * common.lora_numel_per_rank(cfg),
                     "targets": common.LLAMA_TARGETS},
        "rows": {},
    }
    print(f"inference: {record['settings']}\nenvironment: {record['environment']}", flush=True)
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="unilora_inference_bench_") as tmp:
        needed = {ADAPTER_OF[k] for k in args.rows if k in ADAPTER_OF}
        folders = save_adapters(needed, cfg, args, device, dtype, Path(tmp))
        if args.compile:
            record["settings"].update(compile=True, rounds=args.rounds, cache_implementation="static",
                                      profile=args.profile)
            run_compiled(args, cfg, device, dtype, folders, prompt, record)
            common.write_json(args.out, record)
            return record
        for key in args.rows:
            record["rows"][key] = common.run_row(key, lambda k=key: measure(k, args, cfg, device, dtype, folders,
                                                                            prompt), device)
    record["total_s"] = time.perf_counter() - t_all
    compare_outputs(record)
    print_table(record)
    common.write_json(args.out, record)
    return record


def compare_outputs(record: dict) -> None:
    """Logit changes against the base and, for merged rows, against the unmerged adapter; speed vs base."""
    rows = record["rows"]
    base = next((rows[k] for k in ("base", "base_again") if k in rows and "error" not in rows[k]), None)
    for key, rec in rows.items():
        if "error" in rec:
            continue
        logits = rec.pop("last_logits")
        rec["_logits"] = logits
    for key, rec in rows.items():
        if "error" in rec:
            continue
        if base is not None:
            rec["max_logit_change_vs_base"] = (rec["_logits"] - base["_logits"]).abs().max().item()
            rec["prefill_vs_base"] = rec["prefill_median_ms"] / base["prefill_median_ms"]
            rec["decode_vs_base"] = base["decode_tok_s"] / rec["decode_tok_s"]
        ref = rows.get(UNMERGED_OF.get(key, ""))
        if ref is not None and "error" not in ref:
            rec["max_logit_diff_vs_unmerged"] = (rec["_logits"] - ref["_logits"]).abs().max().item()
    for rec in rows.values():
        rec.pop("_logits", None)
    targets = {}
    if base is not None:
        for key, name, limit in (("unilora_hf_merged", "merged decode at base speed (<= 1.05 x)", 1.05),
                                 ("unilora_hf_unmerged", "unmerged decode within 1.15 x of base", 1.15)):
            if key in rows and "error" not in rows[key]:
                targets[name] = rows[key]["decode_vs_base"] <= limit
    record["targets"] = targets


def print_table(record: dict) -> None:
    s = record["settings"]
    env = record["environment"]
    print(f"\n### Inference: {s['size']} Llama shape, {s['dtype']}, prefill 1 x {s['prompt']}, greedy decode of "
          f"{s['new_tokens']} tokens; adapters r = {s['r']}, all 7 projections, d = {s['d']:,}; "
          f"{env['device_name']}, unilora_hf kernels: {env['unilora_kernel_backend']}\n")
    headers = ["run", "prefill ms (median)", "prefill ms (min)", "decode tokens/s", "decode time x base",
               "attach s", "merge s", "peak GiB", "max logit change vs base", "max logit diff vs unmerged"]
    table = []
    for key, rec in record["rows"].items():
        if "error" in rec:
            table.append([ROWS[key], "error: " + rec["error"][:80]] + [None] * (len(headers) - 2))
            continue
        table.append([rec["label"], rec["prefill_median_ms"], rec["prefill_min_ms"], rec["decode_tok_s"],
                      rec.get("decode_vs_base"), rec.get("attach_s"), rec.get("merge_s"),
                      common.to_gib(rec["peak_bytes"]), rec.get("max_logit_change_vs_base"),
                      rec.get("max_logit_diff_vs_unmerged")])
    common.print_footer(headers, table, record)


if __name__ == "__main__":
    main()
