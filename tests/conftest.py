"""Shared fixtures: an in-memory Hub server (``unilora_hf.local_hub``) and a throw-away HF cache.

``huggingface_hub`` reads ``HF_ENDPOINT``, ``HF_HOME`` and ``HF_HUB_CACHE`` once, when it is
imported, and the server's port is only known after it starts. So tests never rely on
``HF_ENDPOINT``: they pass ``endpoint=hub_server.url`` (or use the ``hf_api`` fixture) to every
call, and use the ``hf_cache`` fixture (or ``cache_dir=``) for downloads.
"""

from __future__ import annotations

import os

# Before huggingface_hub is imported: no telemetry, and no Xet (the local hub only takes
# "regular" uploads; with hf_xet installed, upload_folder would take another code path).
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["HF_HUB_DISABLE_XET"] = "1"

import pytest  # noqa: E402
from huggingface_hub import HfApi, constants  # noqa: E402

from unilora_hf.local_hub import LocalHubServer  # noqa: E402

# Same settings again, in case huggingface_hub was imported before this file (its flags are
# read from `constants` at call time).
constants.HF_HUB_DISABLE_TELEMETRY = True
constants.HF_HUB_DISABLE_XET = True

HUB_TOKENS = {"hf_test_token": "alice", "hf_other_token": "bob"}


@pytest.fixture(scope="session")
def hub_server():
    """A LocalHubServer for the whole session: ``hf_test_token`` is alice, ``hf_other_token`` is bob."""
    with LocalHubServer(tokens=HUB_TOKENS) as server:
        yield server


@pytest.fixture
def hf_api(hub_server):
    """An ``HfApi`` talking to ``hub_server`` as alice."""
    return HfApi(endpoint=hub_server.url, token="hf_test_token")


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """Point the HF cache (``HF_HOME``, ``HF_HUB_CACHE``) at a temp folder; returns the hub cache dir.

    Sets both the environment variables (for subprocesses) and ``huggingface_hub.constants``
    (already read at import time in this process).
    """
    home = tmp_path / "hf_home"
    cache = home / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache
