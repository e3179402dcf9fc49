"""Kernels D/E (the fused adapted linear) against cuBLAS, per GEMM shape of the DESIGN section 6 workload.

For each adapted projection shape of the 1.1B Llama (M = 4 × 1024 tokens; q/o: 2048→2048, k/v:
2048→256, gate/up: 2048→5632, down: 5632→2048; r = 16, bf16) and for decode (M = 1), in ONE process:

- ``base``: the frozen layer alone, ``F.linear`` forward and ``g @ W`` input gradient (cuBLAS);
- ``pytorch_ops``: the LoRA path in PyTorch ops (forward ``F.linear`` + ``x Aᵀ`` + ``addmm_``;
  backward ``g W``, ``g B``, ``addmm_``, dA, dB: 3 + 5 launches);
- ``fused`` with each candidate tile (BM, BN, BK, warps, stages): Kernel D forward, Kernel E + the
  two cuBLAS GEMMs for dA, dB backward (1 + 3 launches).

Per row: GPU milliseconds per forward and per backward (CUDA events over ``--reps`` back-to-back
calls) and host microseconds to enqueue one forward + backward.

    PYTHONPATH=. python benchmarks/linear_kernels.py --out $OUT/linear_kernels.json

``--pieces``: pure GPU time of every GEMM of the adapted layer, each captured ``--reps`` times in one CUDA
graph and replayed (no host time in it), per training shape: the base's forward and input gradient, and the
LoRA pieces (``h = x Aᵀ``, ``y += h Bᵀ``, Kernel D, ``gB = g B``, ``dx += gB A``, ``dA = gBᵀ x``,
``dB = gᵀ h``, and dA/dB as S batched partial products summed in float32, S = 8, 32).

    PYTHONPATH=. python benchmarks/linear_kernels.py --pieces --out $OUT/lora_pieces.json

``--projection``: pure GPU time (CUDA graphs, as ``--pieces``) of Kernel A (readout θ_D = P θ_d) and Kernel B
(θ gradient Pᵀ g, g bf16) of the native projection at the D of the 1.1B shape (22 layers) and of a 32-layer 7B,
r = 16, d = 2^19, with the permutation in uint32 (what runs for D < 2^32) and in int64 (the wide form).

    PYTHONPATH=. python benchmarks/linear_kernels.py --projection --out $OUT/projection_kernels.json

``--decode``: pure GPU time (CUDA graphs) of one decoding row (M = 1) per projection shape: the base GEMV, the
LoRA path in PyTorch ops (what a compiled graph runs unfused), and Kernel D forward with each small tile of
``DECODE_TILES``; the line "layer" sums the 7 projections of one layer. The sibling sets (q/k/v, gate/up) are also
timed as one ``forward_group`` launch each, against one Kernel D launch per layer and the base GEMVs; the layer's
sum with them is ``kernel_d_siblings_grouped``. With ``--cold`` each call reads the next
of several copies of the weights (512 MiB in all), so they come from HBM as in a model's decoding step; without
it a lone matrix of a few MiB stays in the L2 cache between calls.

    PYTHONPATH=. python benchmarks/linear_kernels.py --decode --out $OUT/decode_kernels.json
    PYTHONPATH=. python benchmarks/linear_kernels.py --decode --cold --out $OUT/decode_kernels_cold.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

SHAPES = {"q/o": (4096, 2048, 2048), "k/v": (4096, 256, 2048), "gate/up": (4096, 5632, 2048),
          "down": (4096, 2048, 5632), "decode q": (1, 2048, 2048), "decode down": (1, 2048, 5632)}
LARGE_TILES = [(128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 256, 64, 8, 3), (128, 64, 64, 4, 4),
               (64, 128, 64, 4, 4), (128, 128, 32, 4, 4)]
DECODE_TILES = [(16, 16, 256, 2, 3), (16, 16, 512, 4, 3), (16, 32, 256, 4, 3), (16, 32, 128, 2, 4),
                (16, 64, 128, 4, 3), (16, 64, 256, 4, 3), (16, 128, 64, 4, 4), (16, 16, 128, 1, 4)]
COLD_BYTES = 512 * 2**20  # weight copies cycled through with --decode --cold: well over any L2 cache
SMALL_TILES = [(16, 64, 128, 4, 3), (16, 128, 64, 4, 4), (16, 32, 256, 4, 3), (16, 64, 64, 2, 4)]


def gpu_ms(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def host_us(fn, reps: int) -> float:
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    elapsed = time.perf_counter() - t
    torch.cuda.synchronize()
    return 1e6 * elapsed / reps


def graph_us(fn, reps: int) -> float:
    """GPU µs per call of ``fn``: ``reps`` calls captured in one CUDA graph, replayed 5 times."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(5):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return 1e3 * start.elapsed_time(end) / (5 * reps)


def split_products(S: int):
    """dA = gBᵀ x and dB = gᵀ h as S partial products over row blocks, summed in float32."""
    def dA(gB, x):
        M = x.shape[0]
        return torch.bmm(gB.view(S, M // S, -1).transpose(1, 2), x.view(S, M // S, -1)).sum(0, dtype=torch.float32)

    def dB(g, h):
        M = g.shape[0]
        return torch.bmm(g.view(S, M // S, -1).transpose(1, 2), h.view(S, M // S, -1)).sum(0, dtype=torch.float32)
    return dA, dB


def pieces(lk, r: int, reps: int) -> dict:
    dev, dt = torch.device("cuda"), torch.bfloat16
    out = {}
    for name, (M, N, K) in SHAPES.items():
        if M < 64:
            continue
        torch.manual_seed(0)
        x = torch.randn(M, K, device=dev, dtype=dt)
        W = torch.randn(N, K, device=dev, dtype=dt) * K**-0.5
        A = (torch.randn(r, K, device=dev) * 0.01).to(dt)
        B = (torch.randn(N, r, device=dev) * 0.01).to(dt)
        g = torch.randn(M, N, device=dev, dtype=dt)
        y, dx = F.linear(x, W), g @ W
        h, gB = x @ A.t(), g @ B
        calls = {"base_fwd": lambda: F.linear(x, W), "base_dx": lambda: g @ W,
                 "h = x A^T": lambda: x @ A.t(), "y += h B^T": lambda: y.addmm_(h, B.t()),
                 "kernel_d (base + lora)": lambda: lk.forward(x, W, None, A, B, True),
                 "gB = g B": lambda: g @ B, "dx += gB A": lambda: dx.addmm_(gB, A),
                 "dA = gB^T x": lambda: gB.t() @ x, "dB = g^T h": lambda: g.t() @ h}
        for S in (8, 32):
            dA, dB = split_products(S)
            calls[f"dA split {S}"] = lambda dA=dA: dA(gB, x)
            calls[f"dB split {S}"] = lambda dB=dB: dB(g, h)
        rows = {k: graph_us(fn, reps) for k, fn in calls.items()}
        lora = ["h = x A^T", "y += h B^T", "gB = g B", "dx += gB A", "dA = gB^T x", "dB = g^T h"]
        rows["base total"] = rows["base_fwd"] + rows["base_dx"]
        rows["lora total (unfused)"] = sum(rows[k] for k in lora)
        out[name] = {"M": M, "N": N, "K": K, "gpu_us": rows}
        print(f"\n{name}: M={M} N={N} K={K} (GPU µs per call, CUDA graph)")
        for k, v in rows.items():
            print(f"  {k:24s} {v:8.1f}")
    return out


def decode(lk, r: int, reps: int, cold: bool = False) -> dict:
    """``cold``: every call of a graph takes the next of enough copies of (W, A, B) to fill ``COLD_BYTES``, so
    that weights come from HBM as in a model's decoding step, not from the L2 cache a lone small matrix stays in."""
    dev, dt = torch.device("cuda"), torch.bfloat16
    layer = {"q": (2048, 2048), "k": (256, 2048), "v": (256, 2048), "o": (2048, 2048), "gate": (5632, 2048),
             "up": (5632, 2048), "down": (2048, 5632)}
    saved = lk._DECODE, lk._DECODE_WIDE
    out = {}
    try:
        for name, (N, K) in layer.items():
            torch.manual_seed(0)
            x = torch.randn(1, K, device=dev, dtype=dt)
            copies = max(1, -(-COLD_BYTES // (2 * N * K))) if cold else 1
            Ws = [torch.randn(N, K, device=dev, dtype=dt) * K**-0.5 for _ in range(copies)]
            As = [(torch.randn(r, K, device=dev) * 0.01).to(dt) for _ in range(copies)]
            Bs = [(torch.randn(N, r, device=dev) * 0.01).to(dt) for _ in range(copies)]
            turn = [0]

            def nxt():
                turn[0] += 1
                i = turn[0] % copies
                return Ws[i], As[i], Bs[i]

            def base():
                W, _, _ = nxt()
                return F.linear(x, W)

            def pytorch_ops():
                W, A, B = nxt()
                return F.linear(x, W).addmm_(x @ A.t(), B.t())

            def kernel_d():
                W, A, B = nxt()
                return lk.forward(x, W, None, A, B, False)

            rows = {"base": graph_us(base, reps), "pytorch_ops": graph_us(pytorch_ops, reps)}
            for tiles in DECODE_TILES:
                lk._DECODE = lk._DECODE_WIDE = tiles
                lk._FORWARD_PLANS.clear()
                try:
                    rows[str(tiles)] = graph_us(kernel_d, reps)
                except Exception as exc:  # a tile that does not fit is reported, not fatal
                    rows[str(tiles)] = repr(exc)[:120]
            out[name] = rows
    finally:
        lk._DECODE, lk._DECODE_WIDE = saved
        lk._FORWARD_PLANS.clear()
        lk._GROUP_PLANS.clear()
    keys = [k for k in out["q"] if all(isinstance(out[n][k], float) for n in out)]
    out["layer"] = {k: sum(out[n][k] for n in layer) for k in keys}
    out["siblings"] = siblings_decode(lk, r, reps, cold)
    groups = out["siblings"]
    out["layer"]["kernel_d_siblings_grouped"] = (groups["qkv"]["grouped"] + groups["gate_up"]["grouped"]
                                                 + out["o"][str(lk._DECODE)] + out["down"][str(lk._DECODE)])
    for name, rows in out.items():
        print(name, {k: (round(v, 1) if isinstance(v, float) else v) for k, v in rows.items()})
    return out


def siblings_decode(lk, r: int, reps: int, cold: bool) -> dict:
    """One decoding row through the sibling sets of a 1.1B layer (q/k/v: 2048/256/256 × 2048; gate/up: 2 × 5632 ×
    2048), GPU µs: the base GEMVs, Kernel D once per layer (``forward``), and one launch for the set
    (``forward_group``, the path of ``siblings.py``); ``cold`` as in ``decode``."""
    dev, dt = torch.device("cuda"), torch.bfloat16
    out = {}
    for name, Ns in (("qkv", (2048, 256, 256)), ("gate_up", (5632, 5632))):
        K = 2048
        torch.manual_seed(0)
        x = torch.randn(1, K, device=dev, dtype=dt)
        copies = max(1, -(-COLD_BYTES // (2 * sum(Ns) * K))) if cold else 1
        sets = [([torch.randn(N, K, device=dev, dtype=dt) * K**-0.5 for N in Ns],
                 [(torch.randn(r, K, device=dev) * 0.01).to(dt) for _ in Ns],
                 [(torch.randn(N, r, device=dev) * 0.01).to(dt) for N in Ns]) for _ in range(copies)]
        turn = [0]

        def nxt():
            turn[0] += 1
            return sets[turn[0] % copies]

        def base():
            return [F.linear(x, W) for W in nxt()[0]]

        def separate():
            Ws, As, Bs = nxt()
            return [lk.forward(x, W, None, A, B, False)[0] for W, A, B in zip(Ws, As, Bs)]

        def grouped():
            Ws, As, Bs = nxt()
            return lk.forward_group(x, Ws, [None] * len(Ws), As, Bs)

        out[name] = {"base": graph_us(base, reps), "kernel_d_per_layer": graph_us(separate, reps),
                     "grouped": graph_us(grouped, reps)}
        print(name, {k: round(v, 1) for k, v in out[name].items()})
    return out


def launch_breakdown(lk, dev, n: int = 2000) -> dict:
    """Host µs per call for a 16×16 problem: where a Kernel D launch spends its time."""
    import triton

    x, W = torch.randn(16, 16, device=dev), torch.randn(16, 16, device=dev)
    A, B = torch.randn(2, 16, device=dev), torch.randn(16, 2, device=dev)
    y = torch.empty(16, 16, device=dev)
    args = (x, W, W, A, B, y, y, 16, 16, 16, 2, *x.stride(), *W.stride(), *A.stride(), *B.stride(), *y.stride(),
            False, False, "ieee", False, 16, 16, 64, 128, 8)
    compiled = lk._forward_kernel[(1,)](*args, num_warps=4, num_stages=3)
    stream = torch._C._cuda_getCurrentRawStream(0)
    calls = {
        "torch_empty": lambda: torch.empty((16, 16), device=dev),
        "aten_linear": lambda: torch.nn.functional.linear(x, W),
        "pytorch_ops_lora_forward": lambda: torch.nn.functional.linear(x, W).addmm_(x @ A.t(), B.t()),
        "triton_jit_launch": lambda: lk._forward_kernel[(1,)](*args, num_warps=4, num_stages=3),
        "triton_compiled_run": lambda: compiled.run(1, 1, 1, stream, compiled.function, compiled.packed_metadata,
                                                    None, None, None, *args),
        "kernel_d_forward": lambda: lk.forward(x, W, None, A, B, False),
    }
    out = {"triton_version": triton.__version__}
    for name, fn in calls.items():
        out[name] = host_us(fn, n)
    return out


def projection(reps: int) -> dict:
    from unilora_hf.kernels import projection_kernels

    pk = projection_kernels.for_device("cuda")
    narrow = pk.narrow
    out = {}
    for name, size, layers in (("1.1B", "1b", 22), ("7B", "7b", 32)):
        D, d = 16 * common.lora_numel_per_rank(common.llama_config(size, layers)), 2**19
        theta = torch.randn(d, device="cuda")
        g = torch.randn(D, device="cuda", dtype=torch.bfloat16)
        row = {"D": D, "d": d}
        try:
            for label, rule in (("uint32", narrow), ("int64", lambda D: False)):
                pk.narrow = rule
                row[f"readout_us_{label}"] = graph_us(lambda: pk.readout_native(theta, 7, D), reps)
                row[f"grad_us_{label}"] = graph_us(lambda: pk.grad_native(g, 7, D, d), reps)
                row[f"out_{label}"] = (pk.readout_native(theta, 7, D), pk.grad_native(g, 7, D, d))
        finally:
            pk.narrow = narrow
        (a, b), (c, e) = row.pop("out_uint32"), row.pop("out_int64")
        row["bit_identical"] = bool(torch.equal(a, c) and torch.equal(b.view(torch.int32), e.view(torch.int32)))
        print(name, {k: (round(v, 1) if isinstance(v, float) else v) for k, v in row.items()})
        out[name] = row
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--launch-only", action="store_true", help="only the launch-cost breakdown")
    p.add_argument("--pieces", action="store_true", help="only the GPU time of each GEMM piece (CUDA graphs)")
    p.add_argument("--projection", action="store_true", help="only Kernels A and B, uint32 against int64")
    p.add_argument("--decode", action="store_true", help="only M = 1: base, PyTorch ops and Kernel D tiles")
    p.add_argument("--cold", action="store_true", help="with --decode: weights from HBM (cycled copies), not L2")
    a = p.parse_args(argv)
    from unilora_hf.kernels import linear_kernels, lora_linear

    lk = linear_kernels.for_device("cuda")
    dev, dt = torch.device("cuda"), torch.bfloat16
    record = {"benchmark": "linear_kernels", "environment": common.environment(dev), "r": a.r, "shapes": {}}
    if a.decode:
        record["decode" + ("_cold" if a.cold else "")] = decode(lk, a.r, a.reps, a.cold)
        common.write_json(a.out, record)
        return record
    if a.projection:
        record["projection"] = projection(a.reps)
        common.write_json(a.out, record)
        return record
    if a.pieces:
        record["pieces"] = pieces(lk, a.r, a.reps)
        common.write_json(a.out, record)
        return record
    record["launch_us"] = launch_breakdown(lk, dev)
    print("host µs per call:", {k: (round(v, 1) if isinstance(v, float) else v) for k, v in record["launch_us"].items()})
    if a.launch_only:
        common.write_json(a.out, record)
        return record
    defaults = (lk._SMALL, lk._LARGE, lk._DECODE, lk._DECODE_WIDE)
    for name, (M, N, K) in SHAPES.items():
        torch.manual_seed(0)
        x = torch.randn(M, K, device=dev, dtype=dt, requires_grad=True)
        W = torch.randn(N, K, device=dev, dtype=dt) * K**-0.5
        A = (torch.randn(a.r, K, device=dev) * 0.01).to(dt).requires_grad_(True)
        B = (torch.randn(N, a.r, device=dev) * 0.01).to(dt).requires_grad_(True)
        g = torch.randn(M, N, device=dev, dtype=dt)
        rows = {}

        def base_fwd():
            return F.linear(x, W)

        def base_bwd():
            return g @ W

        def ops_fwd():
            y = F.linear(x, W)
            return y.addmm_(x @ A.t(), B.t())

        y_ops = ops_fwd()

        def ops_bwd():
            return torch.autograd.grad(y_ops, (x, A, B), g, retain_graph=True)

        rows["base"] = {"fwd_ms": gpu_ms(base_fwd, a.reps), "bwd_ms": gpu_ms(base_bwd, a.reps),
                        "host_us": host_us(lambda: (base_fwd(), base_bwd()), a.reps)}
        rows["pytorch_ops"] = {"fwd_ms": gpu_ms(ops_fwd, a.reps), "bwd_ms": gpu_ms(ops_bwd, a.reps),
                               "host_us": host_us(lambda: torch.autograd.grad(ops_fwd(), (x, A, B), g), a.reps)}
        want = torch.autograd.grad(y_ops, (x, A, B), g, retain_graph=True)
        for tiles in (SMALL_TILES if M <= 64 else LARGE_TILES):
            if M <= 64:
                lk._SMALL = lk._DECODE = lk._DECODE_WIDE = tiles
            else:
                lk._LARGE = tiles
            lk._FORWARD_PLANS.clear()
            lk._DGRAD_PLANS.clear()
            try:
                y = lora_linear.frozen_linear_lora(x, W, None, A, B)
                got = torch.autograd.grad(y, (x, A, B), g, retain_graph=True)
            except Exception as exc:  # a tile that does not fit (shared memory) is reported, not fatal
                rows[f"fused {tiles}"] = {"error": repr(exc)[:200]}
                continue
            err = max(float((u.float() - v.float()).abs().max() / (v.float().abs().max() + 1e-6))
                      for u, v in zip((y, *got), (y_ops, *want)))
            rows[f"fused {tiles}"] = {
                "fwd_ms": gpu_ms(lambda: lk.forward(x.detach(), W, None, A.detach(), B.detach(), True), a.reps),
                "bwd_ms": gpu_ms(lambda: torch.autograd.grad(y, (x, A, B), g, retain_graph=True), a.reps),
                "host_us": host_us(lambda: torch.autograd.grad(lora_linear.frozen_linear_lora(x, W, None, A, B),
                                                               (x, A, B), g), a.reps),
                "max_rel_err_vs_ops": err,
            }
        lk._SMALL, lk._LARGE, lk._DECODE, lk._DECODE_WIDE = defaults
        lk._FORWARD_PLANS.clear()
        lk._DGRAD_PLANS.clear()
        record["shapes"][name] = {"M": M, "N": N, "K": K, "rows": rows}
        print(f"\n{name}: M={M} N={N} K={K}")
        print("| row | fwd GPU ms | bwd GPU ms | host µs fwd+bwd | rel err |")
        print("|---|---|---|---|---|")
        for key, r in rows.items():
            if "error" in r:
                print(f"| {key} | {r['error']} | | | |")
                continue
            print(f"| {key} | {r['fwd_ms']:.4f} | {r['bwd_ms']:.4f} | {r['host_us']:.1f} | "
                  f"{r.get('max_rel_err_vs_ops', 0):.2e} |")
    common.write_json(a.out, record)
    return record


if __name__ == "__main__":
    main()
