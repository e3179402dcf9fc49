"""The Hub when things go wrong: bare repo names, failed pushes, unreachable Hub, offline mode, wrong tokens,
downloads cut off. Each gets one clear error of this library within seconds, from the API and from the CLI
(one line, no traceback), and leaves nothing behind."""

import socket
import time

import pytest
import torch
from huggingface_hub.errors import LocalEntryNotFoundError
from models import output, tiny_llama, tokens
from test_cli import cli, one_line_error

from unilora_hf import (
    AdapterNotCachedError, HubAuthError, HubConnectionError, HubError, HubPushError, UniLoraConfig, inject_adapter,
    load_adapter, push_adapter,
)

TOKEN = "hf_test_token"


def adapted(seed=0):
    model = tiny_llama()
    adapter = inject_adapter(model, UniLoraConfig(r=2, theta_d_length=120, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        adapter.theta_d.copy_(torch.randn(120, generator=torch.Generator().manual_seed(seed)))
    return model


@pytest.fixture
def dead_endpoint():
    """A local URL nothing listens on."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return f"http://127.0.0.1:{port}"


def test_a_bare_repo_name_goes_to_the_token_owners_namespace(hub_server):
    url = push_adapter(adapted(), "bare-name", token=TOKEN, endpoint=hub_server.url)
    assert "alice/bare-name" in url
    assert "unilora_model.safetensors" in hub_server.repo_files("alice/bare-name")
    creates = [r for r in hub_server.requests if r.path.startswith("/api/repos/create")]
    assert creates and all(r.status == 200 for r in creates[-1:])


def test_a_failed_push_removes_the_repo_it_created_and_leaves_others_as_they_were(hub_server, hf_api):
    hub_server.fail_next_commits(1)
    with pytest.raises(HubPushError, match="deleted again"):
        push_adapter(adapted(), "alice/brand-new", token=TOKEN, endpoint=hub_server.url)
    assert not hf_api.repo_exists("alice/brand-new")
    push_adapter(adapted(), "alice/brand-new", token=TOKEN, endpoint=hub_server.url)  # a retry succeeds
    before = hub_server.repo_files("alice/brand-new")
    hub_server.fail_next_commits(1)
    with pytest.raises(HubPushError, match="Nothing was committed"):
        push_adapter(adapted(1), "alice/brand-new", token=TOKEN, endpoint=hub_server.url)
    assert hub_server.repo_files("alice/brand-new") == before


def test_a_wrong_token_is_named_as_the_problem(hub_server):
    for repo in ("alice/x", "bare"):
        with pytest.raises(HubAuthError, match="refused the token") as err:
            push_adapter(adapted(), repo, token="hf_wrong", endpoint=hub_server.url)
        assert "hf_wrong" not in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(HubAuthError):  # bob may not write into alice's namespace
        push_adapter(adapted(), "alice/not-bobs", token="hf_other_token", endpoint=hub_server.url)


def test_an_unreachable_hub_is_one_clear_error_within_seconds(dead_endpoint, tmp_path):
    start = time.monotonic()
    with pytest.raises(HubConnectionError, match="cannot be reached"):
        push_adapter(adapted(), "alice/typo-d", token=TOKEN, endpoint=dead_endpoint)
    with pytest.raises(HubConnectionError, match="cannot be reached"):
        push_adapter(adapted(), "typo-d", token=TOKEN, endpoint=dead_endpoint)
    with pytest.raises(AdapterNotCachedError, match="cannot be reached.*not in the cache") as err:
        load_adapter(tiny_llama(), "alice/typo-d", endpoint=dead_endpoint, cache_dir=tmp_path)
    assert isinstance(err.value, LocalEntryNotFoundError) and isinstance(err.value, HubError)
    assert time.monotonic() - start < 10


def test_an_unreachable_hub_falls_back_to_the_cache(hub_server, dead_endpoint, tmp_path):
    model = adapted(4)
    push_adapter(model, "alice/cached-then-down", token=TOKEN, endpoint=hub_server.url)
    load_adapter(tiny_llama(), "alice/cached-then-down", endpoint=hub_server.url, cache_dir=tmp_path)
    again = tiny_llama()
    load_adapter(again, "alice/cached-then-down", endpoint=dead_endpoint, cache_dir=tmp_path)
    assert torch.equal(output(again, tokens(again)), output(model, tokens(model)))


def test_offline_mode_refuses_pushes_at_once(hub_server, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    before = len(hub_server.requests)
    with pytest.raises(HubConnectionError, match="HF_HUB_OFFLINE"):
        push_adapter(adapted(), "alice/offline-push", token=TOKEN, endpoint=hub_server.url)
    assert len(hub_server.requests) == before


def test_downloads_cut_off_again_and_again_are_one_clear_error(hub_server, hf_cache):
    push_adapter(adapted(2), "alice/flaky", token=TOKEN, endpoint=hub_server.url)
    hub_server.truncate_next_downloads(100)
    try:
        with pytest.raises(HubConnectionError, match="broke off again and again.*alice/flaky"):
            load_adapter(tiny_llama(), "alice/flaky", endpoint=hub_server.url)
    finally:
        hub_server.truncate_next_downloads(-hub_server._faults["download"])


def test_cli_reports_hub_failures_on_one_line(hub_server, dead_endpoint, tmp_path):
    folder = tmp_path / "adapter"
    model = adapted()
    from unilora_hf import get_adapter

    get_adapter(model).save_adapter(folder)
    start = time.monotonic()
    line = one_line_error(cli("push", folder, "my-adapter", "--token", TOKEN, "--endpoint", dead_endpoint))
    assert "cannot be reached" in line
    line = one_line_error(cli("info", "alice/nothing-here", "--endpoint", dead_endpoint, "--cache-dir", tmp_path))
    assert "cannot be reached" in line and "not in the cache" in line
    assert time.monotonic() - start < 60  # two process starts included
    line = one_line_error(cli("push", folder, "alice/x", "--token", "hf_wrong", "--endpoint", hub_server.url))
    assert "refused the token" in line
    push_adapter(model, "alice/flaky-cli", token=TOKEN, endpoint=hub_server.url)
    hub_server.truncate_next_downloads(100)
    try:
        line = one_line_error(cli("info", "alice/flaky-cli", "--endpoint", hub_server.url, "--cache-dir", tmp_path))
    finally:
        hub_server.truncate_next_downloads(-hub_server._faults["download"])
    assert "broke off again and again" in line
