"""Training throughput of a Uni-LoRA adapter on a Llama-shaped model under DDP or FSDP2, on one or more GPUs.

    torchrun --nproc-per-node 2 benchmarks/multi_gpu.py --strategy fsdp2
    torchrun --nproc-per-node 2 benchmarks/multi_gpu.py --strategy ddp,fsdp2 --out results.json
    torchrun --nproc-per-node 1 benchmarks/multi_gpu.py --strategy ddp
    torchrun --nproc-per-node 2 benchmarks/multi_gpu.py --tiny --strategy ddp,fsdp2   # CPU + gloo smoke run

The default shape is DESIGN.md section 6's: Llama with random weights, hidden 2048, 22 layers, 32 heads,
4 KV heads, MLP 5632, bf16, batch 4 x 1024 tokens per GPU, all 7 projections adapted, r = 16, d = 2^19,
AdamW on θ_d. Each rank draws its own random tokens (seeded by step and rank, so every strategy sees the same
batches). After ``--warmup`` steps, ``--steps`` steps are timed one by one (synchronised); rank 0 prints, per
strategy, tokens/s per GPU (batch x seq / median step), the median step and the peak memory (GPU: the
largest of the ranks' ``max_memory_allocated``; CPU: not measured).

FSDP2 wraps the model the way accelerate does for ``fsdp_version: 2``: one unit per decoder layer, the input
embedding, the final norm with lm_head (not resharded after forward), then the root, which holds θ_d. No
mixed-precision policy: the base weights are bf16 and θ_d stays float32, gathered and reduced in float32.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from unilora_hf import UniLoraConfig, get_adapter, inject_adapter  # noqa: E402

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TINY = dict(hidden=64, layers=2, heads=4, kv_heads=2, mlp=128, vocab=128, seq=32, batch=2, r=4, d=4096,
            dtype="float32")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--strategy", default="fsdp2", help="ddp, fsdp2, or both comma-separated (run in turn)")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--layers", type=int, default=22)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--mlp", type=int, default=5632)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--batch", type=int, default=4, help="sequences per GPU per step")
    # Not --r / --d: torchrun would take those for abbreviations of its own --rdzv-* options.
    p.add_argument("--lora-r", dest="r", type=int, default=16, help="rank r of the LoRA matrices")
    p.add_argument("--theta-d", dest="d", type=int, default=2**19, help="θ_d length")
    p.add_argument("--projection", default="native", choices=["native", "peft"])
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--activation-checkpointing", action="store_true", help="non-reentrant, per decoder layer")
    p.add_argument("--tiny", action="store_true", help="a tiny float32 model on CPU with gloo (smoke test)")
    p.add_argument("--out", help="rank 0 writes the results (JSON: a list, one entry per strategy) here")
    args = p.parse_args(argv)
    if args.tiny:
        for key, value in TINY.items():
            setattr(args, key, value)
    args.strategies = [s.strip() for s in args.strategy.split(",") if s.strip()]
    bad = [s for s in args.strategies if s not in ("ddp", "fsdp2")]
    if bad or not args.strategies:
        p.error(f"--strategy takes ddp and/or fsdp2, got {args.strategy!r}")
    return args


def setup(tiny: bool) -> torch.device:
    use_cuda = torch.cuda.is_available() and not tiny
    if "RANK" not in os.environ:  # plain `python benchmarks/multi_gpu.py`: one process
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29533")
    local_rank = int(os.environ["LOCAL_RANK"])
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if use_cuda else "gloo")
    return torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")


def build_model(args, device: torch.device):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.mlp, num_hidden_layers=args.layers,
                      num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, vocab_size=args.vocab,
                      max_position_embeddings=max(args.seq, 64), use_cache=False)
    torch.manual_seed(0)  # the same random weights and θ_d on every rank
    dtype = getattr(torch, args.dtype)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(default)
    inject_adapter(model, UniLoraConfig(r=args.r, theta_d_length=args.d, target_modules=PROJECTIONS,
                                        projection=args.projection))
    if args.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def wrap(model, strategy: str, device: torch.device):
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model.model.embed_tokens)
    fully_shard([model.model.norm, model.lm_head], reshard_after_forward=False)
    fully_shard(model)
    return model


def batch(args, step: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * step + dist.get_rank())
    return torch.randint(0, args.vocab, (args.batch, args.seq), generator=g).to(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(args, strategy: str, device: torch.device) -> dict:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    model = build_model(args, device)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    wrapped = wrap(model, strategy, device)
    theta = get_adapter(wrapped).theta_d
    optimizer = torch.optim.AdamW([theta], lr=args.lr, weight_decay=0.0)
    times, losses = [], []
    for step in range(args.warmup + args.steps):
        ids = batch(args, step, device)
        sync(device)
        t0 = time.perf_counter()
        loss = wrapped(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
        mean_loss = loss.detach().float().clone()
        dist.all_reduce(mean_loss)
        losses.append(mean_loss.item() / dist.get_world_size())
    peak = None
    if device.type == "cuda":
        peak_t = torch.tensor(float(torch.cuda.max_memory_allocated(device)), device=device)
        dist.all_reduce(peak_t, op=dist.ReduceOp.MAX)
        peak = peak_t.item() / 2**30
    step_s = statistics.median(times)
    del wrapped, model, optimizer, theta
    return {
        "strategy": strategy, "world_size": dist.get_world_size(), "device": str(device.type),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "shape": {k: getattr(args, k) for k in ("hidden", "layers", "heads", "kv_heads", "mlp", "vocab")},
        "batch": args.batch, "seq": args.seq, "dtype": args.dtype, "r": args.r, "theta_d_length": args.d,
        "projection": args.projection, "activation_checkpointing": args.activation_checkpointing,
        "trainable": trainable, "warmup": args.warmup, "steps": args.steps,
        "step_ms_median": 1000 * step_s, "step_ms_all": [1000 * t for t in times],
        "tokens_per_s_per_gpu": args.batch * args.seq / step_s, "peak_gib": peak, "losses": losses,
    }


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    device = setup(args.tiny)
    results = []
    try:
        for strategy in args.strategies:
            result = run(args, strategy, device)
            results.append(result)
            if dist.get_rank() == 0:
                peak = f"{result['peak_gib']:.2f} GiB" if result["peak_gib"] is not None else "n/a (CPU)"
                print(f"{strategy} x{result['world_size']} ({result['device']}): "
                      f"{result['tokens_per_s_per_gpu']:,.0f} tokens/s per GPU, "
                      f"step median {result['step_ms_median']:.1f} ms, peak {peak}, "
                      f"loss {result['losses'][0]:.4f} -> {result['losses'][-1]:.4f}", flush=True)
        if dist.get_rank() == 0 and args.out:
            Path(args.out).write_text(json.dumps(results, indent=2))
    finally:
        dist.destroy_process_group()
    return results


if __name__ == "__main__":
    main()
