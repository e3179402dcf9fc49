"""Attach benchmark: time and extra GPU memory to attach a stored Uni-LoRA adapter to a base on the GPU.

The base is the reference 1.1B Llama shape (``--size 7b``: 4 layers of Llama-2-7B's shape) with
random weights, bf16, loaded once on the device. D (the LoRA parameter count the projection covers) is
varied by the rank over all 7 linear projections: D = r · Σ(in + out) = r · 788,480 for the 1.1B shape,
so the default ranks 1, 4, 16, 64, 256 give D ≈ 0.8M, 3.2M, 12.6M, 50.5M and 201.9M (d = 2^19).

For each D and each row, an adapter is first saved to a temporary folder (untimed; the base is restored
afterwards), then its attach is timed: the path a user takes to load a stored adapter onto a base
already on the GPU:
    unilora_hf       ``UniLoraAutoModel.from_pretrained(base, folder)`` (native projection)
    unilora_hf_peft  the same with an adapter saved with ``projection="peft"`` (PEFT's file format)
    peft_unilora     ``peft.PeftModel.from_pretrained(base, folder)`` (PEFT 0.21's UniLoRA tuner)
Reported: attach seconds; peak and resident extra device memory of the attach (``max_memory_allocated`` /
``memory_allocated`` minus ``memory_allocated`` before it); the adapter's non-parameter state (index /
scale buffers, device caches, host tables: ``common.adapter_state_bytes``); then one forward of 1 × 16
tokens: its time, its extra peak over the base model's own forward, the memory still held after it, and
the largest change of the logits against the base (an attached adapter must change the output).
``--peft-max-d`` skips the PEFT-index rows (peft_unilora, unilora_hf_peft) above that D, since PEFT's
index generation alone takes ~9 s at D = 200M; skipped rows are marked in the JSON and the table.

    python benchmarks/load.py --out results/load.json                      # GPU, ~2-3 min
    python benchmarks/load.py --peft-max-d 60000000 --out results/load.json
    python benchmarks/load.py --tiny --out /tmp/l.json                     # CPU, seconds
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import common
import torch

ROWS = {
    "unilora_hf": "unilora_hf (native)",
    "unilora_hf_peft": "unilora_hf (peft projection)",
    "peft_unilora": "PEFT UniLoRA",
}
PEFT_INDEXED = ("unilora_hf_peft", "peft_unilora")
def parse_args(argv=None) -> argparse.Namespace:
    p = common.base_parser(__doc__, "tiny Llama, small D: a CPU smoke test of the script")
    p.add_argument("--ranks", default=None, help="comma-separated ranks (default 1,4,16,64,256; tiny 1,4)")
    p.add_argument("--d", type=int, default=None, help="theta_d_length (default 2^19; tiny 512)")
    p.add_argument("--peft-max-d", type=int, default=None,
                   help="skip peft_unilora / unilora_hf_peft for D above this (default: run every D)")
    p.add_argument("--only", default=None, help=f"comma-separated rows out of {','.join(ROWS)}")
    args = p.parse_args(argv)
    args.dtype = args.dtype or ("fp32" if args.tiny else "bf16")
    args.d = args.d or (512 if args.tiny else 2**19)
    try:
        args.ranks = [int(r) for r in (args.ranks or ("1,4" if args.tiny else "1,4,16,64,256")).split(",")]
    except ValueError:
        p.error(f"--ranks {args.ranks!r}: give comma-separated positive integers, e.g. 1,16,256")
    if not args.ranks or min(args.ranks) < 1:
        p.error(f"--ranks {args.ranks!r}: ranks must be positive integers")
    args.rows = list(ROWS) if args.only is None else [k.strip() for k in args.only.split(",") if k.strip()]
    unknown = [k for k in args.rows if k not in ROWS]
    if unknown or not args.rows:
        p.error(f"--only {args.only!r}: unknown row(s) {unknown}; rows are {','.join(ROWS)}")
    return args


def save(key: str, base, r: int, d: int, folder: Path) -> None:
    """Write an adapter of row ``key`` (θ_d at its random init) into ``folder`` and restore ``base``."""
    if key == "peft_unilora":
        from peft import UniLoraConfig as PeftUniLoraConfig
        from peft import get_peft_model

        pm = get_peft_model(base, PeftUniLoraConfig(r=r, theta_d_length=d, proj_seed=42,
                                                     target_modules=common.LLAMA_TARGETS))
        pm.save_pretrained(str(folder))
        pm.unload()
    else:
        from unilora_hf import UniLoraConfig, inject_adapter

        kind = "peft" if key == "unilora_hf_peft" else "native"
        adapter = inject_adapter(base, UniLoraConfig(r=r, theta_d_length=d, proj_seed=42, projection=kind,
                                                     target_modules=common.LLAMA_TARGETS))
        adapter.save_adapter(folder)
        adapter.unload()


def attach(key: str, base, folder: Path):
    if key == "peft_unilora":
        from peft import PeftModel

        return PeftModel.from_pretrained(base, str(folder))
    from unilora_hf import UniLoraAutoModel

    return UniLoraAutoModel.from_pretrained(base, folder)


def detach(key: str, model) -> None:
    if key == "peft_unilora":
        model.unload()
    else:
        from unilora_hf import get_adapter

        get_adapter(model).unload()


def forward_peak_extra(model, ids, device) -> tuple[float, int | None, torch.Tensor]:
    """(seconds, extra peak bytes over the memory held before, last-token logits) of one no-grad forward."""
    common.sync(device)
    before = common.allocated(device)
    common.reset_peak(device)
    with torch.no_grad():
        seconds, out = common.timed(lambda: model(input_ids=ids).logits[:, -1].float().cpu(), device)
    extra = None if before is None else common.peak(device) - before
    return seconds, extra, out


def measure(key: str, r: int, args, base, base_ids, ids, base_logits, base_fwd_extra, device, tmp: Path) -> dict:
    folder = tmp / f"{key}_r{r}"
    rec: dict = {}
    rec["save_s"], _ = common.timed(lambda: save(key, base, r, args.d, folder), device)
    rec["adapter_files_bytes"] = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
    common.free(device)
    before = common.allocated(device)
    common.reset_peak(device)
    rec["attach_s"], model = common.timed(lambda: attach(key, base, folder), device)
    if before is not None:
        rec["attach_peak_extra_bytes"] = common.peak(device) - before
        rec["attach_resident_extra_bytes"] = common.allocated(device) - before
    rec["adapter_state_bytes"] = common.adapter_state_bytes(model, base_ids)
    rec["forward_s"], fwd_extra, logits = forward_peak_extra(model, ids, device)
    if fwd_extra is not None:
        rec["forward_peak_extra_bytes"] = fwd_extra - base_fwd_extra
        rec["resident_after_forward_bytes"] = common.allocated(device) - before
    rec["adapter_state_bytes_after_forward"] = common.adapter_state_bytes(model, base_ids)
    rec["max_logit_change"] = (logits - base_logits).abs().max().item()
    detach(key, model)
    del model
    return rec


def warm_up(base, ids, args, device, tmp: Path) -> None:
    """One attach + forward of every row at the smallest rank, so one-time costs (CUDA context, cuBLAS,
    Triton compilation) do not land on the first measured D."""
    for key in args.rows:
        folder = tmp / f"warmup_{key}"
        save(key, base, args.ranks[0], args.d, folder)
        model = attach(key, base, folder)
        with torch.no_grad():
            model(input_ids=ids)
        detach(key, model)
        del model
        common.free(device)


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = common.pick_device("cpu" if args.tiny and args.device is None else args.device)
    cfg = common.llama_config("tiny" if args.tiny else args.size)
    per_rank = common.lora_numel_per_rank(cfg)
    record = {
        "benchmark": "load",
        "environment": common.environment(device),
        "settings": {"size": "tiny" if args.tiny else args.size, "layers": cfg.num_hidden_layers,
                     "hidden": cfg.hidden_size, "mlp": cfg.intermediate_size, "dtype": args.dtype, "d": args.d,
                     "ranks": args.ranks, "D": {str(r): r * per_rank for r in args.ranks},
                     "targets": common.LLAMA_TARGETS, "peft_max_d": args.peft_max_d, "forward_tokens": 16},
        "rows": {},
    }
    print(f"load: {record['settings']}\nenvironment: {record['environment']}", flush=True)
    t_all = time.perf_counter()
    base = common.build_llama(cfg, device, common.DTYPES[args.dtype], seed=0).eval()
    base_ids = common.tensor_ids(base)
    ids = common.random_tokens(cfg.vocab_size, 1, 16, device)
    with tempfile.TemporaryDirectory(prefix="unilora_load_bench_") as tmp_name:
        tmp = Path(tmp_name)
        warm_up(base, ids, args, device, tmp)
        _, base_fwd_extra, base_logits = forward_peak_extra(base, ids, device)
        for r in args.ranks:
            D = r * per_rank
            for key in args.rows:
                name = f"{key}@r{r}"
                if key in PEFT_INDEXED and args.peft_max_d is not None and D > args.peft_max_d:
                    record["rows"][name] = {"key": key, "r": r, "D": D,
                                            "skipped": f"D = {D:,} > --peft-max-d {args.peft_max_d:,}"}
                    continue
                rec = common.run_row(name, lambda k=key, r=r: measure(k, r, args, base, base_ids, ids, base_logits,
                                                                      base_fwd_extra or 0, device, tmp), device)
                record["rows"][name] = {"key": key, "r": r, "D": D, **rec}
    record["total_s"] = time.perf_counter() - t_all
    add_targets(record)
    print_table(record)
    common.write_json(args.out, record)
    return record


def add_targets(record: dict) -> None:
    """The project target: at D = 200M, attach in < 0.1 s with < 16 MiB extra (checked at the largest D ≥ 2e8)."""
    ours = [rec for rec in record["rows"].values() if rec["key"] == "unilora_hf" and "attach_s" in rec]
    big = [rec for rec in ours if rec["D"] >= 200_000_000]
    targets = {}
    if big:
        rec = max(big, key=lambda x: x["D"])
        targets["attach < 0.1 s at D >= 200M"] = rec["attach_s"] < 0.1
        if "attach_peak_extra_bytes" in rec:
            targets["attach extra < 16 MiB at D >= 200M"] = rec["attach_peak_extra_bytes"] < 16 * common.MIB
    record["targets"] = targets


def print_table(record: dict) -> None:
    s = record["settings"]
    env = record["environment"]
    print(f"\n### Attaching a stored adapter: {s['size']} Llama shape, {s['dtype']}, all 7 projections, "
          f"d = {s['d']:,}; {env['device_name']}, unilora_hf kernels: {env['unilora_kernel_backend']}\n")
    headers = ["D", "r", "run", "attach s", "attach peak extra MiB", "attach resident extra MiB",
               "index buffers MiB (device)", "host MiB", "first forward s", "forward extra MiB",
               "held after forward MiB", "save s"]
    table = []
    for rec in record["rows"].values():
        head = [rec["D"], rec["r"], ROWS[rec["key"]]]
        if "skipped" in rec or "error" in rec:
            note = ("skipped: " + rec["skipped"]) if "skipped" in rec else ("error: " + rec["error"][:80])
            table.append(head + [note] + [None] * (len(headers) - 4))
            continue
        st = rec["adapter_state_bytes_after_forward"]
        table.append(head + [rec["attach_s"], common.to_mib(rec.get("attach_peak_extra_bytes")),
                             common.to_mib(rec.get("attach_resident_extra_bytes")),
                             common.to_mib(st["buffers"] + st["cache"]), common.to_mib(st["host"]), rec["forward_s"],
                             common.to_mib(rec.get("forward_peak_extra_bytes")),
                             common.to_mib(rec.get("resident_after_forward_bytes")), rec["save_s"]])
    common.print_footer(headers, table, record)


if __name__ == "__main__":
    main()
