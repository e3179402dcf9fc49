"""The GPU benchmark scripts, run in their ``--tiny`` CPU mode: each must finish, print its markdown
table and write a JSON record whose numbers are consistent with the model and adapters it measured.

All three scripts run in ONE subprocess (each through ``runpy`` with its own ``sys.argv``, as
``python benchmarks/<name>.py`` runs it), so torch/transformers/peft are imported once.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"

# tiny Llama of benchmarks/common.py: hidden 64, MLP 128, 4 heads of 16, 2 KV heads (k/v width 32), 2 layers.
TINY_IN_OUT_PER_LAYER = (64 + 64) + (64 + 32) + (64 + 32) + (64 + 64) + 3 * (64 + 128)
TINY_LAYERS = 2

DRIVER = """
import runpy, sys
sys.path.insert(0, {bench!r})
for argv in {runs!r}:
    print("=== running", argv[0], flush=True)
    sys.argv = argv
    runpy.run_path(argv[0], run_name="__main__")
"""


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    runs = [
        [str(BENCH / "train_step.py"), "--tiny", "--out", str(out / "train.json"), "--profile", "peft_unilora",
         "--profile-steps", "1"],
        [str(BENCH / "load.py"), "--tiny", "--out", str(out / "load.json"), "--peft-max-d", "4096"],
        [str(BENCH / "inference.py"), "--tiny", "--out", str(out / "inference.json")],
        [str(BENCH / "multi_adapter.py"), "--tiny", "--out", str(out / "multi.json")],
        [str(BENCH / "inference.py"), "--tiny", "--compile", "--rounds", "2", "--out", str(out / "static.json")],
        [str(BENCH / "guard_cost.py"), "--layers", "2", "--repeats", "2", "--out", str(out / "guards.json")],
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    env.pop("UNILORA_HF_KERNELS", None)
    proc = subprocess.run([sys.executable, "-c", DRIVER.format(bench=str(BENCH), runs=runs)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    names = ("train", "load", "inference", "multi", "static", "guards")
    return {name: json.loads((out / f"{name}.json").read_text()) for name in names} | {"stdout": proc.stdout}


def _train_step():
    """benchmarks/train_step.py as a module (the benchmarks folder on sys.path only while it is imported)."""
    sys.path.insert(0, str(BENCH))
    try:
        import train_step
    finally:
        sys.path.remove(str(BENCH))
    return train_step


def _no_errors(rows: dict) -> None:
    errors = {k: v["error"] for k, v in rows.items() if "error" in v}
    assert not errors, errors


def test_scripts_measure_this_checkout_on_cpu(results):
    for name in ("train", "load", "inference", "multi"):
        env = results[name]["environment"]
        assert Path(env["unilora_hf_path"]) == REPO / "unilora_hf"
        assert env["device"] == "cpu" and env["unilora_kernel_backend"] == "reference"
    out = results["stdout"]
    assert "| run | step ms (median) | step ms (min) | peak GiB |" in out
    assert "| D | r | run | attach s |" in out
    assert "| run | prefill ms (median) | prefill ms (min) | decode tokens/s |" in out


def test_train_step_record(results):
    rec = results["train"]
    rows, s = rec["rows"], rec["settings"]
    _no_errors(rows)
    assert list(rows) == ["floor", "peft_lora", "peft_unilora", "unilora_hf", "unilora_hf_peft"]
    D = s["r"] * TINY_IN_OUT_PER_LAYER * TINY_LAYERS
    assert s["D"] == D == 8192
    # PEFT LoRA trains exactly the D LoRA entries; both Uni-LoRAs train exactly d; the floor trains nothing.
    assert rows["peft_lora"]["trainable"] == D
    assert rows["peft_unilora"]["trainable"] == rows["unilora_hf"]["trainable"] == s["d"]
    assert rows["floor"]["trainable"] == 0 and rows["floor"]["params_moved"] is None
    for key, row in rows.items():
        assert len(row["all_ms"]) == s["steps"]
        assert min(row["all_ms"]) == row["min_ms"] <= row["median_ms"] <= max(row["all_ms"])
        assert math.isfinite(row["loss_first"]) and math.isfinite(row["loss_last"])
        # random tokens over a 256-token vocabulary: the loss of a barely trained model is near ln 256
        assert abs(row["loss_first"] - math.log(s["vocab"])) < 1.0
        assert row["step_vs_floor"] == pytest.approx(row["median_ms"] / rows["floor"]["median_ms"])
        assert row["step_vs_peft_lora"] == pytest.approx(row["median_ms"] / rows["peft_lora"]["median_ms"])
        assert row["peak_bytes"] is None  # CPU: no CUDA memory statistics
        if key != "floor":
            assert row["params_moved"] is True, f"{key}: AdamW did not change the trainable parameters"
    # PEFT UniLoRA keeps an int64 index and a scale in the weight dtype (fp32 here) for each of the D entries.
    assert rows["peft_unilora"]["adapter_state_bytes"]["buffers"] == D * (8 + 4)
    # native projection: nothing of size D stored; peft projection: its int32 table and d fp32 scales (at least).
    native = rows["unilora_hf"]["adapter_state_bytes"]
    assert native["buffers"] == native["cache"] == native["host"] == 0
    peft_kind = rows["unilora_hf_peft"]["adapter_state_bytes"]
    assert peft_kind["buffers"] == 0 and peft_kind["cache"] >= 4 * D + 4 * s["d"]
    prof = rows["peft_unilora"]["profile"]
    assert prof["steps"] == 1 and prof["top"] and all(k["calls"] >= 1 for k in prof["top"])
    assert "aten::mm" in {k["name"] for k in prof["top"]}
    assert "Self CPU" in prof["table"] and "### Profile of peft_unilora" in results["stdout"]
    assert all("profile" not in row for key, row in rows.items() if key != "peft_unilora")


def test_load_record(results):
    rec = results["load"]
    rows, s = rec["rows"], rec["settings"]
    _no_errors({k: v for k, v in rows.items() if "skipped" not in v})
    assert s["ranks"] == [1, 4]
    for r in (1, 4):
        for key in ("unilora_hf", "unilora_hf_peft", "peft_unilora"):
            row = rows[f"{key}@r{r}"]
            assert row["D"] == r * TINY_IN_OUT_PER_LAYER * TINY_LAYERS
            if key != "unilora_hf" and row["D"] > 4096:
                assert row["skipped"] == f"D = {row['D']:,} > --peft-max-d 4,096"
                continue
            assert row["attach_s"] > 0 and row["forward_s"] > 0
            assert row["max_logit_change"] > 0, f"{key}@r{r}: the attached adapter did not change the output"
        ours = rows[f"unilora_hf@r{r}"]
        # the stored adapter is θ_d in fp32 plus a header and a config JSON
        assert 4 * s["d"] < ours["adapter_files_bytes"] < 4 * s["d"] + 8192
        assert ours["adapter_state_bytes_after_forward"] == {"buffers": 0, "cache": 0, "host": 0}
    peft_row = rows["peft_unilora@r1"]
    assert peft_row["adapter_state_bytes"]["buffers"] == peft_row["D"] * (8 + 4)
    assert "skipped: D = 8,192 > --peft-max-d 4,096" in results["stdout"]


def test_inference_record(results):
    rec = results["inference"]
    rows, s = rec["rows"], rec["settings"]
    _no_errors(rows)
    assert list(rows) == ["base", "unilora_hf_merged", "unilora_hf_unloaded", "unilora_hf_unmerged",
                          "unilora_hf_ungrouped", "peft_lora", "peft_unilora", "peft_unilora_merged", "base_again"]
    for key, row in rows.items():
        assert row["generated_tokens"] == s["new_tokens"] == 4
        assert row["decode_tok_s"] == pytest.approx(s["new_tokens"] / row["generate_s"])
        assert row["prefill_min_ms"] <= row["prefill_median_ms"]
        if key.startswith("base"):
            assert "attach_s" not in row
        else:
            assert row["attach_s"] > 0
    # every row starts from the same base weights
    assert rows["base_again"]["max_logit_change_vs_base"] == 0
    assert rows["peft_lora"]["max_logit_change_vs_base"] == 0  # PEFT LoRA starts with B = 0
    for key in ("unilora_hf_unmerged", "peft_unilora"):
        assert rows[key]["max_logit_change_vs_base"] > 1e-5
    ungrouped, unmerged = rows["unilora_hf_ungrouped"], rows["unilora_hf_unmerged"]
    assert ungrouped["max_logit_change_vs_base"] == unmerged["max_logit_change_vs_base"]
    # merging gives the unmerged adapter's output, up to float32 rounding, far below the adapter's own effect
    for key in ("unilora_hf_merged", "unilora_hf_unloaded", "peft_unilora_merged"):
        assert rows[key]["max_logit_diff_vs_unmerged"] < 1e-2 * rows[key]["max_logit_change_vs_base"]
        assert rows[key]["max_logit_change_vs_base"] > 1e-5
    assert rows["unilora_hf_merged"]["merge_s"] > 0 and rows["peft_unilora_merged"]["merge_s"] > 0


def test_multi_adapter_record(results):
    rec = results["multi"]
    rows, a = rec["rows"], rec["args"]
    _no_errors(rows)
    assert list(rows) == ["base", "one_adapter", "mixed", "peft_lora_mixed", "peft_unilora_serial"]
    for key, row in rows.items():
        assert row["tokens_per_s"] == pytest.approx(row["rows"] * row["new_tokens"] / row["generate_s"])
    assert rows["mixed"]["rows"] == a["batch"] == 4 and rows["peft_lora_mixed"]["new_tokens"] == a["peft_new_tokens"]
    # row 0 of the mixed batch runs adapter u0, the adapter every row of one_adapter runs: same greedy tokens
    assert rows["mixed"]["first_tokens"][0] == rows["one_adapter"]["first_tokens"][0]
    res = rec["resident"]
    assert res["resident_counts"] == [1, 10] and set(res["beyond_base_gib"]) == {"1", "10"}
    assert 0 < res["switch_ms"] and 0 < res["add_ms"]
    assert "| run | tokens/s (generate) | decode tokens/s |" in results["stdout"]


def test_static_cache_interleaved_record(results):
    rec = results["static"]
    rows, s = rec["rows"], rec["settings"]
    _no_errors(rows)
    assert list(rows) == ["base", "unilora_hf_merged", "unilora_hf_unmerged", "unilora_hf_ungrouped", "peft_lora"]
    assert s["compile"] is True and s["rounds"] == 2 and s["cache_implementation"] == "static"
    for row in rows.values():
        assert len(row["rounds_ms_per_token"]) == 2 and row["ms_per_token"] > 0
        assert row["label"].endswith(", static cache")  # CPU: transformers compiles on CUDA only
    assert rows["base"]["per_token_vs_base"] == 1.0 and rows["peft_lora"]["max_logit_change_vs_base"] == 0
    for row in rows.values():  # the ratio within each round, against the base's time of that round
        assert row["rounds_vs_base"] == pytest.approx([t / b for t, b in zip(row["rounds_ms_per_token"],
                                                                             rows["base"]["rounds_ms_per_token"])])
        assert row["rounds_vs_base_median"] == pytest.approx(sum(row["rounds_vs_base"]) / 2)
    merged, unmerged = rows["unilora_hf_merged"], rows["unilora_hf_unmerged"]
    assert unmerged["max_logit_change_vs_base"] > 1e-5
    assert merged["max_logit_change_vs_base"] == pytest.approx(unmerged["max_logit_change_vs_base"], rel=1e-2)
    assert merged["first_tokens"] == unmerged["first_tokens"] == rows["unilora_hf_ungrouped"]["first_tokens"]
    assert rows["unilora_hf_ungrouped"]["max_logit_change_vs_base"] == unmerged["max_logit_change_vs_base"]


@pytest.mark.slow
def test_train_step_compiled_and_interleaved(tmp_path):
    """--compile with CPU inductor: every row eager and compiled, rounds interleaved, ratios within a mode."""
    out = tmp_path / "compiled.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, str(BENCH / "train_step.py"), "--tiny", "--compile", "default", "--rounds",
                           "2", "--queued", "--out", str(out)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    rec = json.loads(out.read_text())
    rows = rec["rows"]
    assert list(rows) == [f"{k}@{m}" for k in ("floor", "peft_lora", "unilora_hf") for m in ("eager", "default")]
    for name, row in rows.items():
        assert len(row["round_medians_ms"]) == 2 and len(row["all_ms"]) == 2 * rec["settings"]["steps"]
        floor = rows[f"floor@{name.split('@')[1]}"]
        assert row["step_vs_floor"] == pytest.approx(row["median_ms"] / floor["median_ms"])
        assert len(row["queued_round_ms"]) == 2 and all(ms > 0 for ms in row["queued_round_ms"])
        assert row["queued_vs_floor"] == pytest.approx(row["queued_ms"] / floor["queued_ms"])
        if not name.startswith("floor"):
            assert row["params_moved"] is True
    assert set(rec["targets"]) == {"compiled step <= 1.15 x compiled floor", "compiled step < compiled PEFT LoRA",
                                   "eager step <= 1.3 x eager floor"}


def test_guard_cost_record(results):
    """One compiled frame for the base and for a merged adapter (its pass hooks are off), two with an unmerged one
    (the root's pre-hook, then the model); the adapter's model frame has more guards than the base's, each frame
    was timed."""
    rows = results["guards"]["rows"]
    assert list(rows) == ["base", "unilora_hf", "unilora_hf_ungrouped", "unilora_hf_merged"]
    assert len(rows["base"]) == len(rows["unilora_hf_merged"]) == 1
    assert len(rows["unilora_hf"]) == len(rows["unilora_hf_ungrouped"]) == 2
    assert all(f["cold_us"] > 0 and f["warm_us"] > 0 and f["guard_lines"] > 10 for frames in rows.values()
               for f in frames)
    assert rows["unilora_hf"][1]["guard_lines"] > rows["base"][0]["guard_lines"]
    assert "| unilora_hf_ungrouped |" in results["stdout"]


def test_bad_arguments_are_named(capsys):
    sys.path.insert(0, str(BENCH))
    try:
        import inference
        import load
        import multi_adapter
        import train_step
    finally:
        sys.path.remove(str(BENCH))
        for name in ("common", "inference", "load", "multi_adapter", "train_step"):
            sys.modules.pop(name, None)
    with pytest.raises(SystemExit):
        train_step.parse_args(["--out", "x.json", "--only", "floor,bogus"])
    assert "unknown row(s) ['bogus']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_step.parse_args(["--out", "x.json", "--only", "floor", "--profile", "unilora_hf"])
    assert "--profile 'unilora_hf' must be one of the rows being run" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_step.parse_args(["--out", "x.json", "--queued"])
    assert "--queued times the interleaved rounds of --compile" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        load.parse_args(["--out", "x.json", "--ranks", "4,zero"])
    assert "give comma-separated positive integers" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        inference.parse_args(["--out", "x.json", "--new-tokens", "0"])
    assert "must be >= 1" in capsys.readouterr().err
    args = train_step.parse_args(["--out", "x.json", "--size", "7b"])
    assert (args.batch, args.seq, args.r, args.d, args.warmup, args.steps, args.dtype) == (4, 1024, 16, 2**19, 3, 10,
                                                                                          "bf16")
    with pytest.raises(SystemExit):
        multi_adapter.parse_args(["--out", "x.json", "--only", "mixed,lora"])
    assert "--only: unknown row(s) ['lora']" in capsys.readouterr().err


def test_train_step_ungrouped_row(tmp_path):
    """The A/B row ``unilora_hf_ungrouped`` attaches the same adapter with no sibling set (``unilora_hf`` keeps q/k/v
    and gate/up grouped) and trains the same model: the same losses on the CPU eager path, where no group runs."""
    train_step = _train_step()
    import torch

    from unilora_hf import get_adapter

    args = train_step.parse_args(["--tiny", "--out", str(tmp_path / "t.json")])
    cfg = train_step.common.llama_config("tiny")
    groups = {}
    for key in ("unilora_hf", "unilora_hf_ungrouped"):
        model, _ = train_step.attach(key, train_step.common.build_llama(cfg, "cpu", torch.float32), args)
        groups[key] = len(get_adapter(model)._groups)
    assert groups == {"unilora_hf": 2 * cfg.num_hidden_layers, "unilora_hf_ungrouped": 0}
    rec = train_step.main(["--tiny", "--only", "unilora_hf,unilora_hf_ungrouped", "--out", str(tmp_path / "t.json")])
    rows = rec["rows"]
    _no_errors(rows)
    for key in ("loss_first", "loss_last"):
        assert rows["unilora_hf_ungrouped"][key] == pytest.approx(rows["unilora_hf"][key], rel=1e-5)
    assert rows["unilora_hf"]["loss_last"] != rows["unilora_hf"]["loss_first"]


def test_train_step_unfused_mlp_row():
    """The A/B row ``unilora_hf_unfused_mlp`` attaches the same adapter with no MLP block run as one op (``unilora_hf``
    fuses each Llama MLP whose three projections are adapted), and neither A/B row is in the default rows."""
    train_step = _train_step()
    import torch

    from unilora_hf import get_adapter

    args = train_step.parse_args(["--tiny", "--out", "t.json"])
    assert "unilora_hf_unfused_mlp" not in args.rows and "unilora_hf" in args.rows
    cfg = train_step.common.llama_config("tiny")
    fused = {}
    for key in ("unilora_hf", "unilora_hf_unfused_mlp"):
        model, _ = train_step.attach(key, train_step.common.build_llama(cfg, "cpu", torch.float32), args)
        fused[key] = len(get_adapter(model)._mlps)
    assert fused == {"unilora_hf": cfg.num_hidden_layers, "unilora_hf_unfused_mlp": 0}


def test_train_step_one_stream_row_runs_its_steps_with_the_second_stream_off(tmp_path):
    """The A/B row ``unilora_hf_one_stream`` turns ``lora_linear.SECOND_STREAM`` off for its own steps only (read as
    its compiled backward is captured) and back on after each; the other rows run with it on."""
    train_step = _train_step()
    import torch

    from unilora_hf.kernels import lora_linear

    args = train_step.parse_args(["--tiny", "--out", str(tmp_path / "t.json")])
    cfg = train_step.common.llama_config("tiny")
    ids = train_step.common.random_tokens(cfg.vocab_size, 2, 8, torch.device("cpu"))
    seen = {}
    for key in ("unilora_hf", "unilora_hf_one_stream"):
        v = train_step.build_variant(key, None, args, cfg, torch.device("cpu"), torch.float32, ids)
        v["model"].register_forward_pre_hook(lambda *_, key=key: seen.update({key: lora_linear.SECOND_STREAM}))
        assert torch.isfinite(v["step"]())
        assert lora_linear.SECOND_STREAM
    assert seen == {"unilora_hf": True, "unilora_hf_one_stream": False}
