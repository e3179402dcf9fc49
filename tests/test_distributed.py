"""UniLoraTrainer under torchrun: DDP, FSDP2 and FSDP1 (use_orig_params) on two CPU processes with gloo.

One torchrun launch runs every distributed job of tests/dist_worker.py in turn (the launch costs more than
the jobs); the single-process reference runs in this process. Every run sees the same global batch of 4
rows per step (2 per rank, or 4 in the reference), so θ_d after the same steps must agree to float
rounding. The adapters compared are the files each run saved, so saving is checked along the way.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dist_worker import run_job

from unilora_hf import read_adapter

REPO = Path(__file__).resolve().parents[1]
STEPS = 4
ATOL = 1e-6  # θ_d moves by ~1e-2 per step; two ranks only change the order of float32 sums


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script: Path, args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), str(script), *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")

    def job(name, mode, **kw):
        return {"name": name, "root": str(root), "mode": mode, "steps": STEPS, "per_device": 2, **kw}

    jobs = [
        job("ddp", "ddp", save_steps=2),
        job("ddp_ac", "ddp", ac="nonreentrant"),
        job("ddp_reentrant", "ddp", ac="reentrant", expect_error=True),
        job("ddp_reentrant_static", "ddp", ac="reentrant", static_graph=True),
        job("fsdp2", "fsdp2", save_steps=2),
        job("fsdp2_resumed", "fsdp2", resume=str(root / "fsdp2" / "checkpoint-2")),
        job("fsdp2_ac", "fsdp2", ac="nonreentrant"),
        job("fsdp2_fsdp_ac", "fsdp2", ac="fsdp"),
        job("fsdp2_rank1_theta_differs", "fsdp2", rank1_theta_differs=True),
        job("fsdp1", "fsdp1", save_steps=2),
        job("fsdp1_resumed", "fsdp1", resume=str(root / "fsdp1" / "checkpoint-2")),
        job("fsdp2_heads", "fsdp2", heads=True),
        job("fsdp1_heads", "fsdp1", heads=True),
    ]
    (root / "jobs.json").write_text(json.dumps(jobs))
    torchrun(REPO / "tests" / "dist_worker.py", [str(root / "jobs.json")])
    run_job({"name": "single", "root": str(root), "mode": "single", "steps": STEPS, "per_device": 4})
    run_job({"name": "single_heads", "root": str(root), "mode": "single", "steps": STEPS, "per_device": 4,
             "heads": True})
    return root


def theta(root: Path, name: str, folder: str = "final") -> torch.Tensor:
    return read_adapter(root / name / folder).theta_d


@pytest.mark.parametrize("name", ["ddp", "ddp_ac", "ddp_reentrant_static", "fsdp2", "fsdp2_ac", "fsdp2_fsdp_ac",
                                  "fsdp2_rank1_theta_differs", "fsdp1"])
def test_theta_matches_single_process(runs, name):
    assert (theta(runs, name) - theta(runs, "single")).abs().max().item() < ATOL


@pytest.mark.parametrize("name", ["fsdp2_heads", "fsdp1_heads"])
def test_heads_in_modules_to_save_train_as_in_one_process(runs, name):
    single, sharded = read_adapter(runs / "single_heads" / "final"), read_adapter(runs / name / "final")
    assert (sharded.theta_d - single.theta_d).abs().max().item() < ATOL
    assert sorted(sharded.tensors) == sorted(single.tensors) == ["lm_head.weight"]
    head = sharded.tensors["lm_head.weight"]
    assert head.shape == (96, 32)
    assert (head - single.tensors["lm_head.weight"]).abs().max().item() < ATOL
    # The head trained: it left the base model's lm_head, which the adapter file does not hold.
    from models import tiny_llama

    assert (head - tiny_llama().lm_head.weight.detach()).abs().max().item() > 1e-3


def test_runs_trained(runs):
    # θ_d moved between step 2 and step 4 by far more than the tolerance above.
    for name in ("ddp", "fsdp2", "fsdp1"):
        assert (theta(runs, name) - theta(runs, name, "checkpoint-2")).abs().max().item() > 1e-3


def test_reentrant_checkpointing_under_ddp_is_refused_at_construction(runs):
    for rank in (0, 1):
        text = (runs / "ddp_reentrant" / f"error_rank{rank}.txt").read_text()
        assert text.startswith("construction: InvalidConfigError: reentrant activation checkpointing under DDP")
        assert "ddp_static_graph=True" in text and "'use_reentrant': False" in text
    assert not (runs / "ddp_reentrant" / "final").exists()


@pytest.mark.parametrize("name", ["fsdp2", "fsdp1"])
def test_fsdp_saves_the_same_kilobyte_adapter_from_rank_0(runs, name):
    single = runs / "single" / "final"
    for folder in ("checkpoint-2", "checkpoint-4", "final"):
        saved = runs / name / folder
        assert json.loads((saved / "unilora_config.json").read_text()) == json.loads(
            (single / "unilora_config.json").read_text())
        assert (saved / "unilora_model.safetensors").stat().st_size < 2048
    checkpoint = runs / name / "checkpoint-2"
    total = sum(f.stat().st_size for f in checkpoint.rglob("*") if f.is_file())
    assert total < 64 * 1024, sorted(p.name for p in checkpoint.iterdir())
    assert not [p for p in checkpoint.iterdir() if p.name.startswith("pytorch_model_fsdp")]
    written = (runs / name / "writes_rank0.txt").read_text().split()
    assert len(written) == 3 and not (runs / name / "writes_rank1.txt").exists()


@pytest.mark.parametrize("name", ["fsdp2", "fsdp1"])
def test_fsdp_resume_from_checkpoint_is_exact(runs, name):
    resumed = theta(runs, f"{name}_resumed")
    assert torch.equal(resumed, theta(runs, name))
    assert (resumed - theta(runs, "single")).abs().max().item() < ATOL


def test_saving_a_sharded_theta_from_one_rank_is_refused(runs):
    for rank in (0, 1):
        text = (runs / "fsdp2" / f"direct_save_rank{rank}.txt").read_text()
        assert "sharded by FSDP" in text and "gather_adapter_state(model) on every rank" in text
    assert not (runs / "fsdp2" / "direct").exists()


def test_benchmark_runs_tiny_under_ddp_and_fsdp2(tmp_path):
    out = tmp_path / "bench.json"
    torchrun(REPO / "benchmarks" / "multi_gpu.py",
             ["--tiny", "--strategy", "ddp,fsdp2", "--warmup", "1", "--steps", "2", "--out", str(out)])
    results = json.loads(out.read_text())
    assert [r["strategy"] for r in results] == ["ddp", "fsdp2"]
    for r in results:
        assert r["world_size"] == 2 and r["steps"] == 2
        assert r["tokens_per_s_per_gpu"] > 0 and r["step_ms_median"] > 0
        assert r["trainable"] == r["theta_d_length"]
    # Both strategies start from the same seed and see the same batches: the same loss curve.
    assert torch.allclose(torch.tensor(results[0]["losses"]), torch.tensor(results[1]["losses"]), atol=1e-4)


def test_reentrant_checkpointing_is_detected_from_args_and_from_the_model(tmp_path):
    from models import tiny_llama
    from transformers import TrainingArguments

    from unilora_hf.trainer import _uses_reentrant_checkpointing

    def uses(model=None, **kw):
        args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], **kw)
        return _uses_reentrant_checkpointing(model if model is not None else tiny_llama(), args)

    assert not uses()
    assert not uses(activation_checkpointing=True)  # transformers' default is non-reentrant
    assert not uses(activation_checkpointing=True, activation_checkpointing_kwargs={"every_n_layers": 2})
    assert uses(activation_checkpointing=True, activation_checkpointing_kwargs={"use_reentrant": True})
    # kwargs without use_reentrant go to torch.utils.checkpoint, which then runs reentrant
    assert uses(activation_checkpointing=True, activation_checkpointing_kwargs={"preserve_rng_state": False})
    model = tiny_llama()
    model.gradient_checkpointing_enable()
    assert not uses(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    assert uses(model)
