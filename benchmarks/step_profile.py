"""Where a training step's time goes on the GPU machine: kernel launches against GPU work.

On the DESIGN section 6 workload (1.1B Llama shape, bf16, batch 4 × 1024, all 7 projections, r = 16,
d = 2^19), in ONE process:

1. launch costs: host microseconds to enqueue one small aten add, one small aten mm, one Triton
   readout through ``unilora_hf.kernels.readout`` and one Kernel D forward (2,000 / 2,000 / 500 / 2,000
   launches);
2. per row (``floor``: frozen base with input grads, no optimizer; ``unilora_hf``: the default path, the
   adapted linears' forward on Kernel D, their backward on cuBLAS GEMMs; ``unilora_hf_kernel_e``: the
   backward's dx on Kernel E; ``unilora_hf_pytorch_ops``: the same adapter with the adapted linears
   in PyTorch ops, ``F.linear`` + ``addmm_`` and autograd's backward), interleaved over ``--rounds``
   rounds of ``--steps`` steps:
   the step time (synchronised), the host time to enqueue a step (before synchronising), and, from one
   profiled step, the number of CUDA kernels and the GPU busy time (sum of kernel times);
3. with ``--cprofile``: the top Python functions of 3 ``unilora_hf`` steps by own time.

    PYTHONPATH=. python benchmarks/step_profile.py --out $OUT/step_profile.json

``--compile MODE``: the rows ``floor`` and ``unilora_hf`` compiled with ``torch.compile(mode=MODE)`` instead
(``--layers`` to shorten the model), interleaved as above; per row from one profiled step: the CUDA kernel
count, the GPU busy time, the host time to enqueue the step, and the kernels grouped by name with their calls
and GPU time (``--top`` names), so the adapter's extra GPU work can be read kernel by kernel.

    PYTHONPATH=. python benchmarks/step_profile.py --compile default --out $OUT/step_profile_compiled.json
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import torch  # noqa: E402


def launch_costs(device) -> dict:
    from unilora_hf.kernels import readout
    from unilora_hf.projection import Projection

    from unilora_hf.kernels import linear_kernels

    lk = linear_kernels.for_device(device)
    x = torch.randn(16, device=device)
    x2, w2 = torch.randn(16, 16, device=device), torch.randn(16, 16, device=device)
    A2, B2 = torch.randn(2, 16, device=device), torch.randn(16, 2, device=device)
    P = Projection.build("native", 1, 4096, 64)
    theta = torch.randn(64, device=device)
    out = {}
    for name, fn, n in (("aten_add_us", lambda: torch.add(x, 1.0), 2000),
                        ("aten_mm_us", lambda: x[None] @ x[:, None], 2000),
                        ("triton_readout_us", lambda: readout(theta, P), 500),
                        ("triton_fused_linear_us", lambda: lk.forward(x2, w2, None, A2, B2, False), 2000)):
        for _ in range(50):
            fn()
        common.sync(device)
        t = time.perf_counter()
        for _ in range(n):
            fn()
        out[name] = 1e6 * (time.perf_counter() - t) / n
        common.sync(device)
    return out


def timed_steps(step, n: int, times: list, enqueue: list) -> None:
    """Run ``n`` steps, each synchronised: append its ms to ``times`` and its host enqueue ms to ``enqueue``."""
    for _ in range(n):
        t0 = time.perf_counter()
        step()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        times.append(1e3 * (time.perf_counter() - t0))
        enqueue.append(1e3 * (t1 - t0))


def kernels_and_busy(step) -> tuple[int, float]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    events = [e for e in prof.events() if e.device_type.name == "CUDA"]
    return len(events), sum(e.device_time for e in events) / 1e3


def kernel_breakdown(step, top: int) -> dict:
    """One profiled step: kernel count, GPU busy ms, and the ``top`` kernel names by GPU time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    by_name = common.kernels_by_name(prof)
    ranked = sorted(by_name.items(), key=lambda kv: -kv[1][1])
    return {"kernels": sum(c for c, _ in by_name.values()), "gpu_busy_ms": sum(t for _, t in by_name.values()),
            "top": [{"name": k, "calls": c, "gpu_ms": t} for k, (c, t) in ranked[:top]]}


def main_compiled(a) -> dict:
    from unilora_hf import UniLoraConfig, inject_adapter

    device = torch.device("cuda")
    cfg = common.llama_config("1b", a.layers)
    ids = common.random_tokens(cfg.vocab_size, 4, 1024, device)
    record = {"benchmark": "step_profile", "compile": a.compile, "layers": cfg.num_hidden_layers,
              "environment": common.environment(device), "rows": {}}
    graphs = a.compile == "reduce-overhead"

    def make(key):
        model = common.build_llama(cfg, device, torch.bfloat16, seed=0).train()
        if key == "floor":
            model.requires_grad_(False)
            model.enable_input_require_grads()
            opt = None
        else:
            inject_adapter(model, UniLoraConfig(r=16, theta_d_length=2**19, target_modules=common.LLAMA_TARGETS))
            opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-4)
        run = torch.compile(model, mode=a.compile)

        def step():
            if graphs:
                torch.compiler.cudagraph_mark_step_begin()
            run(input_ids=ids, labels=ids).loss.backward()
            if opt is not None:
                opt.step()
                opt.zero_grad(set_to_none=True)
        return step

    rows = {key: make(key) for key in ("floor", "unilora_hf")}
    times = {k: [] for k in rows}
    enqueue = {k: [] for k in rows}
    for key, step in rows.items():
        t0 = time.perf_counter()
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        record["rows"][key] = {"warmup_s": time.perf_counter() - t0}
        print(f"[{time.strftime('%H:%M:%S')}] {key} compiled and warm", flush=True)
    for _ in range(a.rounds):
        for key, step in rows.items():
            timed_steps(step, a.steps, times[key], enqueue[key])
    for key, step in rows.items():
        record["rows"][key].update(step_ms_median=statistics.median(times[key]), step_ms_min=min(times[key]),
                                   enqueue_ms_median=statistics.median(enqueue[key]), **kernel_breakdown(step, a.top))
    f = record["rows"]["floor"]
    print(f"\ncompiled ({a.compile}), {cfg.num_hidden_layers} layers")
    print("| row | step ms (median) | × floor | host enqueue ms | kernels | GPU busy ms |")
    print("|---|---|---|---|---|---|")
    for key, r in record["rows"].items():
        print(f"| {key} | {r['step_ms_median']:.2f} | {r['step_ms_median'] / f['step_ms_median']:.3f} | "
              f"{r['enqueue_ms_median']:.2f} | {r['kernels']} | {r['gpu_busy_ms']:.2f} |")
    floor_names = {t["name"]: t for t in f["top"]}
    o = record["rows"]["unilora_hf"]
    print(f"\nunilora_hf: top kernels (calls, GPU ms; the floor's same-named kernel beside it), GPU busy "
          f"{o['gpu_busy_ms']:.2f} ms against the floor's {f['gpu_busy_ms']:.2f} ms:")
    for t in o["top"]:
        fl = floor_names.get(t["name"])
        print(f"  {t['calls']:5d} {t['gpu_ms']:8.3f}   floor: {fl['calls'] if fl else '-':>5} "
              f"{fl['gpu_ms'] if fl else 0.0:8.3f}   {t['name']}")
    common.write_json(a.out, record)
    return record


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--cprofile", action="store_true")
    p.add_argument("--compile", default=None, choices=("default", "max-autotune-no-cudagraphs", "reduce-overhead"))
    p.add_argument("--layers", type=int, default=None, help="with --compile: layers of the 1.1B shape (default 22)")
    p.add_argument("--top", type=int, default=40, help="with --compile: kernel names listed per row")
    a = p.parse_args(argv)
    if a.compile is not None:
        return main_compiled(a)
    from unilora_hf import UniLoraConfig, inject_adapter
    from unilora_hf.kernels import lora_linear

    device = torch.device("cuda")
    cfg = common.llama_config("1b", None)
    ids = common.random_tokens(cfg.vocab_size, 4, 1024, device)
    record = {"benchmark": "step_profile", "environment": common.environment(device), "launch": launch_costs(device)}
    floor = common.build_llama(cfg, device, torch.bfloat16, seed=0).train()
    floor.requires_grad_(False)
    floor.enable_input_require_grads()
    model = common.build_llama(cfg, device, torch.bfloat16, seed=0).train()
    inject_adapter(model, UniLoraConfig(r=16, theta_d_length=2**19, target_modules=common.LLAMA_TARGETS))
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-4)
    fused = lora_linear.fused_kernels

    def step_floor():
        floor(input_ids=ids, labels=ids).loss.backward()

    def step_ours():
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    rows = {"floor": (step_floor, fused), "unilora_hf": (step_ours, fused),
            "unilora_hf_kernel_e": (step_ours, fused),
            "unilora_hf_pytorch_ops": (step_ours, lambda device: None)}
    times = {k: [] for k in rows}
    enqueue = {k: [] for k in rows}
    for _ in range(a.rounds):
        for key, (step, impl) in rows.items():
            lora_linear.fused_kernels = impl
            lora_linear._KERNEL_E = key == "unilora_hf_kernel_e"
            for _ in range(2):
                step()
            torch.cuda.synchronize()
            timed_steps(step, a.steps, times[key], enqueue[key])
    record["rows"] = {}
    for key, (step, impl) in rows.items():
        lora_linear.fused_kernels = impl
        lora_linear._KERNEL_E = key == "unilora_hf_kernel_e"
        n, busy = kernels_and_busy(step)
        record["rows"][key] = {"step_ms_median": statistics.median(times[key]), "step_ms_min": min(times[key]),
                               "enqueue_ms_median": statistics.median(enqueue[key]), "kernels": n, "gpu_busy_ms": busy}
    lora_linear.fused_kernels = fused
    lora_linear._KERNEL_E = False
    if a.cprofile:
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(3):
            step_ours()
        torch.cuda.synchronize()
        prof.disable()
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(12)
        record["cprofile_top"] = text.getvalue()
        print(record["cprofile_top"])
    floor_ms = record["rows"]["floor"]["step_ms_median"]
    print("launch costs (host µs):", {k: round(v, 1) for k, v in record["launch"].items()})
    print("| row | step ms (median) | step ms (min) | × floor | host enqueue ms | kernels | GPU busy ms |")
    print("|---|---|---|---|---|---|---|")
    for key, r in record["rows"].items():
        print(f"| {key} | {r['step_ms_median']:.1f} | {r['step_ms_min']:.1f} | {r['step_ms_median'] / floor_ms:.3f} "
              f"| {r['enqueue_ms_median']:.1f} | {r['kernels']} | {r['gpu_busy_ms']:.1f} |")
    common.write_json(a.out, record)
    return record


if __name__ == "__main__":
    main()
