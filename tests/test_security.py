"""Adapters from strangers: nothing in an adapter folder runs code, reaches outside it, blocks, or takes more
than a second or a few megabytes before it is refused. Where code could run, a marker file proves it did not
(and a positive control proves the marker would appear if it did)."""

import json
import os
import pickle
import resource
import threading
import time

import pytest
import torch
from models import tiny_bert, tiny_llama
from safetensors.torch import save_file

from unilora_hf import (
    AdapterFormatError, BaseModelError, InvalidConfigError, LayoutMismatchError, UniLoraAutoModel, UniLoraConfig,
    UniLoraError, UnsafeAdapterError, inject_adapter, load_adapter, read_adapter,
)


def saved_adapter(folder, model=None, **config):
    model = model or tiny_llama()
    cfg = dict(r=2, theta_d_length=64, target_modules=["q_proj", "v_proj"])
    cfg.update(config)
    inject_adapter(model, UniLoraConfig(**cfg)).save_adapter(folder)
    return folder


def peft_written(folder, theta_len=50, tensors=None, **config):
    """An adapter folder as PEFT itself writes one: no unilora_hf record, no digest."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"peft_type": "UNILORA", "r": 2, "theta_d_length": theta_len, "proj_seed": 0,
           "target_modules": ["q_proj", "v_proj"], **config}
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    save_file({"base_model.unilora_theta_d": torch.zeros(theta_len), **(tensors or {})},
              str(folder / "adapter_model.safetensors"))
    return folder


# -- no code from an adapter ----------------------------------------------------------------------------------
def remote_code_base(folder, marker):
    """A base model folder whose config names custom code that writes ``marker`` when imported."""
    folder.mkdir()
    tiny_llama().save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "modeling_marker.MarkerConfig",
                          "AutoModelForCausalLM": "modeling_marker.MarkerModel"}
    config["model_type"] = "marker_llama"
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "modeling_marker.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "class MarkerConfig(LlamaConfig):\n    model_type = 'marker_llama'\n"
        "class MarkerModel(LlamaForCausalLM):\n    config_class = MarkerConfig\n"
    )
    return folder


def test_config_overrides_cannot_turn_on_remote_code(tmp_path):
    marker = tmp_path / "marker"
    base = remote_code_base(tmp_path / "base", marker)
    adapter = saved_adapter(tmp_path / "adapter")
    config = json.loads((adapter / "unilora_config.json").read_text())
    config["base_model"]["name_or_path"] = str(base)
    config["base_model"]["config_overrides"] = {"trust_remote_code": True}
    (adapter / "unilora_config.json").write_text(json.dumps(config))
    with pytest.raises(UnsafeAdapterError, match="trust_remote_code"):
        UniLoraAutoModel.from_pretrained(None, adapter)
    with pytest.raises(UnsafeAdapterError, match="trust_remote_code"):
        UniLoraAutoModel.from_pretrained(str(base), adapter)
    assert not marker.exists()


def test_a_recorded_base_with_custom_code_is_not_run_without_the_callers_consent(tmp_path):
    marker = tmp_path / "marker"
    base = remote_code_base(tmp_path / "base", marker)
    adapter = saved_adapter(tmp_path / "adapter")
    config = json.loads((adapter / "unilora_config.json").read_text())
    config["base_model"]["name_or_path"] = str(base)  # not in the digest: a user may re-point the base
    (adapter / "unilora_config.json").write_text(json.dumps(config))
    with pytest.raises(BaseModelError, match="trust_remote_code=True"):
        UniLoraAutoModel.from_pretrained(None, adapter)
    assert not marker.exists()
    # Positive control: with the caller's own trust_remote_code=True the custom code runs (and the marker appears).
    UniLoraAutoModel.from_pretrained(None, adapter, trust_remote_code=True)
    assert marker.read_text() == "ran"


def test_the_model_class_comes_from_a_closed_list(tmp_path):
    adapter = saved_adapter(tmp_path / "adapter")
    config = json.loads((adapter / "unilora_config.json").read_text())
    config["base_model"]["auto_class"] = "__import__('os').system"
    (adapter / "unilora_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterFormatError, match="not one of the transformers Auto classes"):
        read_adapter(adapter)


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):  # unpickling calls open(marker, "w"), creating the file
        return (open, (self.marker, "w"))


def test_pickled_weights_are_never_unpickled(tmp_path):
    marker = tmp_path / "marker"
    folder = tmp_path / "adapter"
    folder.mkdir()
    payload = pickle.dumps(_Payload(marker))  # unpickling it opens (creates) the marker file
    (folder / "adapter_model.bin").write_bytes(payload)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "UNILORA", "r": 2, "theta_d_length": 8,
                                                            "proj_seed": 0, "target_modules": ["q_proj"]}))
    for target in (folder, str(folder)):
        with pytest.raises(UnsafeAdapterError, match="never unpickles"):
            load_adapter(tiny_llama(), target)
    assert not marker.exists()
    pickle.loads(payload)  # positive control
    assert marker.exists()


# -- nothing outside the folder, nothing that blocks ------------------------------------------------------------
def test_links_out_of_the_folder_are_refused(tmp_path):
    outside = saved_adapter(tmp_path / "real")
    folder = tmp_path / "linked"
    folder.mkdir()
    os.symlink(outside / "unilora_config.json", folder / "unilora_config.json")
    os.symlink(outside / "unilora_model.safetensors", folder / "unilora_model.safetensors")
    with pytest.raises(UnsafeAdapterError, match="outside the adapter folder"):
        read_adapter(folder)
    (folder / "unilora_config.json").unlink()
    (folder / "unilora_config.json").write_bytes((outside / "unilora_config.json").read_bytes())
    with pytest.raises(UnsafeAdapterError, match="unilora_model.safetensors is a link to"):
        read_adapter(folder)
    # A link that stays inside the folder is fine.
    (folder / "unilora_model.safetensors").unlink()
    (folder / "weights.bin.safetensors").write_bytes((outside / "unilora_model.safetensors").read_bytes())
    os.symlink("weights.bin.safetensors", folder / "unilora_model.safetensors")
    assert read_adapter(folder).config.r == 2


@pytest.mark.parametrize("special", ["fifo", "device", "directory"])
def test_fifos_devices_and_folders_named_like_adapter_files_are_refused_at_once(tmp_path, special):
    folder = saved_adapter(tmp_path / "adapter")
    target = folder / "unilora_config.json"
    target.unlink()
    if special == "fifo":
        os.mkfifo(target)
    elif special == "device":
        os.symlink("/dev/zero", target)
    else:
        target.mkdir()
    result = {}

    def attempt():
        try:
            read_adapter(folder)
        except UniLoraError as exc:
            result["error"] = exc

    thread = threading.Thread(target=attempt, daemon=True)
    start = time.monotonic()
    thread.start()
    thread.join(5)
    assert not thread.is_alive(), "reading the adapter blocked"
    assert time.monotonic() - start < 1.0
    assert isinstance(result.get("error"), (UnsafeAdapterError, AdapterFormatError)), result


# -- bounded: hostile sizes, patterns and nesting are refused fast ---------------------------------------------------
def _refused_fast(call, error, match=None, seconds=1.5, megabytes=100):
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.monotonic()
    with pytest.raises(error, match=match):
        call()
    elapsed = time.monotonic() - start
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss) / 1024
    assert elapsed < seconds, elapsed
    assert grown < megabytes, grown


@pytest.mark.parametrize("pattern", [r"(.|..|...)*\d\d\d\d$", r"(\w|.|\w\w)*\d{4}$"])
def test_a_catastrophic_target_regex_is_refused_within_a_second(tmp_path, pattern):
    folder = peft_written(tmp_path / "adapter", target_modules=pattern)
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _refused_fast(lambda: load_adapter(model, folder), (LayoutMismatchError, InvalidConfigError), "more than 1 s")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_layout_that_expands_to_absurd_sizes_is_refused_fast(tmp_path):
    folder = saved_adapter(tmp_path / "adapter")
    config = json.loads((folder / "unilora_config.json").read_text())
    config["layout"]["groups"] = [{"modules": "model.layers.*.self_attn.q_proj", "shape": [32, 32],
                                   "at": "0-999999999999"}]
    config["layout"]["fingerprint"] = "sha256:" + "0" * 64  # so the stored groups are consulted
    (folder / "unilora_config.json").write_text(json.dumps(config))
    # The digest covers the fingerprint: refused before any expansion.
    _refused_fast(lambda: load_adapter(tiny_llama(), folder), AdapterFormatError, "digest")
    # Expanding such groups directly is bounded too.
    from unilora_hf.layout import expand

    _refused_fast(lambda: expand(config["layout"]["groups"], limit=1000), UniLoraError)


def test_deeply_nested_json_is_refused_fast(tmp_path):
    folder = saved_adapter(tmp_path / "adapter")
    (folder / "unilora_config.json").write_text("[" * 200_000 + "]" * 200_000)
    _refused_fast(lambda: read_adapter(folder), AdapterFormatError, "nests deeper")


def test_huge_ranks_are_refused_before_anything_is_allocated(tmp_path):
    _refused_fast(lambda: inject_adapter(tiny_llama(), UniLoraConfig(r=60_000, theta_d_length=64,
                                                                      target_modules="all-linear")),
                  InvalidConfigError, "smaller r", megabytes=20)
    folder = peft_written(tmp_path / "adapter", r=10**6)
    _refused_fast(lambda: load_adapter(tiny_llama(), folder), AdapterFormatError, r"UniLoraConfig.r = 1000000",
                  megabytes=20)
    folder = peft_written(tmp_path / "adapter2", r=60_000, target_modules="all-linear")  # D far beyond the weights
    _refused_fast(lambda: load_adapter(tiny_llama(), folder), LayoutMismatchError, "smaller r", megabytes=20)


def test_an_oversized_header_is_refused_before_it_is_parsed(tmp_path):
    folder = saved_adapter(tmp_path / "adapter")
    (folder / "unilora_model.safetensors").write_bytes((2**40).to_bytes(8, "little") + b"{}")
    _refused_fast(lambda: read_adapter(folder), AdapterFormatError, "header length")


def test_wrong_types_anywhere_in_the_files_are_refused_as_format_errors(tmp_path):
    folder = saved_adapter(tmp_path / "adapter", model=tiny_bert(), target_modules=["query"],
                           modules_to_save=["classifier"])
    good = json.loads((folder / "unilora_config.json").read_text())
    edits = [("base_model", "bert-base"), ("layout", []), ("D", "12"), ("config", {"r": "2"}),
             ("format_version", 2.0), ("projection_spec", None), ("library", 7)]
    for key, value in edits:
        (folder / "unilora_config.json").write_text(json.dumps({**good, key: value}))
        with pytest.raises(AdapterFormatError):
            read_adapter(folder)
