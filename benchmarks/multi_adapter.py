"""Many adapters on one base: mixed-batch decoding, resident memory, and the cost of adding and switching.

On the reference 1.1B Llama shape (random weights, bf16; all 7 projections adapted, r = 16, d = 2^19), one
process, ``generate`` with a batch of ``--batch`` (32) prompts of ``--prompt`` (512) tokens and exactly
``--new-tokens`` (128) greedy new tokens (``min_new_tokens = max_new_tokens``), after one warm-up call each:

  (a) ``base``: the base model alone;
  (b) ``one_adapter``: one Uni-LoRA adapter for every row (unmerged);
  (c) ``mixed``: 32 distinct Uni-LoRA adapters, one per row (``adapter_names=``, Kernel M on CUDA);
  (d) ``peft_lora_mixed``: PEFT LoRA, 32 distinct r = 16 adapters, ``adapter_names=`` (PEFT's mixed batch);
      with ``--peft-new-tokens`` (default 16) new tokens, as PEFT's mixed batch is ~40× slower;
  (e) ``peft_unilora_serial``: PEFT UniLoRA, which holds one active adapter: ``--serial-adapters`` (4) rows each
      run alone with its adapter active (one ``set_adapter`` and one batch-1 generate per adapter); tokens/s
      over those calls.

Decode throughput = batch · new tokens / seconds of the ``generate`` call (prefill included, as a user sees
it), and also the decode-only rate from the time per step after the first (medians of ``--gen-repeats`` (3) calls
of each length for rows a–c). Then: GPU memory beyond the base
with N = 1, 100, 1,000 adapters resident (θ_d only, added from memory), the time to add one adapter from a local
folder (median of ``--add-repeats``) and to switch the active one (median of 100).

``--profile``: for the rows base, one_adapter and mixed, the CUDA kernels, GPU busy time and wall time per decode
step, from two profiled ``generate`` calls (9 and 1 new tokens; their difference over 8 steps), and the mixed row's
top kernels per step: what bounds the mixed batch's decoding (launches or bytes).

    python benchmarks/multi_adapter.py --out results/multi_adapter.json          # GPU, ~3 min
    python benchmarks/multi_adapter.py --tiny --out /tmp/m.json                  # CPU smoke test
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import common
import torch

ROWS = {
    "base": "base model alone",
    "one_adapter": "unilora_hf, one adapter for all rows",
    "mixed": "unilora_hf, distinct adapters mixed (adapter_names)",
    "peft_lora_mixed": "PEFT LoRA, distinct adapters mixed (adapter_names)",
    "peft_unilora_serial": "PEFT UniLoRA, adapter by adapter",
}


def parse_args(argv=None):
    p = common.base_parser(__doc__, "tiny Llama, short prompts: a CPU smoke test of the script")
    p.add_argument("--batch", type=int, default=None, help="rows (default 32; tiny 4)")
    p.add_argument("--prompt", type=int, default=None, help="prompt tokens (default 512; tiny 8)")
    p.add_argument("--new-tokens", type=int, default=None, help="default 128; tiny 4")
    p.add_argument("--peft-new-tokens", type=int, default=None, help="PEFT LoRA mixed row (default 16; tiny 2)")
    p.add_argument("--serial-adapters", type=int, default=None, help="PEFT UniLoRA row (default 4; tiny 2)")
    p.add_argument("--r", type=int, default=None, help="default 16; tiny 4")
    p.add_argument("--d", type=int, default=None, help="default 2^19; tiny 512")
    p.add_argument("--resident", default=None, help="comma-separated N (default 1,100,1000; tiny 1,10)")
    p.add_argument("--add-repeats", type=int, default=None, help="default 20; tiny 3")
    p.add_argument("--gen-repeats", type=int, default=None,
                   help="timed generate calls per length for the base, one-adapter and mixed rows (median; default 3; "
                        "tiny 1)")
    p.add_argument("--only", default=None, help=f"comma-separated rows out of {','.join(ROWS)}")
    p.add_argument("--profile", action="store_true", help="profile decode steps of base, one_adapter, mixed")
    args = p.parse_args(argv)
    tiny = args.tiny
    args.dtype = args.dtype or ("fp32" if tiny else "bf16")
    for name, full, small in (("batch", 32, 4), ("prompt", 512, 8), ("new_tokens", 128, 4), ("peft_new_tokens", 16, 2),
                              ("serial_adapters", 4, 2), ("r", 16, 4), ("d", 2**19, 512), ("add_repeats", 20, 3),
                              ("gen_repeats", 3, 1)):
        if getattr(args, name) is None:
            setattr(args, name, small if tiny else full)
    args.resident = [int(n) for n in (args.resident or ("1,10" if tiny else "1,100,1000")).split(",")]
    args.rows = list(ROWS) if args.only is None else [k.strip() for k in args.only.split(",") if k.strip()]
    unknown = [k for k in args.rows if k not in ROWS]
    if unknown:
        p.error(f"--only: unknown row(s) {unknown}; the rows are {', '.join(ROWS)}")
    if min(args.batch, args.prompt, args.new_tokens, args.peft_new_tokens, args.serial_adapters, args.add_repeats,
           args.gen_repeats) < 1:
        p.error("--batch, --prompt, --new-tokens, --peft-new-tokens, --serial-adapters, --add-repeats and --gen-repeats "
                "must be >= 1")
    return args


def generate_seconds(model, ids, new_tokens, device, repeats: int = 1, **kwargs) -> tuple[float, torch.Tensor]:
    """Median seconds of ``repeats`` generate calls after one warm-up (Triton compiles, cuBLAS picks its kernels)."""
    run = lambda: model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,  # noqa
                                 min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, **kwargs)
    out = run()
    seconds = [common.timed(run, device)[0] for _ in range(repeats)]
    return statistics.median(seconds), out


def step_rate(model, ids, device, new_tokens, repeats: int = 1, **kwargs) -> dict:
    """Tokens/s of the whole generate call, and of decoding alone (medians of ``repeats`` calls with 1 and with
    new_tokens new tokens)."""
    full, out = generate_seconds(model, ids, new_tokens, device, repeats, **kwargs)
    first, _ = generate_seconds(model, ids, 1, device, repeats, **kwargs)
    rows = ids.shape[0]
    decode = (full - first) / max(new_tokens - 1, 1)
    return {"generate_s": full, "tokens_per_s": rows * new_tokens / full, "prefill_and_first_s": first,
            "decode_step_ms": decode * 1e3, "decode_tokens_per_s": rows / decode if decode > 0 else None,
            "new_tokens": new_tokens, "rows": rows, "first_tokens": out[:, ids.shape[1]:ids.shape[1] + 4].tolist()}


def decode_profile(model, ids, device, **kwargs) -> dict:
    """Per decode step: CUDA kernels, GPU busy ms, wall ms, and the top kernels by GPU time (profiled
    generate of 9 new tokens minus one of 1, over 8 steps)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    totals = {}
    for n in (1, 9):
        run = lambda: model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,  # noqa
                                     min_new_tokens=n, do_sample=False, pad_token_id=0, **kwargs)
        run()
        with profile(activities=activities) as prof:
            seconds, _ = common.timed(run, device)
        totals[n] = (seconds, common.kernels_by_name(prof))
    (s1, n1), (s9, n9) = totals[1], totals[9]
    per = {k: [(v[0] - n1.get(k, [0, 0.0])[0]) / 8, (v[1] - n1.get(k, [0, 0.0])[1]) / 8] for k, v in n9.items()}
    ranked = sorted(per.items(), key=lambda kv: -kv[1][1])
    return {"wall_ms_per_step": 1e3 * (s9 - s1) / 8, "kernels_per_step": sum(c for c, _ in per.values()),
            "gpu_busy_ms_per_step": sum(t for _, t in per.values()),
            "top": [{"name": k, "calls": c, "gpu_ms": t} for k, (c, t) in ranked[:25]]}


def print_profiles(profiles: dict) -> None:
    print("\n| row (profiled) | wall ms / decode step | CUDA kernels / step | GPU busy ms / step |")
    print("|---|---|---|---|")
    for key, p in profiles.items():
        print(f"| {key} | {p['wall_ms_per_step']:.2f} | {p['kernels_per_step']:.0f} | {p['gpu_busy_ms_per_step']:.2f} |")
    for key, p in profiles.items():
        print(f"\n{key}: top kernels per decode step (calls, GPU ms)")
        for t in p["top"][:15]:
            print(f"  {t['calls']:7.1f} {t['gpu_ms']:8.3f}  {t['name']}")


def save_unilora(folder: Path, cfg, args, device, dtype, seed: int) -> Path:
    """An adapter with its own θ_d (uniform in ±0.05, seeded): adapters differ only in θ_d."""
    from unilora_hf import inject_adapter

    model = common.build_llama(cfg, torch.device("meta"), dtype)
    adapter = inject_adapter(model, args.unilora_config)
    theta = torch.empty(args.d).uniform_(-0.05, 0.05, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        adapter.theta_d.data = theta.to(device)
    adapter.save_adapter(folder)
    return folder


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = common.pick_device(args.device)
    dtype = common.DTYPES[args.dtype]
    from unilora_hf import UniLoraConfig, get_adapter, inject_adapter, load_adapter

    cfg = common.llama_config("tiny" if args.tiny else args.size)
    args.unilora_config = UniLoraConfig(r=args.r, theta_d_length=args.d, target_modules=common.LLAMA_TARGETS)
    record = {"environment": common.environment(device), "args": {k: v for k, v in vars(args).items()
                                                                  if k != "unilora_config"}, "rows": {}}
    started = time.perf_counter()
    ids = common.random_tokens(cfg.vocab_size, args.batch, args.prompt, device)
    base = common.build_llama(cfg, device, dtype).eval()
    base_bytes = common.allocated(device)
    tmp = Path(tempfile.mkdtemp(prefix="unilora_multi_"))
    n_adapters = max(args.batch, args.serial_adapters)
    folders = [save_unilora(tmp / f"u{i}", cfg, args, device, dtype, seed=i) for i in range(n_adapters)]
    rows = record["rows"]

    with torch.no_grad():
        if "base" in args.rows:
            rows["base"] = common.run_row(
                "base", lambda: step_rate(base, ids, device, args.new_tokens, args.gen_repeats), device)
        if {"one_adapter", "mixed"} & set(args.rows):
            load_adapter(base, folders[0], adapter_name="u0")
            for i in range(1, args.batch):
                base.load_adapter(folders[i], adapter_name=f"u{i}")
            if "one_adapter" in args.rows:
                rows["one_adapter"] = common.run_row(
                    "one_adapter", lambda: step_rate(base, ids, device, args.new_tokens, args.gen_repeats), device)
            if "mixed" in args.rows:
                names = [f"u{i}" for i in range(args.batch)]
                rows["mixed"] = common.run_row(
                    "mixed", lambda: step_rate(base, ids, device, args.new_tokens, args.gen_repeats, adapter_names=names),
                    device)
            if args.profile:
                names = [f"u{i}" for i in range(args.batch)]
                adapter = get_adapter(base)
                record["profiles"] = {"base": None, "one_adapter": None, "mixed": None}
                with adapter.disabled():
                    record["profiles"]["base"] = decode_profile(base, ids, device)
                record["profiles"]["one_adapter"] = decode_profile(base, ids, device)
                record["profiles"]["mixed"] = decode_profile(base, ids, device, adapter_names=names)
                print_profiles(record["profiles"])
            get_adapter(base).unload()
        if "peft_lora_mixed" in args.rows:
            rows["peft_lora_mixed"] = common.run_row("peft_lora_mixed", lambda: peft_lora_mixed(base, ids, args, device),
                                                     device)
        if "peft_unilora_serial" in args.rows:
            rows["peft_unilora_serial"] = common.run_row(
                "peft_unilora_serial", lambda: peft_unilora_serial(base, ids, args, device), device)
    record["resident"] = common.run_row("resident", lambda: resident_memory(base, folders, args, device, base_bytes),
                                        device)
    record["total_s"] = time.perf_counter() - started
    b = rows.get("base", {}).get("decode_tokens_per_s")
    m = rows.get("mixed", {}).get("decode_tokens_per_s")
    p = rows.get("peft_lora_mixed", {}).get("decode_tokens_per_s")
    res = record["resident"]
    record["targets"] = {}
    if b and m:
        record["targets"]["mixed decode >= 0.8 x base"] = m >= 0.8 * b
    if m and p:
        record["targets"]["mixed decode >= 2 x PEFT LoRA mixed"] = m >= 2 * p
    if isinstance(res, dict) and res.get("beyond_base_gib"):
        thousand = res["beyond_base_gib"].get("1000")
        if thousand is not None:
            record["targets"]["1,000 adapters <= 2.5 GiB"] = thousand <= 2.5
        record["targets"]["switch < 1 ms"] = res["switch_ms"] < 1.0
        record["targets"]["add from a folder < 50 ms"] = res["add_ms"] < 50.0
    table = [[ROWS[k], r.get("tokens_per_s"), r.get("decode_tokens_per_s"), r.get("decode_step_ms"),
              (r.get("decode_tokens_per_s") / b) if b and r.get("decode_tokens_per_s") else None, r.get("new_tokens")]
             for k, r in rows.items() if "error" not in r]
    common.write_json(args.out, record)
    common.print_footer(["run", "tokens/s (generate)", "decode tokens/s", "decode step ms", "decode × base",
                         "new tokens"], table, record)
    if isinstance(res, dict) and "error" not in res:
        print(f"\nresident beyond the base (GiB): {res['beyond_base_gib']}; add from folder {res['add_ms']:.2f} ms; "
              f"switch {res['switch_ms']:.3f} ms")
    return record


def peft_lora_mixed(base, ids, args, device) -> dict:
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=args.r, lora_alpha=args.r, target_modules=common.LLAMA_TARGETS, init_lora_weights=False)
    model = get_peft_model(base, cfg, adapter_name="l0")
    for i in range(1, args.batch):
        model.add_adapter(f"l{i}", cfg)
    model.eval()  # PEFT refuses adapter_names in training mode
    names = [f"l{i}" for i in range(args.batch)]
    try:
        result = step_rate(model, ids, device, args.peft_new_tokens, adapter_names=names)
        result["resident_lora_mib_each"] = sum(
            p.numel() * p.element_size() for n, p in model.named_parameters() if ".l1." in n) / common.MIB
    finally:
        model.unload()
    return result


def peft_unilora_serial(base, ids, args, device) -> dict:
    from peft import UniLoraConfig as PeftConfig
    from peft import get_peft_model

    cfg = PeftConfig(r=args.r, theta_d_length=args.d, target_modules=common.LLAMA_TARGETS)
    model = get_peft_model(base, cfg, adapter_name="p0")
    for i in range(1, args.serial_adapters):
        model.add_adapter(f"p{i}", cfg)
    model.eval()
    one = ids[:1]
    try:
        model.set_adapter("p0")
        generate_seconds(model, one, args.new_tokens, device)  # warm-up
        seconds = 0.0
        for i in range(args.serial_adapters):
            model.set_adapter(f"p{i}")
            s, _ = common.timed(lambda: model.generate(input_ids=one, attention_mask=torch.ones_like(one),
                                                       max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                                       do_sample=False, pad_token_id=0), device)
            seconds += s
    finally:
        model.unload()
    return {"generate_s": seconds, "tokens_per_s": args.serial_adapters * args.new_tokens / seconds,
            "decode_tokens_per_s": args.serial_adapters * args.new_tokens / seconds, "new_tokens": args.new_tokens,
            "rows": args.serial_adapters, "adapters": args.serial_adapters}


def resident_memory(base, folders, args, device, base_bytes) -> dict:
    """GPU bytes beyond the base with N adapters resident; add-from-folder and switch times."""
    from unilora_hf import get_adapter, load_adapter

    load_adapter(base, folders[0], adapter_name="r0")
    adapter = get_adapter(base)
    beyond = {}
    count = 1
    g = torch.Generator().manual_seed(7)
    for target in sorted(args.resident):
        while count < target:
            adapter.add(f"r{count}", torch.empty(args.d).uniform_(-0.05, 0.05, generator=g))
            count += 1
        common.sync(device)
        beyond[str(target)] = common.to_gib(common.allocated(device) - base_bytes) if base_bytes is not None else None
    adds = []
    for i in range(args.add_repeats):
        s, _ = common.timed(lambda: base.load_adapter(folders[1 + i % (len(folders) - 1)], adapter_name=f"f{i}"),
                            device)
        adds.append(s)
    switches = []
    names = adapter.adapter_names
    for i in range(100):
        s, _ = common.timed(lambda: adapter.set_adapter(names[(i * 37) % len(names)]), device)
        switches.append(s)
    adapter.unload()
    return {"beyond_base_gib": beyond, "add_ms": statistics.median(adds) * 1e3,
            "switch_ms": statistics.median(switches) * 1e3, "resident_counts": sorted(args.resident)}


if __name__ == "__main__":
    main()
