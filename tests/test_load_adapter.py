"""`unilora_hf.load_adapter`: a stored adapter attached to an already loaded model, through the real
huggingface_hub client against the local Hub server (cache, revisions, offline use, private repos)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError
from models import output, tiny_gpt2, tiny_llama, tokens

from unilora_hf import (
    AdapterStateError, UniLoraAdapter, UniLoraConfig, get_adapter, inject_adapter, load_adapter, push_adapter,
)

TOKEN = "hf_test_token"
TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent


def adapted(seed: int, projection: str = "native"):
    """A tiny Llama with a random (non-trivial) adapter; θ_d depends on ``seed``."""
    model = tiny_llama()
    adapter = inject_adapter(model, UniLoraConfig(r=2, theta_d_length=300, projection=projection,
                                                  target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        adapter.theta_d.copy_(torch.randn(300, generator=torch.Generator().manual_seed(seed)))
    return model


def resolve_gets(hub_server) -> int:
    return sum("/resolve/" in r.path for r in hub_server.requests)


def test_each_pinned_revision_loads_its_own_adapter(hub_server, hf_cache):
    first, second = adapted(1), adapted(2)
    ids = tokens(first)
    push_adapter(first, "alice/pinned", token=TOKEN, endpoint=hub_server.url)
    sha1 = hub_server.commit_sha("alice/pinned")
    push_adapter(second, "alice/pinned", token=TOKEN, endpoint=hub_server.url)
    sha2 = hub_server.commit_sha("alice/pinned")
    assert sha1 != sha2
    expected1, expected2 = output(first, ids), output(second, ids)
    assert not torch.allclose(expected1, expected2)
    for revision, expected in ((sha1, expected1), (sha2, expected2), (None, expected2), ("main", expected2)):
        model = tiny_llama()
        handle = load_adapter(model, "alice/pinned", revision=revision, token=TOKEN, endpoint=hub_server.url)
        assert isinstance(handle, UniLoraAdapter) and get_adapter(model) is handle
        assert torch.equal(output(model, ids), expected), revision
    folders = {p.parent.name for p in hf_cache.rglob("unilora_model.safetensors")}
    assert folders == {sha1, sha2}  # one snapshot per commit, in the user's cache


def test_missing_revision_is_a_clear_one_line_error(hub_server, hf_cache):
    push_adapter(adapted(1), "alice/revs", token=TOKEN, endpoint=hub_server.url)
    model = tiny_llama()
    with pytest.raises(RevisionNotFoundError) as err:
        load_adapter(model, "alice/revs", revision="v9", token=TOKEN, endpoint=hub_server.url)
    message = str(err.value)
    assert "alice/revs has no revision 'v9'" in message and "list_repo_refs" in message
    assert "\n" not in message
    assert not hasattr(model, "unilora_theta_d")  # nothing was attached


def test_local_files_only_serves_the_cache_without_any_request(hub_server, tmp_path):
    model = adapted(3, projection="peft")
    ids = tokens(model)
    expected = output(model, ids)
    push_adapter(model, "alice/cached", token=TOKEN, endpoint=hub_server.url)
    cache = tmp_path / "cache"
    with pytest.raises(LocalEntryNotFoundError, match="not in the huggingface_hub cache") as err:
        load_adapter(tiny_llama(), "alice/cached", local_files_only=True, cache_dir=cache, endpoint=hub_server.url)
    assert "\n" not in str(err.value)
    load_adapter(tiny_llama(), "alice/cached", cache_dir=cache, endpoint=hub_server.url)
    before = len(hub_server.requests)
    again = tiny_llama()
    load_adapter(again, "alice/cached", local_files_only=True, cache_dir=cache, endpoint=hub_server.url)
    assert len(hub_server.requests) == before
    assert torch.equal(output(again, ids), expected)


def test_hf_hub_offline_in_a_fresh_process_uses_the_cache(hub_server, hf_cache, tmp_path):
    model = adapted(4)
    ids = tokens(model)
    torch.save({"ids": ids, "expected": output(model, ids)}, tmp_path / "ref.pt")
    push_adapter(model, "alice/offline", token=TOKEN, endpoint=hub_server.url)
    push_adapter(adapted(5), "alice/never-pulled", token=TOKEN, endpoint=hub_server.url)
    load_adapter(tiny_llama(), "alice/offline", endpoint=hub_server.url)  # fills hf_cache
    script = f"""
import sys, torch
sys.path.insert(0, {str(TESTS)!r})
from huggingface_hub import constants
from huggingface_hub.errors import LocalEntryNotFoundError
from unilora_hf import load_adapter
from models import output, tiny_llama
assert constants.HF_HUB_OFFLINE
ref = torch.load({str(tmp_path / 'ref.pt')!r})
model = tiny_llama()
load_adapter(model, "alice/offline")
assert torch.equal(output(model, ref["ids"]), ref["expected"])
try:
    load_adapter(tiny_llama(), "alice/never-pulled")
except LocalEntryNotFoundError as exc:
    print("MISS:", exc)
print("OFFLINE OK")
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": hub_server.url, "PYTHONPATH": str(REPO)}
    before = len(hub_server.requests)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env,
                         cwd=REPO)
    assert "OFFLINE OK" in run.stdout, run.stderr[-3000:]
    assert "MISS: the adapter alice/never-pulled (revision main) is not in the huggingface_hub cache" in run.stdout
    assert len(hub_server.requests) == before  # the offline process never called the server


def test_private_repo_without_a_token_is_a_clear_error(hub_server, hf_cache, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    push_adapter(adapted(6), "alice/private-load", token=TOKEN, endpoint=hub_server.url, private=True)
    with pytest.raises(RepositoryNotFoundError) as err:
        load_adapter(tiny_llama(), "alice/private-load", endpoint=hub_server.url)
    message = str(err.value)
    assert "alice/private-load was not found" in message and "private and no token was sent" in message
    assert "\n" not in message
    with pytest.raises(RepositoryNotFoundError, match="the token sent cannot read it"):
        load_adapter(tiny_llama(), "alice/private-load", token="hf_other_token", endpoint=hub_server.url)
    model = tiny_llama()
    load_adapter(model, "alice/private-load", token=TOKEN, endpoint=hub_server.url)
    assert torch.equal(output(model, tokens(model)), output(adapted(6), tokens(model)))


def test_local_folder_and_misuse(tmp_path):
    source = adapted(7)
    get_adapter(source).save_adapter(tmp_path / "adapter")
    model = tiny_llama()
    handle = load_adapter(model, tmp_path / "adapter")
    assert torch.equal(output(model, tokens(model)), output(source, tokens(model)))
    assert handle.fingerprint == get_adapter(source).fingerprint and handle.D == get_adapter(source).D
    with pytest.raises(AdapterStateError, match="already has a Uni-LoRA adapter"):
        load_adapter(model, tmp_path / "adapter")
    other = tiny_gpt2()
    before = output(other, tokens(other))
    with pytest.raises(ValueError, match="matched no module of GPT2LMHeadModel"):
        load_adapter(other, tmp_path / "adapter")
    assert not hasattr(other, "unilora_theta_d") and torch.equal(output(other, tokens(other)), before)
    with pytest.raises(TypeError, match="UniLoraAutoModel.from_pretrained"):
        load_adapter("base/model-id", tmp_path / "adapter")
