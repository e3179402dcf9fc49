"""Training-step benchmark: the project's reference workload, every method in one process.

Workload: a Llama-shape model with random weights (``--size 1b``: hidden 2048, 22 layers, 32 heads,
4 KV heads, MLP 5632, vocab 32000; ``--size 7b``: hidden 4096, MLP 11008, 32 heads, 32 KV heads, 4
layers), bf16, batch 4 × 1024 random tokens with labels = inputs, all 7 linear projections of every layer
adapted, r = 16, AdamW (lr 1e-4). A step is forward + backward + optimizer step + zero_grad; each row
runs ``--warmup`` steps (3) then times ``--steps`` steps (10) one by one (device synchronised around
each), and reports their median and minimum.

Rows (``--only`` picks some, comma-separated):
    floor            frozen base, no adapter: every weight frozen, the input embeddings' output made to
                     require grad (``enable_input_require_grads``, what PEFT does for adapters with
                     checkpointing), so backward runs through every layer's activations and computes no
                     weight gradient; no optimizer (nothing trains). This is the least any adapter that
                     reaches the first layer must pay.
    peft_lora        PEFT LoRA, r, the same 7 projections (PEFT's default fp32 adapter weights).
    peft_unilora     PEFT 0.21's UniLoRA tuner, r, d = theta_d_length, proj_seed 42.
    unilora_hf       unilora_hf, native projection (kernels as dispatched for the device).
    unilora_hf_peft  unilora_hf with projection="peft" (PEFT-identical projection, CSR inverse cached).
    unilora_hf_ungrouped
                     unilora_hf with every adapted layer on its own: q/k/v and gate/up not run as one sibling set
                     (``siblings``; under torch.compile a set reads x once for its rank-r inputs and sums one dx);
                     for an A/B in one process. Not in the default rows.
    unilora_hf_unfused_mlp
                     unilora_hf with each SwiGLU MLP block run as its three adapted layers, not as the one op
                     ``lora_swiglu_mlp`` (``swiglu``; it applies under torch.compile with the triton backend); for an
                     A/B in one process. Not in the default rows.
    unilora_hf_one_stream
                     unilora_hf with a compiled backward's weight gradients on the caller's stream, not on a second
                     one beside the base GEMMs (``lora_linear.SECOND_STREAM``, which applies under CUDA graphs); for
                     an A/B in one process, with --compile reduce-overhead. Not in the default rows.
Peak memory: ``max_memory_allocated`` from just before the warm-up steps to the end of the row (model,
optimizer state, activations); the model is freed (gc + empty_cache) between rows. "Adapter buffers" /
"cache" / "host": bytes the adapter keeps besides its parameters (``common.adapter_state_bytes``);
"held between steps": device memory allocated after a step beyond parameters and optimizer state,
which catches state of any kind kept between steps (the target: nothing of size D).

    python benchmarks/train_step.py --out results/train_step_1b.json            # GPU, ~2 min
    python benchmarks/train_step.py --size 7b --out results/train_step_7b.json
    python benchmarks/train_step.py --tiny --out /tmp/t.json                    # CPU, seconds
    python benchmarks/train_step.py --only unilora_hf --profile unilora_hf --out /tmp/p.json

Compiled and interleaved (``--compile MODE``, MODE one of default, max-autotune-no-cudagraphs,
reduce-overhead): every row's model is built and kept resident, once eager and once ``torch.compile(model,
mode=MODE)`` (``--no-eager``: compiled only); each variant runs ``--warmup`` steps (compilation included,
timed as ``warmup_s``); then ``--rounds`` rounds (default 3) each run ``--steps`` steps of every variant in
turn (A B C A B C ...), so host drift hits every row alike. Reported per variant: the median and minimum over
all timed steps and the spread of the per-round medians; ratios to the floor of the same mode. Rows default
to floor, peft_lora, unilora_hf. With reduce-overhead each step begins with
``torch.compiler.cudagraph_mark_step_begin()``. ``--queued``: in every round each variant also runs ``--steps``
steps back to back with one synchronisation at the end (reported per step as ``queued_ms``, with its ratio to the
floor). A synchronised step (``Trainer`` synchronises each step) includes the host time before its first kernel;
queued steps overlap it with the GPU's work of the steps before, so their ratio is the GPU's.

    python benchmarks/train_step.py --compile default --out results/train_compile_1b.json
"""

from __future__ import annotations

import argparse
import statistics
import time

import common
import torch

COMPILE_MODES = ("default", "max-autotune-no-cudagraphs", "reduce-overhead")
ROWS = {
    "floor": "frozen base, no adapter (floor)",
    "peft_lora": "PEFT LoRA",
    "peft_unilora": "PEFT UniLoRA",
    "unilora_hf": "unilora_hf (native)",
    "unilora_hf_peft": "unilora_hf (peft projection)",
    "unilora_hf_ungrouped": "unilora_hf (native), sibling layers not grouped",
    "unilora_hf_one_stream": "unilora_hf (native), weight gradients on one stream",
    "unilora_hf_unfused_mlp": "unilora_hf (native), SwiGLU MLP as three layers",
}
AB_ROWS = ("unilora_hf_ungrouped", "unilora_hf_one_stream", "unilora_hf_unfused_mlp")  # only when asked for


def parse_args(argv=None) -> argparse.Namespace:
    p = common.base_parser(__doc__, "tiny Llama, few steps: a CPU smoke test of the script")
    p.add_argument("--layers", type=int, default=None, help="override the layer count of --size")
    p.add_argument("--batch", type=int, default=None, help="sequences per step (default 4; tiny 2)")
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 1024; tiny 32)")
    p.add_argument("--r", type=int, default=None, help="rank (default 16; tiny 4)")
    p.add_argument("--d", type=int, default=None, help="theta_d_length (default 2^19; tiny 512)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per row (default 3; tiny 1)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per row (default 10; tiny 2)")
    p.add_argument("--only", default=None, help=f"comma-separated rows out of {','.join(ROWS)}")
    p.add_argument("--profile", default=None, metavar="ROW",
                   help="also profile ROW for --profile-steps steps and print its top kernels")
    p.add_argument("--profile-steps", type=int, default=3)
    p.add_argument("--compile", default=None, choices=COMPILE_MODES,
                   help="compile every row with this torch.compile mode and interleave the rows (see above)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds with --compile (default 3)")
    p.add_argument("--no-eager", action="store_true", help="with --compile: no eager twin of each row")
    p.add_argument("--queued", action="store_true",
                   help="with --compile: also time --steps steps queued with one synchronisation (see above)")
    args = p.parse_args(argv)
    if args.compile is not None and args.only is None:
        args.only = "floor,peft_lora,unilora_hf"
    tiny = args.tiny
    args.dtype = args.dtype or ("fp32" if tiny else "bf16")
    for name, full, small in (("batch", 4, 2), ("seq", 1024, 32), ("r", 16, 4), ("d", 2**19, 512),
                              ("warmup", 3, 1), ("steps", 10, 2)):
        if getattr(args, name) is None:
            setattr(args, name, small if tiny else full)
    if args.only is None:
        args.rows = [k for k in ROWS if k not in AB_ROWS]
    else:
        args.rows = [k.strip() for k in args.only.split(",") if k.strip()]
    unknown = [k for k in args.rows if k not in ROWS]
    if unknown or not args.rows:
        p.error(f"--only {args.only!r}: unknown row(s) {unknown}; rows are {','.join(ROWS)}")
    if args.profile is not None and args.profile not in args.rows:
        p.error(f"--profile {args.profile!r} must be one of the rows being run: {','.join(args.rows)}")
    if args.steps < 1 or args.warmup < 0 or args.rounds < 1:
        p.error("--steps and --rounds must be >= 1 and --warmup >= 0")
    if args.compile is not None and args.profile is not None:
        p.error("--profile profiles the eager rows: run it without --compile")
    if args.queued and args.compile is None:
        p.error("--queued times the interleaved rounds of --compile: add --compile MODE (default, reduce-overhead, ...)")
    return args


def attach(key: str, model, args):
    """Attach the adapter of row ``key`` to ``model``; returns (model to call, trainable parameters)."""
    if key == "floor":
        model.requires_grad_(False)
        model.enable_input_require_grads()
        return model, []
    if key == "peft_lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=args.r, lora_alpha=args.r, lora_dropout=0.0,
                                                 target_modules=common.LLAMA_TARGETS))
    elif key == "peft_unilora":
        from peft import UniLoraConfig as PeftUniLoraConfig
        from peft import get_peft_model

        model = get_peft_model(model, PeftUniLoraConfig(r=args.r, theta_d_length=args.d, proj_seed=42,
                                                        target_modules=common.LLAMA_TARGETS))
    else:
        from unilora_hf import UniLoraConfig, get_adapter, inject_adapter

        kind = "peft" if key == "unilora_hf_peft" else "native"
        inject_adapter(model, UniLoraConfig(r=args.r, theta_d_length=args.d, proj_seed=42, projection=kind,
                                            target_modules=common.LLAMA_TARGETS))
        if key == "unilora_hf_ungrouped":
            get_adapter(model)._group_siblings(False)
        if key == "unilora_hf_unfused_mlp":
            get_adapter(model)._fuse_swiglu(False)
    return model, [p for p in model.parameters() if p.requires_grad]


def run(key: str, args, cfg, device, dtype, ids) -> dict:
    rec: dict = {"label": ROWS[key]}
    t0 = time.perf_counter()
    base = common.build_llama(cfg, device, dtype, seed=0)
    base.train()
    base_ids = common.tensor_ids(base)
    common.sync(device)
    rec["build_s"] = time.perf_counter() - t0
    rec["attn_implementation"] = getattr(base.config, "_attn_implementation", None)
    rec["attach_s"], (model, params) = common.timed(lambda: attach(key, base, args), device)
    rec["trainable"] = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        return loss.detach()

    before = common.param_sample(params)
    common.free(device)
    common.reset_peak(device)
    losses = []
    for _ in range(args.warmup):
        losses.append(step())
    times = []
    for _ in range(args.steps):
        seconds, loss = common.timed(step, device)
        times.append(seconds)
        losses.append(loss)
    rec.update(common.summary_ms(times))
    rec["peak_bytes"] = common.peak(device)
    rec["steady_bytes"] = common.allocated(device)
    if rec["steady_bytes"] is not None:
        # Device memory held between steps beyond parameters and optimizer state (grads are set to None):
        # buffers and caches of any kind, wherever they are kept.
        on_device = [t for st in (opt.state.values() if opt else []) for t in st.values()
                     if torch.is_tensor(t)] + list(model.parameters())
        on_device = [t for t in on_device if t.device.type == device.type]
        rec["held_between_steps_bytes"] = rec["steady_bytes"] - common.storage_bytes(on_device)
    rec["loss_first"], rec["loss_last"] = float(losses[0]), float(losses[-1])
    rec["params_moved"] = common.moved(params, before) if params else None
    rec["adapter_state_bytes"] = common.adapter_state_bytes(model, base_ids) if key != "floor" else None
    if args.profile == key:
        rec["profile"] = profile(step, args.profile_steps, device)
    del model, base, opt, params, before, losses
    return rec


def build_variant(key: str, mode: str | None, args, cfg, device, dtype, ids) -> dict:
    """One resident row: the model with its adapter, eager (mode None) or compiled with ``mode``, and its step."""
    from unilora_hf.kernels import lora_linear

    t0 = time.perf_counter()
    base = common.build_llama(cfg, device, dtype, seed=0).train()
    model, params = attach(key, base, args)
    run_model = model if mode is None else torch.compile(model, mode=mode)
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None
    graphs = mode == "reduce-overhead"

    def step():
        lora_linear.SECOND_STREAM = key != "unilora_hf_one_stream"  # read as the compiled backward is captured
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        loss = run_model(input_ids=ids, labels=ids).loss
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        lora_linear.SECOND_STREAM = True
        return loss.detach().float()

    return {"key": key, "mode": mode or "eager", "step": step, "params": params, "model": model,
            "rec": {"label": f"{ROWS[key]}, {mode or 'eager'}", "trainable": sum(p.numel() for p in params),
                    "build_s": time.perf_counter() - t0}}


def run_interleaved(args, cfg, device, dtype, ids, record: dict) -> None:
    """``--compile``: every variant resident, warmed up, then timed round by round (see the docstring)."""
    modes = ([None] if not args.no_eager else []) + [args.compile]
    variants = []
    for key in args.rows:
        for mode in modes:
            name = f"{key}@{mode or 'eager'}"
            try:
                print(f"[{time.strftime('%H:%M:%S')}] build {name}", flush=True)
                v = build_variant(key, mode, args, cfg, device, dtype, ids)
                before = common.param_sample(v["params"])
                seconds, _ = common.timed(lambda v=v: [v["step"]() for _ in range(max(args.warmup, 1))], device)
                v["rec"]["warmup_s"] = seconds
                v["before"], v["times"], v["rounds"], v["queued"] = before, [], [], []
                variants.append((name, v))
            except Exception as exc:  # a row that cannot compile is reported, the others still run
                import traceback

                traceback.print_exc()
                record["rows"][name] = {"error": f"{type(exc).__name__}: {exc}"}
    for r in range(args.rounds):
        for name, v in variants:
            if "error" in v["rec"]:
                continue
            try:
                times = [common.timed(v["step"], device)[0] for _ in range(args.steps)]
                if args.queued:
                    seconds, _ = common.timed(lambda v=v: [v["step"]() for _ in range(args.steps)], device)
                    v["queued"].append(1e3 * seconds / args.steps)
            except Exception as exc:
                v["rec"]["error"] = f"{type(exc).__name__}: {exc}"
                continue
            v["times"] += times
            v["rounds"].append(common.summary_ms(times)["median_ms"])
        print(f"[{time.strftime('%H:%M:%S')}] round {r + 1}/{args.rounds} done", flush=True)
        for name, v in variants:
            rec = v["rec"]
            if v["times"] and "error" not in rec:
                rec.update(common.summary_ms(v["times"]))
                rec["round_medians_ms"] = v["rounds"]
                rec["spread_pct"] = 100 * (max(v["rounds"]) - min(v["rounds"])) / rec["median_ms"]
                if v["queued"]:
                    rec["queued_round_ms"] = v["queued"]
                    rec["queued_ms"] = statistics.median(v["queued"])
            record["rows"][name] = rec
        common.write_json(args.out, record)  # a run cut short still leaves the rounds done so far
    for name, v in variants:
        if v["params"]:
            v["rec"]["params_moved"] = common.moved(v["params"], v["before"])


def profile(step, n: int, device) -> dict:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        for _ in range(n):
            step()
        common.sync(device)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    averages = prof.key_averages()
    table = averages.table(sort_by=sort, row_limit=30)
    top = sorted(averages, key=lambda e: getattr(e, sort.replace("cuda", "device")), reverse=True)[:30]
    kernels = [{"name": e.key, "calls": e.count,
                "self_us_per_step": getattr(e, sort.replace("cuda", "device")) / n} for e in top]
    return {"steps": n, "sort_by": sort, "table": table, "top": kernels}


def main(argv=None) -> dict:
    return _main(parse_args(argv))


def _main(args) -> dict:
    device = common.pick_device("cpu" if args.tiny and args.device is None else args.device)
    dtype = common.DTYPES[args.dtype]
    cfg = common.llama_config("tiny" if args.tiny else args.size, args.layers)
    D = args.r * common.lora_numel_per_rank(cfg)
    ids = common.random_tokens(cfg.vocab_size, args.batch, args.seq, device)
    record = {
        "benchmark": "train_step",
        "environment": common.environment(device),
        "settings": {"size": "tiny" if args.tiny else args.size, "layers": cfg.num_hidden_layers,
                     "hidden": cfg.hidden_size, "mlp": cfg.intermediate_size, "heads": cfg.num_attention_heads,
                     "kv_heads": cfg.num_key_value_heads, "vocab": cfg.vocab_size, "dtype": args.dtype,
                     "batch": args.batch, "seq": args.seq, "r": args.r, "d": args.d, "D": D,
                     "targets": common.LLAMA_TARGETS, "warmup": args.warmup, "steps": args.steps,
                     "optimizer": "AdamW lr 1e-4"},
        "rows": {},
    }
    print(f"train_step: {record['settings']}\nenvironment: {record['environment']}", flush=True)
    t_all = time.perf_counter()
    if args.compile is not None:
        record["settings"].update(compile=args.compile, rounds=args.rounds, interleaved=True, queued=args.queued)
        run_interleaved(args, cfg, device, dtype, ids, record)
        record["total_s"] = time.perf_counter() - t_all
        add_compiled_ratios(record)
        print_compiled_table(record)
        common.write_json(args.out, record)
        return record
    for key in args.rows:
        record["rows"][key] = common.run_row(key, lambda k=key: run(k, args, cfg, device, dtype, ids), device)
    record["total_s"] = time.perf_counter() - t_all
    add_ratios(record)
    print_tables(record)
    common.write_json(args.out, record)
    return record


def add_ratios(record: dict) -> None:
    rows = record["rows"]

    def ok(k):
        return k in rows and "error" not in rows[k]

    for key, rec in rows.items():
        if "error" in rec:
            continue
        for ref in ("floor", "peft_lora"):
            if ok(ref):
                rec[f"step_vs_{ref}"] = rec["median_ms"] / rows[ref]["median_ms"]
                if rec["peak_bytes"] is not None:
                    rec[f"peak_vs_{ref}"] = rec["peak_bytes"] / rows[ref]["peak_bytes"]
    targets = {}
    if ok("unilora_hf"):
        ours = rows["unilora_hf"]
        if ok("floor"):
            targets["step <= 1.3 x floor"] = ours["step_vs_floor"] <= 1.3
        if ok("peft_lora"):
            targets["step < PEFT LoRA"] = ours["median_ms"] < rows["peft_lora"]["median_ms"]
            if ours["peak_bytes"] is not None:
                targets["peak <= PEFT LoRA"] = ours["peak_bytes"] <= rows["peft_lora"]["peak_bytes"]
    record["targets"] = targets


def add_compiled_ratios(record: dict) -> None:
    """Ratios within one mode: to that mode's floor and PEFT LoRA; the targets of the compile issue."""
    rows = record["rows"]
    for name, rec in rows.items():
        if "median_ms" not in rec:
            continue
        mode = name.split("@", 1)[1]
        for ref in ("floor", "peft_lora"):
            other = rows.get(f"{ref}@{mode}", {})
            if "median_ms" in other:
                rec[f"step_vs_{ref}"] = rec["median_ms"] / other["median_ms"]
            if "queued_ms" in rec and "queued_ms" in other:
                rec[f"queued_vs_{ref}"] = rec["queued_ms"] / other["queued_ms"]
    mode = record["settings"]["compile"]
    ours, eager = rows.get(f"unilora_hf@{mode}", {}), rows.get("unilora_hf@eager", {})
    targets = {}
    if "step_vs_floor" in ours:
        targets["compiled step <= 1.15 x compiled floor"] = ours["step_vs_floor"] <= 1.15
    if "step_vs_peft_lora" in ours:
        targets["compiled step < compiled PEFT LoRA"] = ours["step_vs_peft_lora"] < 1.0
    if "step_vs_floor" in eager:
        targets["eager step <= 1.3 x eager floor"] = eager["step_vs_floor"] <= 1.3
    record["targets"] = targets


def print_compiled_table(record: dict) -> None:
    s, env = record["settings"], record["environment"]
    print(f"\n### Training step, torch.compile mode {s['compile']!r}, interleaved over {s['rounds']} rounds: "
          f"{s['size']} Llama shape ({s['layers']} layers), {s['dtype']}, batch {s['batch']} x {s['seq']}, r = {s['r']}, "
          f"d = {s['d']:,}; {env['device_name']}\n")
    headers = ["run", "step ms (median)", "step ms (min)", "round medians ms", "spread %", "warm-up s (compile)",
               "x floor (same mode)", "x PEFT LoRA (same mode)"]
    queued = s.get("queued", False)
    if queued:
        headers += ["queued step ms (median of rounds)", "queued x floor"]
    table = []
    for name, rec in record["rows"].items():
        if "median_ms" not in rec:
            table.append([name, "error: " + rec.get("error", "no timed step")[:80]] + [None] * (len(headers) - 2))
            continue
        table.append([rec["label"], rec["median_ms"], rec["min_ms"],
                      " / ".join(f"{m:.1f}" for m in rec["round_medians_ms"]), rec["spread_pct"], rec.get("warmup_s"),
                      rec.get("step_vs_floor"), rec.get("step_vs_peft_lora")]
                     + ([rec.get("queued_ms"), rec.get("queued_vs_floor")] if queued else []))
    print(common.markdown_table(headers, table))
    if record["targets"]:
        print("\nProject targets: " + "; ".join(f"{k}: {'met' if v else 'MISSED'}" for k, v in record["targets"].items()))
    print(f"\ntotal {record['total_s']:.1f} s")


def print_tables(record: dict) -> None:
    s, env = record["settings"], record["environment"]
    print(f"\n### Training step: {s['size']} Llama shape ({s['layers']} layers, hidden {s['hidden']}), {s['dtype']}, "
          f"batch {s['batch']} x {s['seq']}, r = {s['r']}, d = {s['d']:,}, D = {s['D']:,}; "
          f"{env['device_name']}, unilora_hf kernels: {env['unilora_kernel_backend']}\n")
    headers = ["run", "step ms (median)", "step ms (min)", "peak GiB", "adapter buffers MiB", "adapter cache MiB",
               "host MiB", "held between steps MiB", "trainable", "x floor", "x PEFT LoRA", "peak x PEFT LoRA"]
    table = []
    for key, rec in record["rows"].items():
        if "error" in rec:
            table.append([ROWS[key], "error: " + rec["error"][:80]] + [None] * (len(headers) - 2))
            continue
        st = rec["adapter_state_bytes"] or {}
        table.append([rec["label"], rec["median_ms"], rec["min_ms"], common.to_gib(rec["peak_bytes"]),
                      common.to_mib(st.get("buffers")), common.to_mib(st.get("cache")), common.to_mib(st.get("host")),
                      common.to_mib(rec.get("held_between_steps_bytes")), rec["trainable"], rec.get("step_vs_floor"),
                      rec.get("step_vs_peft_lora"), rec.get("peak_vs_peft_lora")])
    print(common.markdown_table(headers, table))
    if record["targets"]:
        print("\nProject targets: " + "; ".join(f"{k}: {'met' if v else 'MISSED'}"
                                                           for k, v in record["targets"].items()))
    for key, rec in record["rows"].items():
        if "profile" in rec:
            print(f"\n### Profile of {key} ({rec['profile']['steps']} steps, sorted by {rec['profile']['sort_by']})\n")
            print(rec["profile"]["table"])
    print(f"\ntotal {record['total_s']:.1f} s")


if __name__ == "__main__":
    main()
