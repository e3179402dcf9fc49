"""Saves are atomic at the folder level and keep what is not theirs: a save killed at any point leaves the
previous adapter loadable; the user's other files, including ones named like our temporaries, survive; another
library's adapter in the folder is never overwritten; a failed save leaves nothing behind."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from models import tiny_llama
from peft import LoraConfig, get_peft_model

from unilora_hf import AdapterFormatError, UniLoraConfig, export_lora, inject_adapter, read_adapter
from unilora_hf import serialization

TESTS = Path(__file__).resolve().parent
USER_FILES = {"notes.txt": b"my notes", "unilora_model.tmp": b"mine too", "unilora_config.tmp": b"and this",
              "sub/deeper.txt": b"nested"}

KILLER = """
import json, os, random, signal, sys, time, torch
sys.path.insert(0, {tests!r})
from transformers import LlamaConfig, LlamaForCausalLM
from unilora_hf import UniLoraConfig, inject_adapter, read_adapter
from test_atomic_save import USER_FILES, write_user_files
torch.set_num_threads(1)  # the saver is a fork of this process: no thread pool to inherit half-locked
torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(hidden_size=256, intermediate_size=704, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, vocab_size=64))
adapter = inject_adapter(model, UniLoraConfig(r=64, theta_d_length=500_000, target_modules="all-linear"))
folder = {folder!r}
with torch.no_grad():
    adapter.theta_d.zero_()
adapter.save_adapter(folder)
write_user_files(__import__("pathlib").Path(folder))
rng = random.Random(0)
for attempt in range({attempts}):
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the saver: save adapters with θ_d = 1, 2, 3, ... until killed
        os.close(read)
        i = 1 + 1000 * attempt
        while True:
            with torch.no_grad():
                adapter.theta_d.fill_(float(i))
            adapter.save_adapter(folder)
            os.write(write, f"{{i}}\\n".encode())
            i += 1
    os.close(write)
    time.sleep(rng.uniform(0.0, 0.25))
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    done = [int(x) for x in os.read(read, 1 << 20).split()]
    os.close(read)
    files = read_adapter(folder)
    value = files.theta_d[0].item()
    whole = bool(torch.equal(files.theta_d, torch.full_like(files.theta_d, value)))
    user = all(open(os.path.join(folder, n), "rb").read() == d for n, d in USER_FILES.items())
    print(json.dumps({{"value": value, "done": done[-1:] , "whole": whole, "user_files": user}}), flush=True)
"""


def write_user_files(folder: Path) -> None:
    for name, data in USER_FILES.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)


def assert_user_files(folder: Path) -> None:
    for name, data in USER_FILES.items():
        assert (folder / name).read_bytes() == data, name


def test_a_save_killed_at_any_point_leaves_an_adapter_that_loads(tmp_path):
    """A process saves adapters (θ_d = 1, 2, 3, ...) in a loop and is killed (SIGKILL) at a random moment, eight
    times: each time the folder loads whole, as the last adapter saved or the one being saved, with the user's
    files in place."""
    import json

    folder = tmp_path / "out"
    run = subprocess.run([sys.executable, "-c", KILLER.format(tests=str(TESTS), folder=str(folder), attempts=8)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    outcomes = [json.loads(line) for line in run.stdout.splitlines()]
    assert len(outcomes) == 8
    for o in outcomes:
        assert o["whole"] and o["user_files"], o
        assert not o["done"] or o["value"] in (o["done"][-1], o["done"][-1] + 1), o
    assert any(o["done"] for o in outcomes)  # saves did complete before the kills (the test saw real saves)
    model = tiny_llama()
    inject_adapter(model, UniLoraConfig(r=2, theta_d_length=64, target_modules=["q_proj"])).save_adapter(folder)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # stale staging folders of killed saves are cleared
    assert_user_files(folder)


def small_adapter(projection="native"):
    model = tiny_llama()
    adapter = inject_adapter(model, UniLoraConfig(r=2, theta_d_length=64, projection=projection,
                                                  target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        adapter.theta_d.normal_()
    return model, adapter


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "file-by-file"])
def test_saving_over_an_adapter_keeps_the_users_files(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(serialization, "_exchange", lambda a, b: False)
    _, first = small_adapter()
    first.save_adapter(tmp_path)
    write_user_files(tmp_path)
    _, second = small_adapter()
    second.save_adapter(tmp_path)
    assert torch.equal(read_adapter(tmp_path).theta_d, second.theta_d.detach())
    assert_user_files(tmp_path)
    assert not [p for p in tmp_path.parent.iterdir() if ".unilora-staging-" in p.name]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".unilora-tmp")]


def test_a_failed_save_leaves_the_folder_as_it_was(tmp_path, monkeypatch):
    _, first = small_adapter()
    first.save_adapter(tmp_path)
    write_user_files(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}

    def broken(a, b):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(serialization, "_exchange", broken)
    _, second = small_adapter()
    with pytest.raises(OSError, match="No space left"):
        second.save_adapter(tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before
    assert not [p for p in tmp_path.parent.iterdir() if ".unilora-staging-" in p.name]


def test_another_librarys_adapter_is_never_overwritten(tmp_path):
    lora = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    lora.save_pretrained(str(tmp_path))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    for projection in ("peft", "native"):
        _, adapter = small_adapter(projection)
        with pytest.raises(AdapterFormatError, match="another library's adapter.*another folder"):
            adapter.save_adapter(tmp_path)
    with pytest.raises(AdapterFormatError, match="another adapter.*overwrite"):
        export_lora(adapter, tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_an_adapter_of_ours_in_the_other_format_is_replaced_not_doubled(tmp_path):
    _, peft_kind = small_adapter("peft")
    peft_kind.save_adapter(tmp_path)
    _, native = small_adapter("native")
    native.save_adapter(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["unilora_config.json", "unilora_model.safetensors"]
    assert torch.equal(read_adapter(tmp_path).theta_d, native.theta_d.detach())
    with pytest.raises(AdapterFormatError, match="unilora_hf adapter.*second adapter"):
        export_lora(native, tmp_path)
    export_lora(native, tmp_path / "lora")
    export_lora(native, tmp_path / "lora")  # an export replaces an export
