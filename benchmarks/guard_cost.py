"""What ``torch.compile``'s guards cost per call: the host work before each compiled decoding step.

Every Python object and attribute a traced forward reads becomes a guard that Dynamo evaluates at every call of
the compiled model, before the graph (or its CUDA graph) runs. For a tiny Llama of ``--layers`` (22) decoder
layers (hidden 64; all 7 projections adapted, r = 4), compiled static-cache ``generate`` (``backend="eager"``: the
guards are Inductor's too, without its compile time), rows ``base``, ``unilora_hf`` (unmerged, sibling layers
grouped), ``unilora_hf_ungrouped`` and ``unilora_hf_merged`` (``merge()``), each frame Dynamo compiles is reported
with:

- ``guard_lines``: lines of its guard tree as Dynamo prints it (one per guard manager and per check);
- ``cold_us``: Dynamo's own guard profiler (``profile_guard_manager``, caches flushed), best of ``--repeats`` (20);
- ``warm_us``: median of 7 loops of 100 ``RootGuardManager.check`` calls.

The model's frame is the larger one; an unmerged adapter adds a small frame for the root's pre-hook (a merged one
takes its hooks off).

    python benchmarks/guard_cost.py --out /tmp/guard_cost.json        # CPU, ~2 min
"""

from __future__ import annotations

import argparse
import statistics
import time

import common
import torch
import torch._dynamo.guards as dynamo_guards
from transformers import LlamaConfig
from transformers.generation import CompileConfig

ROWS = ("base", "unilora_hf", "unilora_hf_ungrouped", "unilora_hf_merged")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="where to write the JSON record")
    p.add_argument("--layers", type=int, default=22, help="decoder layers (default 22, the 1.1B shape's count)")
    p.add_argument("--repeats", type=int, default=20, help="cold measurements per frame, the best kept")
    return p.parse_args(argv)


def build(row: str, layers: int):
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=layers, vocab_size=256, max_position_embeddings=512, tie_word_embeddings=False)
    model = common.build_llama(cfg, torch.device("cpu"), torch.float32, seed=0).eval()
    model.generation_config.eos_token_id = None
    if row != "base":
        from unilora_hf import UniLoraConfig, get_adapter, inject_adapter

        inject_adapter(model, UniLoraConfig(r=4, theta_d_length=512, target_modules=common.LLAMA_TARGETS))
        get_adapter(model)._group_siblings(row == "unilora_hf")
        if row == "unilora_hf_merged":
            get_adapter(model).merge()
    return model


def measure(row: str, args) -> list[dict]:
    """Compile ``row``'s decoding step and return one record per compiled frame."""
    frames = []
    profile = dynamo_guards.profile_guard_manager

    def timed(root, scope, n_iters):  # Dynamo calls this once per compiled frame, right after building its guards
        cold = min(profile(root, scope, 1) for _ in range(args.repeats))
        loops = []
        for _ in range(7):
            t0 = time.perf_counter()
            for _ in range(100):
                root.check(scope)
            loops.append((time.perf_counter() - t0) * 1e4)  # µs per check
        frames.append({"cold_us": cold, "warm_us": statistics.median(loops)})
        return cold

    torch._dynamo.reset()
    model = build(row, args.layers)
    prompt = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(0))
    config = CompileConfig(fullgraph=False, mode="default", backend="eager")
    config._compile_all_devices = True  # transformers compiles the decoding step on CUDA only by default
    lines = []
    log = dynamo_guards.guards_log
    handler = _Lines(lines)
    log.addHandler(handler)
    level, propagate = log.level, log.propagate
    log.level, log.propagate = 10, False  # counted here, not printed
    dynamo_guards.profile_guard_manager = timed
    try:
        with torch.no_grad():
            model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False, pad_token_id=0,
                           cache_implementation="static", compile_config=config, max_new_tokens=3, min_new_tokens=3)
    finally:
        dynamo_guards.profile_guard_manager = profile
        log.removeHandler(handler)
        log.level, log.propagate = level, propagate
    for frame, n in zip(frames, lines):
        frame["guard_lines"] = n
    return frames


class _Lines:
    """A logging handler that keeps the line count of each printed guard tree."""

    level = 0

    def __init__(self, counts: list[int]):
        self.counts = counts

    def handle(self, record) -> None:
        text = record.getMessage()
        if "TREE_GUARD_MANAGER" in text:
            self.counts.append(len(text.splitlines()))


def main(argv=None) -> dict:
    args = parse_args(argv)
    record = {"benchmark": "guard_cost", "environment": common.environment(torch.device("cpu")),
              "settings": {"layers": args.layers, "repeats": args.repeats}, "rows": {}}
    for row in ROWS:
        record["rows"][row] = measure(row, args)
        print(row, record["rows"][row], flush=True)
    table = [[row, " / ".join(f"{f['guard_lines']}" for f in frames), " / ".join(f"{f['cold_us']:.0f}" for f in frames),
              " / ".join(f"{f['warm_us']:.0f}" for f in frames)] for row, frames in record["rows"].items()]
    print(common.markdown_table(["row", "guard lines per frame", "cold µs", "warm µs"], table))
    common.write_json(args.out, record)
    return record


if __name__ == "__main__":
    main()
