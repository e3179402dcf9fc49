"""Shared fixtures: an in-memory Hub server (``unilora_hf.local_hub``) and a throw-away HF cache.

``huggingface_hub`` reads ``HF_ENDPOINT``, ``HF_HOME`` and ``HF_HUB_CACHE`` once, when it is
imported, and the server's port is only known after it starts. So tests never rely on
``HF_ENDPOINT``: they pass ``endpoint=hub_server.url`` (or use the ``hf_api`` fixture) to every
call, and use the ``hf_cache`` fixture (or ``cache_dir=``) for downloads.
"""

from __future__ import annotations

import os

import torch

# Triton's mode (compiled or interpreted) is fixed for its library helpers when triton is first imported. On a
# machine without CUDA the kernel tests run in Triton's interpreter: TRITON_INTERPRET=1 before anything imports
# triton. On a CUDA machine triton (with its gluon package, which triton 3.6's compiler imports lazily) is imported
# compiled, and the CPU cases of the kernel tests run in the interpreter through the fixture below.
CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"
else:
    try:
        import triton  # noqa: F401
        import triton.experimental.gluon  # noqa: F401
    except ImportError:
        pass

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


@pytest.fixture(autouse=True)
def _triton_mode(request):
    """On a CUDA machine: Triton's interpreter switch on for the CPU cases, off for the ``gpu`` ones."""
    if not CUDA:
        yield
        return
    try:
        from unilora_hf.kernels.triton_modes import interpreter_switch
    except ImportError:  # no triton
        yield
        return
    with interpreter_switch(request.node.get_closest_marker("gpu") is None):
        yield


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
