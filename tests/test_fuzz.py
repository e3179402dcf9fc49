"""A seeded, bounded fuzzer over adapter folders: every outcome is "identical output" or a refusal of this
library's hierarchy, and a refused load changes nothing of the model.

Templates: adapters saved here in both formats (native and PEFT's) from a tiny BERT classifier with a
trained head and trained biases. Each case copies one, applies one mutation (a flipped bit anywhere in either
file, truncation or extension, a JSON field replaced by a hostile value of another type, deleted or added,
safetensors header entries retyped, reshaped or moved, a file replaced by a FIFO, a link out of the folder, a
folder or nothing, a second adapter beside it), then loads it onto a fresh base with a 5 s alarm and sorts
the outcome: identical / refused:<class> / different / model-changed / foreign:<class> / hang. Only the first
two are allowed. ``UNILORA_HF_FUZZ=N`` runs N cases instead of CI's 300; ``UNILORA_HF_FUZZ_OUT=file.json``
writes the counts. (Adapters written by PEFT itself carry no checksum, so a flipped byte of their θ_d cannot be
detected; they are not templates here.)
"""

import json
import os
import random
import shutil
import signal
from collections import Counter

import pytest
import torch
from models import tiny_bert, tokens

from unilora_hf import UniLoraConfig, UniLoraError, inject_adapter, load_adapter

CASES = int(os.environ.get("UNILORA_HF_FUZZ", "300"))
HOSTILE = [
    None, True, False, 0, -1, 1, 3, 2**31, 2**70, -(2**63), 1.5, 1e308, "", "x", "q_proj", "all-linear", "ALL-LINEAR",
    "(.|..|...)*\\d\\d\\d\\d$", "0-999999999999", "sha256:" + "0" * 64, "a" * 5000, [], [None], ["query"], [1, 2],
    ["classifier"], {}, {"trust_remote_code": True}, {"num_labels": 7}, {"a": {"b": {"c": []}}},
    [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]],
    "AutoModelForCausalLM", "peft-0.21", "native-feistel-v1", "SEQ_CLS", "CAUSAL_LM", "none", "all", "unilora_only",
]


class Hang(Exception):
    pass


def _alarm(signum, frame):
    raise Hang()


def _paths(obj, prefix=()):
    """Every (path, value) inside a JSON value."""
    yield prefix, obj
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


def _set(obj, path, value):
    for p in path[:-1]:
        obj = obj[p]
    if value is _DELETE:
        del obj[path[-1]]
    else:
        obj[path[-1]] = value


_DELETE = object()


def mutate_json(data: bytes, rng: random.Random) -> bytes:
    doc = json.loads(data)
    paths = [p for p, _ in _paths(doc) if p]
    path = rng.choice(paths)
    action = rng.random()
    if action < 0.15 and isinstance(path[-1], str):
        _set(doc, path, _DELETE)
    elif action < 0.25:
        parent = doc
        for p in path[:-1]:
            parent = parent[p]
        if isinstance(parent, dict):
            parent[rng.choice(["alpha", "trust_remote_code", "auto_map", "exclude_modules", "config"])] = rng.choice(HOSTILE)
        else:
            _set(doc, path, rng.choice(HOSTILE))
    else:
        _set(doc, path, rng.choice(HOSTILE))
    return json.dumps(doc).encode()


def mutate_header(data: bytes, rng: random.Random) -> bytes:
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    names = [k for k in header if k != "__metadata__"]
    name = rng.choice(names)
    action = rng.randrange(6)
    if action == 0:
        header[name]["dtype"] = rng.choice(["F16", "BF16", "I32", "F64", "U8", "BOOL", "F8_E4M3", "XX"])
    elif action == 1:
        header[name]["shape"] = rng.choice([[], [0], [1, 2], [10**12], [-1], list(reversed(header[name]["shape"]))])
    elif action == 2:
        b, e = header[name]["data_offsets"]
        header[name]["data_offsets"] = rng.choice([[b + 4, e + 4], [b, e - 4], [0, e - b], [e, b], [b, 10**15]])
    elif action == 3:
        meta = header.setdefault("__metadata__", {})
        key = rng.choice(list(meta) or ["x"])
        meta[key] = rng.choice(["", "sha256:" + "0" * 64, "1", "{}", meta.get(key, "")[:-1] + "0"])
    elif action == 4:
        header[name + "_twin"] = header[name]
    else:
        header.pop(name)
    body = json.dumps(header).encode()
    return len(body).to_bytes(8, "little") + body + data[8 + n :]


def mutate(folder, rng: random.Random, outside) -> str:
    files = sorted(p for p in folder.iterdir())
    target = rng.choice(files)
    data = target.read_bytes()
    kind = rng.choices(["bit", "truncate", "extend", "json", "header", "special", "second", "delete"],
                       weights=[30, 6, 4, 30, 18, 6, 3, 3])[0]
    if kind == "bit":
        buf = bytearray(data)
        i = rng.randrange(len(buf))
        buf[i] ^= 1 << rng.randrange(8)
        target.write_bytes(bytes(buf))
    elif kind == "truncate":
        target.write_bytes(data[: rng.randrange(len(data))])
    elif kind == "extend":
        target.write_bytes(data + bytes(rng.randrange(256) for _ in range(rng.randint(1, 64))))
    elif kind == "json":
        config = next(p for p in files if p.suffix == ".json")
        config.write_bytes(mutate_json(config.read_bytes(), rng))
    elif kind == "header":
        weights = next(p for p in files if p.suffix == ".safetensors")
        weights.write_bytes(mutate_header(weights.read_bytes(), rng))
    elif kind == "special":
        target.unlink()
        choice = rng.randrange(4)
        if choice == 0:
            os.mkfifo(target)
        elif choice == 1:
            os.symlink(outside / target.name, target)
        elif choice == 2:
            target.mkdir()
        else:
            os.symlink("/dev/zero", target)
    elif kind == "second":
        other = outside / "other_format"
        for p in other.iterdir():
            shutil.copy(p, folder / p.name)
    else:
        target.unlink()
    return kind


def snapshot(model):
    return ({k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
            {n: p.requires_grad for n, p in model.named_parameters()},
            {n: id(m) for n, m in model.named_modules()})


def unchanged(model, before) -> bool:
    tensors, grads, modules = snapshot(model)
    return (grads == before[1] and modules == before[2] and tensors.keys() == before[0].keys()
            and all(torch.equal(tensors[k], v) for k, v in before[0].items()))


@pytest.fixture(scope="module")
def templates(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    out = {}
    for projection in ("native", "peft"):
        model = tiny_bert()
        adapter = inject_adapter(model, UniLoraConfig(r=2, theta_d_length=60, projection=projection,
                                                      target_modules=["query", "value"], modules_to_save=["classifier"],
                                                      bias="unilora_only"))
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            adapter.theta_d.normal_(generator=g)
            for p in adapter.trainable_state().values():
                p.add_(torch.randn(p.shape, generator=g))
        adapter.save_adapter(root / projection)
        with torch.no_grad():
            out[projection] = model(input_ids=tokens(model)).logits
    outside = root / "outside"
    outside.mkdir()
    for name in ("unilora_config.json", "unilora_model.safetensors", "adapter_config.json",
                 "adapter_model.safetensors"):
        (outside / name).write_bytes((root / ("native" if name.startswith("unilora") else "peft") / name).read_bytes())
    shutil.copytree(root / "peft", outside / "other_format")
    return root, out


def test_fuzzed_adapter_folders_load_identically_or_are_refused_and_change_nothing(templates, tmp_path):
    root, expected = templates
    rng = random.Random(20261125)
    counts: Counter = Counter()
    kinds: Counter = Counter()
    bad = []
    previous = signal.signal(signal.SIGALRM, _alarm)
    try:
        for case in range(CASES):
            projection = rng.choice(["native", "peft"])
            folder = tmp_path / f"case{case}"
            shutil.copytree(root / projection, folder)
            kind = mutate(folder, rng, root / "outside")
            kinds[kind] += 1
            model = tiny_bert()
            before = snapshot(model)
            signal.setitimer(signal.ITIMER_REAL, 5.0)
            try:
                load_adapter(model, folder)
                with torch.no_grad():
                    logits = model(input_ids=tokens(model)).logits
                outcome = "identical" if torch.equal(logits, expected[projection]) else "different"
            except Hang:
                outcome = "hang"
            except UniLoraError as exc:
                net = "(safety net)" if "are malformed (" in str(exc) else ""
                outcome = f"refused:{type(exc).__name__}{net}" if unchanged(model, before) else "model-changed"
            except Exception as exc:  # noqa: BLE001 — counted, and failed below
                outcome = f"foreign:{type(exc).__name__}:{exc}"[:200]
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            counts[outcome.split(":")[0] + (":" + outcome.split(":")[1] if ":" in outcome else "")] += 1
            if not (outcome == "identical" or outcome.startswith("refused:")):
                bad.append((case, projection, kind, outcome))
            shutil.rmtree(folder, ignore_errors=True)
    finally:
        signal.signal(signal.SIGALRM, previous)
    report = {"cases": CASES, "outcomes": dict(sorted(counts.items())), "mutations": dict(sorted(kinds.items()))}
    if os.environ.get("UNILORA_HF_FUZZ_OUT"):
        with open(os.environ["UNILORA_HF_FUZZ_OUT"], "w") as f:
            json.dump(report, f, indent=2)
    print(json.dumps(report))
    assert not bad, bad[:10]
    assert counts["identical"] > 0 and sum(v for k, v in counts.items() if k.startswith("refused")) > CASES // 2
