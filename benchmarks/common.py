"""Shared pieces of the GPU benchmark scripts: model shapes, timing, memory accounting, tables, JSON.

The scripts run as ``python benchmarks/<name>.py`` from the repository root; importing this module puts
the repository root first on ``sys.path`` so the checkout's ``unilora_hf`` is the one measured (not an
installed copy). Every measurement is taken on one device: CUDA timings synchronise before and after the
timed region and use ``time.perf_counter`` (so CPU launch overhead counts, as it does for a user); CUDA
memory figures come from ``torch.cuda.memory_allocated`` / ``max_memory_allocated`` and are ``None`` on CPU.
"""

from __future__ import annotations

import argparse

import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

# The 7 linear projections of a Llama decoder layer.
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# Llama shapes. "1b" is the reference workload (TinyLlama-1.1B shape); "7b" is Llama-2-7B's
# layer shape with fewer layers so a run fits in minutes; "tiny" runs on CPU in seconds (tests).
SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000),
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=4, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000),
}

MIB = 2**20
GIB = 2**30


def llama_config(size: str, layers: int | None = None):
    """A ``LlamaConfig`` of one of `SHAPES`, optionally with another layer count."""
    from transformers import LlamaConfig

    if size not in SHAPES:
        raise ValueError(f"unknown model size {size!r}; use one of {sorted(SHAPES)}")
    shape = dict(SHAPES[size])
    if layers is not None:
        if layers <= 0:
            raise ValueError(f"--layers must be positive, got {layers}")
        shape["num_hidden_layers"] = layers
    return LlamaConfig(max_position_embeddings=4096, tie_word_embeddings=False, **shape)


def lora_numel_per_rank(cfg) -> int:
    """Σ over the 7 adapted projections of all layers of (in + out): D = r · this (LoRA A is r×in, B out×r)."""
    h, m = cfg.hidden_size, cfg.intermediate_size
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    per_layer = (h + h) + (h + kv) + (h + kv) + (h + h) + 3 * (h + m)
    return per_layer * cfg.num_hidden_layers


def build_llama(cfg, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """A ``LlamaForCausalLM`` with random weights, created directly on ``device`` in ``dtype``; the same
    ``seed`` gives the same weights on one device."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(previous)
    return model


def random_tokens(vocab: int, batch: int, length: int, device: torch.device, seed: int = 1234) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=g).to(device)


# -- devices, time and memory -----------------------------------------------------------------------
def pick_device(name: str | None) -> torch.device:
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for but torch sees no GPU; use --device cpu (with --tiny)")
    return device


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """Seconds taken by ``fn()`` with the device synchronised on both sides, and its result."""
    sync(device)
    t0 = time.perf_counter()
    result = fn()
    sync(device)
    return time.perf_counter() - t0, result


def free(device: torch.device) -> None:
    """Collect garbage (adapters hold reference cycles) and return cached CUDA blocks."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def allocated(device: torch.device) -> int | None:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else None


def peak(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def to_gib(n: int | None) -> float | None:
    return None if n is None else n / GIB


def to_mib(n: int | None) -> float | None:
    return None if n is None else n / MIB


def summary_ms(seconds: list[float]) -> dict[str, float]:
    ms = [s * 1e3 for s in seconds]
    return {"median_ms": statistics.median(ms), "min_ms": min(ms), "all_ms": ms}


# -- what an adapter keeps besides its parameters ---------------------------------------------------------
def _tensors_in(obj: Any) -> Iterable[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors_in(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors_in(v)


def _nbytes(tensors: Iterable[torch.Tensor], seen: set[int]) -> tuple[int, int]:
    """(device bytes, host bytes) of the distinct tensors (by storage) not already in ``seen``."""
    dev = host = 0
    for t in tensors:
        if t.device.type == "meta":
            continue
        key = t.untyped_storage().data_ptr()
        if key in seen or t.untyped_storage().nbytes() == 0:
            continue
        seen.add(key)
        if t.device.type == "cpu":
            host += t.untyped_storage().nbytes()
        else:
            dev += t.untyped_storage().nbytes()
    return dev, host


def storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors``."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def tensor_ids(model: torch.nn.Module) -> set[int]:
    """Storage pointers of every parameter and buffer of ``model`` (taken before an adapter is attached)."""
    return {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}


def adapter_state_bytes(model: torch.nn.Module, base_ids: set[int]) -> dict[str, int]:
    """Bytes an attached adapter keeps besides its trainable parameters.

    ``buffers``: buffers registered on the model that the base did not have (PEFT UniLoRA: its index and
    scale buffers). ``cache``: tensors held in attributes of adapter modules (neither parameters nor
    buffers) and in the unilora_hf projection's ``_device_cache``, on the device. ``host``: the same kinds
    kept in CPU memory while the model is on another device (e.g. the ``peft`` projection's int32 table).
    On a CPU model everything counts as ``buffers``/``cache`` of the device.
    """
    seen = set(base_ids) | {p.untyped_storage().data_ptr() for p in model.parameters()}
    device_of_model = next(model.parameters()).device
    buf_dev, buf_host = _nbytes(model.buffers(), seen)
    cached: list[torch.Tensor] = []
    for module in model.modules():
        mod = type(module).__module__
        if not (mod.startswith("unilora_hf") or mod.startswith("peft.")):
            continue
        for name, value in vars(module).items():
            if name in ("_parameters", "_buffers", "_modules"):
                continue
            cached.extend(_tensors_in(value))
    adapter = model.__dict__.get("unilora_adapter")
    if adapter is None:
        inner = getattr(getattr(model, "base_model", None), "model", None)
        adapter = inner.__dict__.get("unilora_adapter") if isinstance(inner, torch.nn.Module) else None
    if adapter is not None:
        projection = adapter.projection
        cached.extend(_tensors_in(projection._device_cache))
        cached.extend(t for t in (projection._peft_table, projection._peft_scales) if t is not None)
    cache_dev, cache_host = _nbytes(cached, seen)
    if device_of_model.type == "cpu":
        return {"buffers": buf_dev + buf_host, "cache": cache_dev + cache_host, "host": 0}
    return {"buffers": buf_dev, "cache": cache_dev, "host": buf_host + cache_host}


def param_sample(params: list[torch.nn.Parameter], n: int = 1024) -> list[torch.Tensor]:
    """A small copy of each parameter (its first ``n`` values) to tell later whether training moved it."""
    return [p.detach().flatten()[:n].float().clone() for p in params]


def moved(params: list[torch.nn.Parameter], before: list[torch.Tensor], n: int = 1024) -> bool:
    return any(not torch.equal(p.detach().flatten()[:n].float(), b) for p, b in zip(params, before))


# -- running rows, tables and the JSON record ------------------------------------------------------
def kernels_by_name(prof) -> dict[str, list]:
    """From a finished ``torch.profiler.profile``: CUDA kernel name (first 90 characters) -> [calls, GPU ms]."""
    by_name: dict[str, list] = {}
    for e in prof.events():
        if e.device_type.name == "CUDA":
            entry = by_name.setdefault(e.name[:90], [0, 0.0])
            entry[0] += 1
            entry[1] += e.device_time / 1e3
    return by_name


def run_row(key: str, fn: Callable[[], dict], device: torch.device) -> dict:
    """Run one benchmark row; an exception is recorded (and printed) instead of ending the whole run."""
    print(f"[{time.strftime('%H:%M:%S')}] {key} ...", flush=True)
    try:
        result = fn()
    except Exception as exc:  # one broken row must not cost the other rows of a one-shot GPU run
        traceback.print_exc()
        result = {"error": f"{type(exc).__name__}: {exc}"}
    free(device)
    return result


def fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if value == 0 or 1 <= abs(value) < 1e7:
            return f"{value:,.{digits}f}"
        return f"{value:.3g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _backend(resolve_backend, device: torch.device) -> str:
    try:
        return resolve_backend(device)
    except Exception as exc:  # a broken kernel import must not stop the PEFT rows from being measured
        return f"unavailable ({type(exc).__name__}: {exc})"


def environment(device: torch.device) -> dict[str, Any]:
    """Versions, the device and the kernel backend unilora_hf picks for it."""
    import transformers

    import unilora_hf
    from unilora_hf.kernels import resolve_backend

    env: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "unilora_hf": unilora_hf.__version__,
        "unilora_hf_path": str(Path(unilora_hf.__file__).resolve().parent),
        "git_commit": _git_commit(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "unilora_kernel_backend": _backend(resolve_backend, device),
        "kernels_env": os.environ.get("UNILORA_HF_KERNELS"),
    }
    for name in ("peft", "triton", "accelerate"):
        try:
            env[name] = __import__(name).__version__
        except ImportError:
            env[name] = None
    return env


def write_json(path: str | os.PathLike, record: dict) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2, default=str) + "\n")
    print(f"wrote {out}")


@contextmanager
def stopwatch(record: dict, key: str):
    t0 = time.perf_counter()
    try:
        yield
    finally:
        record[key] = time.perf_counter() - t0


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def base_parser(doc: str, tiny_help: str) -> argparse.ArgumentParser:
    """The options every single-GPU benchmark takes: --out, --size, --tiny, --device, --dtype."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="where to write the JSON record")
    p.add_argument("--size", choices=["1b", "7b"], default="1b")
    p.add_argument("--tiny", action="store_true", help=tiny_help)
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help="default bf16 (tiny: fp32)")
    return p


def print_footer(headers: list[str], table: list[list], record: dict) -> None:
    """Print a results table, the met/MISSED line of the project targets, and the total time."""
    print(markdown_table(headers, table))
    if record["targets"]:
        print("\nProject targets: " + "; ".join(f"{k}: {'met' if v else 'MISSED'}" for k, v in record["targets"].items()))
    print(f"\ntotal {record['total_s']:.1f} s")
