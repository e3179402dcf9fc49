"""The `unilora-hf` command line, run as a real process (``python -m unilora_hf``) against the local Hub
server and tiny models saved to temporary folders."""

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch
from models import STORIES, output, tiny_bert, tiny_llama, tokens
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from unilora_hf import UniLoraConfig, get_adapter, inject_adapter, load_adapter, push_adapter
from unilora_hf.cli import build_parser

TOKEN = "hf_test_token"
REPO = Path(__file__).resolve().parents[1]


def cli(*args, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "HF_TOKEN"}
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run([sys.executable, "-m", "unilora_hf", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO)


def ok(run: subprocess.CompletedProcess) -> str:
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout


def one_line_error(run: subprocess.CompletedProcess, status: int = 1) -> str:
    assert run.returncode == status, (run.returncode, run.stdout, run.stderr)
    lines = run.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("unilora-hf "), run.stderr
    assert "Traceback" not in run.stderr
    return lines[0]


def randomize(adapter, seed: int, scale: float = 1.0) -> None:
    with torch.no_grad():
        theta = torch.randn(adapter.theta_d.numel(), generator=torch.Generator().manual_seed(seed))
        adapter.theta_d.copy_(scale * theta)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Tiny bases saved to folders and adapters trained on them (random θ_d), with reference outputs."""
    root = tmp_path_factory.mktemp("cli")
    tiny_llama().save_pretrained(root / "llama")
    llama = AutoModelForCausalLM.from_pretrained(root / "llama")
    llama_adapter = inject_adapter(llama, UniLoraConfig(r=2, theta_d_length=300, target_modules=["q_proj", "v_proj"]))
    randomize(llama_adapter, 1)
    llama_adapter.save_adapter(root / "llama_adapter")

    tiny_bert(num_labels=3).save_pretrained(root / "bert")
    bert = AutoModelForSequenceClassification.from_pretrained(root / "bert")
    bert_adapter = inject_adapter(bert, UniLoraConfig(r=2, theta_d_length=200, projection="peft",
                                                      target_modules=["query", "value"],
                                                      modules_to_save=["classifier"]))
    randomize(bert_adapter, 2)
    with torch.no_grad():
        bert.classifier.modules_to_save.weight.mul_(3.0)  # a trained head, different from the base's
    bert_adapter.save_adapter(root / "bert_adapter")

    unrecorded = tiny_llama()
    randomize(inject_adapter(unrecorded, UniLoraConfig(r=2, theta_d_length=50, target_modules=["q_proj"])), 3)
    get_adapter(unrecorded).save_adapter(root / "no_base_adapter")
    return {"root": root, "llama": llama, "bert": bert}


def test_help_and_entry_point(capsys):
    top = ok(cli("--help"))
    for command in ("push", "info", "merge", "export-lora", "list"):
        assert command in top
    for command, options in (("push", ["--private", "--create-pr", "--commit-message", "--revision", "--endpoint"]),
                             ("info", ["--json", "--revision", "--local-files-only"]),
                             ("merge", ["--dtype", "--base-revision", "OUT_DIR"]),
                             ("export-lora", ["--base", "--export-dtype"])):
        with pytest.raises(SystemExit) as exit_:
            build_parser().parse_args([command, "--help"])
        assert exit_.value.code == 0
        text = capsys.readouterr().out
        assert all(option in text for option in options), (command, text)
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"unilora-hf": "unilora_hf.cli:main"}


def test_push_then_info_from_the_hub(saved, hub_server, hf_cache, tmp_path):
    folder = saved["root"] / "llama_adapter"
    url = ok(cli("push", folder, "alice/cli-llama", "--private", "--commit-message", "from the CLI",
                 "--token", TOKEN, "--endpoint", hub_server.url)).strip()
    assert url.startswith(f"{hub_server.url}/alice/cli-llama/commit/")
    files = hub_server.repo_files("alice/cli-llama")
    assert files["unilora_model.safetensors"] == (folder / "unilora_model.safetensors").read_bytes()
    assert "README.md" in files
    repo = hub_server.storage.get("model", "alice/cli-llama", "alice")
    assert repo.private and hub_server.storage.resolve(repo, "main").title == "from the CLI"

    text = ok(cli("info", "alice/cli-llama", "--token", TOKEN, "--endpoint", hub_server.url))
    rows = dict(line.split("  ", 1) for line in text.splitlines())
    rows = {k.strip(): v.strip() for k, v in rows.items()}
    adapter = get_adapter(saved["llama"])
    assert rows["adapter"] == "alice/cli-llama"
    # The base was a local folder: the pushed adapter names none (a local path is never published).
    assert rows["base model"] == ("not recorded (trained on a local folder named 'llama') (revision not recorded, "
                                  "AutoModelForCausalLM)")
    assert str(saved["root"]) not in files["unilora_config.json"].decode() + files["README.md"].decode()
    assert rows["D (LoRA parameters)"] == f"{adapter.D:,}" and rows["d (θ_d length)"] == "300"
    assert rows["fingerprint"] == adapter.fingerprint and rows["adapted layers"] == str(len(adapter.layers))
    assert rows["trainable parameters"].startswith(f"{adapter.num_trainable():,} ")
    size = (folder / "unilora_model.safetensors").stat().st_size
    assert rows["file unilora_model.safetensors"] == f"{size:,} bytes"

    # With a fresh cache (huggingface_hub serves an already cached file even when the Hub refuses the call).
    error = one_line_error(cli("info", "alice/cli-llama", "--endpoint", hub_server.url, "--cache-dir", tmp_path))
    assert "alice/cli-llama was not found" in error and "no token was sent" in error


def test_info_json_of_a_local_folder(saved):
    info = json.loads(ok(cli("info", saved["root"] / "bert_adapter", "--json")))
    adapter = get_adapter(saved["bert"])
    assert info["format"] == "peft" and info["config"]["projection"] == "peft"
    assert info["D"] == adapter.D and info["d"] == 200 and info["fingerprint"] == adapter.fingerprint
    assert info["trainable"] == adapter.num_trainable() == 200 + 3 * 24 + 3
    assert info["trained_tensors"] == {"classifier.bias": 3, "classifier.weight": 72}
    assert info["auto_class"] == "AutoModelForSequenceClassification"
    assert info["files"] == {n: (saved["root"] / "bert_adapter" / n).stat().st_size
                             for n in ("adapter_config.json", "adapter_model.safetensors")}


def test_list_groups_a_folder_of_many_adapters(saved, tmp_path):
    """Three adapters of one projection and layout form one group (they load together onto one base), one of
    another seed a second group; a corrupted one is refused with the loader's reason; other entries are ignored."""
    import shutil

    many = tmp_path / "many"
    llama = tiny_llama()
    config = UniLoraConfig(r=2, theta_d_length=64, target_modules=["q_proj", "v_proj"])
    adapter = inject_adapter(llama, config)
    for i, name in enumerate(["carol", "alice", "bob"]):
        randomize(adapter, 10 + i)
        adapter.save_adapter(many / name)
    other = inject_adapter(tiny_llama(), UniLoraConfig(r=2, theta_d_length=64, proj_seed=7,
                                                       target_modules=["q_proj", "v_proj"]))
    other.save_adapter(many / "dave")
    shutil.copytree(many / "bob", many / "eve")
    weights = many / "eve" / "unilora_model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-5] ^= 0x40  # one flipped bit in θ_d
    weights.write_bytes(bytes(raw))
    (many / "notes").mkdir()
    (many / "README.md").write_text("not an adapter")

    listing = json.loads(ok(cli("list", many, "--json")))
    assert listing["adapters"] == 5
    assert [[a["name"] for a in g["adapters"]] for g in listing["groups"]] == [["alice", "bob", "carol"], ["dave"]]
    first = listing["groups"][0]["shared"]
    assert (first["proj_seed"], first["theta_d_length"], first["D"]) == (42, 64, adapter.D)
    assert first["fingerprint"] == adapter.fingerprint and listing["groups"][1]["shared"]["proj_seed"] == 7
    assert [r["name"] for r in listing["refused"]] == ["eve"]
    assert "AdapterIntegrityError" in listing["refused"][0]["error"]

    text = ok(cli("list", many))
    assert "5 adapter(s)" in text and "2 group(s)" in text and "1 refused" in text
    assert "group 1: 3 adapter(s)" in text and "eve: AdapterIntegrityError" in text

    # what the listing promises: one group loads onto one base and serves mixed batches
    base = tiny_llama()
    load_adapter(base, many / "alice", adapter_name="alice")
    for name in ("bob", "carol"):
        base.load_adapter(many / name, adapter_name=name)
    from unilora_hf import LayoutMismatchError

    with pytest.raises(LayoutMismatchError, match="proj_seed"):
        base.load_adapter(many / "dave", adapter_name="dave")

    assert "no adapter folders" in one_line_error(cli("list", many / "notes"))
    assert "is not a folder" in one_line_error(cli("list", many / "README.md"))
    single = json.loads(ok(cli("list", many / "alice", "--json")))  # a folder that is itself an adapter
    assert [a["name"] for a in single["groups"][0]["adapters"]] == ["alice"]


def test_merge_writes_a_plain_transformers_folder(saved, tmp_path):
    out = tmp_path / "merged"
    message = ok(cli("merge", saved["root"] / "bert", saved["root"] / "bert_adapter", out))
    assert str(out) in message
    merged = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert merged.config.num_labels == 3
    assert not any("unilora" in n or "modules_to_save" in n for n in merged.state_dict())
    ids = tokens(saved["bert"])
    torch.testing.assert_close(output(merged, ids), output(saved["bert"], ids), atol=1e-5, rtol=1e-5)
    in_process = AutoModelForSequenceClassification.from_pretrained(saved["root"] / "bert")
    load_adapter(in_process, saved["root"] / "bert_adapter").merge_and_unload()
    assert torch.equal(output(merged.eval(), ids), output(in_process.eval(), ids))


def test_merge_a_hub_adapter_into_stories260k_keeps_the_tokenizer(hub_server, hf_cache, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(STORIES).eval()
    adapter = inject_adapter(model, UniLoraConfig(r=4, theta_d_length=2000, target_modules=["q_proj", "v_proj"]))
    randomize(adapter, 4, scale=0.1)  # about the size trained θ_d reach
    push_adapter(model, "alice/cli-stories", token=TOKEN, endpoint=hub_server.url)
    out = tmp_path / "merged"
    ok(cli("merge", STORIES, "alice/cli-stories", out, "--endpoint", hub_server.url))
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = AutoTokenizer.from_pretrained(out)(["Once upon a time there was a cat"], return_tensors="pt").input_ids
    assert torch.equal(ids, AutoTokenizer.from_pretrained(STORIES)(["Once upon a time there was a cat"],
                                                                   return_tensors="pt").input_ids)
    # Merging reorders float32 sums: equal up to rounding; bit-equal to merging in this process.
    torch.testing.assert_close(output(merged, ids), output(model, ids), atol=2e-5, rtol=1e-4)
    in_process = AutoModelForCausalLM.from_pretrained(STORIES)
    load_adapter(in_process, "alice/cli-stories", endpoint=hub_server.url).merge_and_unload()
    assert torch.equal(output(merged, ids), output(in_process.eval(), ids))
    with adapter.disabled():
        assert not torch.allclose(output(merged, ids), output(model, ids), atol=1e-2)  # ΔW is really in there


def test_export_lora_loads_in_peft_with_equal_logits(saved, tmp_path):
    from peft import PeftModel

    out = tmp_path / "lora"
    message = ok(cli("export-lora", saved["root"] / "llama_adapter", out))  # base taken from the adapter
    assert str(saved["root"] / "llama") in message
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == str(saved["root"] / "llama")
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(saved["root"] / "llama"), out).eval()
    ids = tokens(saved["llama"])
    torch.testing.assert_close(output(peft_model, ids), output(saved["llama"], ids), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", ["wrong base", "no recorded base", "missing argument", "bad repo id"])
def test_bad_input_exits_nonzero_with_one_line(case, saved, tmp_path):
    root = saved["root"]
    if case == "wrong base":
        error = one_line_error(cli("merge", root / "llama", root / "bert_adapter", tmp_path / "out"))
        assert "matched no module of LlamaForSequenceClassification" in error
        assert not (tmp_path / "out").exists()
    elif case == "no recorded base":
        error = one_line_error(cli("export-lora", root / "no_base_adapter", tmp_path / "out"))
        assert "records no base model; pass --base" in error
    elif case == "missing argument":
        error = one_line_error(cli("merge", root / "llama", root / "llama_adapter"), status=2)
        assert "required: OUT_DIR" in error and "unilora-hf merge --help" in error
    else:
        error = one_line_error(cli("push", root / "llama_adapter", "not//valid"))
        assert "invalid repo id 'not//valid'" in error
