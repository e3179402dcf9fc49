"""Finding adapter files: a local folder, or a Hub repo pulled with huggingface_hub's own cache; and
attaching them to a model that is already loaded.

Downloads go through ``hf_hub_download`` so the user's cache, token, ``revision`` pinning,
``local_files_only`` and ``HF_HUB_OFFLINE`` behave as everywhere else in the ecosystem. Only the config
and the safetensors file are fetched; nothing downloaded is ever unpickled.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch.nn as nn

from .errors import AdapterFormatError
from .serialization import (
    CONFIG_NAME, PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME, PICKLE_NAMES, WEIGHTS_NAME, apply_adapter, read_adapter,
)


def _clear_hub_error(exc: Exception, repo_id: str, revision: str | None, token, endpoint: str | None) -> Exception:
    """The same huggingface_hub error type (so ``except RepositoryNotFoundError`` keeps working), with a
    one-line message naming the repo, the likely cause and the fix."""
    from huggingface_hub import constants
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError
    from huggingface_hub.utils import get_token

    where = endpoint or constants.ENDPOINT
    if isinstance(exc, GatedRepoError):
        msg = (f"Hub repo {repo_id} at {where} is gated: accept its conditions on the repo page, then pass a token "
               "of that account (token=... / --token, or `hf auth login`)")
    elif isinstance(exc, RepositoryNotFoundError):
        if token is False or (token is None and get_token() is None):
            sent = "no token was sent"
        else:
            sent = "the token sent cannot read it"
        msg = (f"Hub repo {repo_id} was not found at {where}: the id is wrong, or the repo is private and {sent}. "
               "Check the id, or pass a token that can read it (token=... / --token, or `hf auth login`)")
    elif isinstance(exc, RevisionNotFoundError):
        msg = (f"Hub repo {repo_id} has no revision {revision!r} (a branch, tag or commit sha); check the name, "
               f"e.g. with huggingface_hub.HfApi().list_repo_refs({repo_id!r})")
    else:
        return exc
    return type(exc)(msg, response=exc.response, server_message=exc.server_message)


def resolve_adapter(adapter: str | os.PathLike, revision: str | None = None, token: str | bool | None = None,
                    cache_dir: str | None = None, local_files_only: bool = False,
                    endpoint: str | None = None) -> Path:
    """A local folder holding the adapter's files: ``adapter`` itself when it is a folder, otherwise the
    snapshot folder of the Hub repo ``adapter`` at ``revision`` in the huggingface_hub cache.

    Raises AdapterFormatError when the id is invalid or the repo holds no adapter; huggingface_hub's
    RepositoryNotFoundError / RevisionNotFoundError (with a one-line message) for a missing, private or
    gated repo and a missing revision; LocalEntryNotFoundError when downloads are off (``local_files_only``
    or ``HF_HUB_OFFLINE=1``) or the Hub cannot be reached, and the cache has no copy.
    """
    if os.path.isdir(adapter):
        return Path(adapter)
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import (
        HFValidationError, HfHubHTTPError, LocalEntryNotFoundError, RemoteEntryNotFoundError,
    )
    from huggingface_hub.utils import validate_repo_id

    repo_id = str(adapter)
    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise AdapterFormatError(
            f"{repo_id!r} is neither a local folder nor a valid Hub repo id ({exc}); pass a folder path or 'user/name'"
        ) from None
    common = dict(repo_id=repo_id, revision=revision, token=token, cache_dir=cache_dir,
                  local_files_only=local_files_only, endpoint=endpoint)
    cache_misses: list[str] = []
    try:
        for config_name, weights_name in ((CONFIG_NAME, WEIGHTS_NAME), (PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME)):
            try:
                config_path = hf_hub_download(filename=config_name, **common)
            except LocalEntryNotFoundError as exc:
                cache_misses.append(str(exc))
                continue
            except RemoteEntryNotFoundError:
                continue
            try:
                hf_hub_download(filename=weights_name, **common)
            except RemoteEntryNotFoundError:
                pass  # read_adapter names what is missing (and refuses pickle files)
            return Path(config_path).parent
    except LocalEntryNotFoundError as exc:
        cache_misses.append(str(exc))
    except HfHubHTTPError as exc:
        raise _clear_hub_error(exc, repo_id, revision, token, endpoint) from None
    if cache_misses:
        raise LocalEntryNotFoundError(
            f"the adapter {repo_id} (revision {revision or 'main'}) is not in the huggingface_hub cache "
            f"({cache_dir or 'default cache'}) and the Hub cannot be asked ({' '.join(cache_misses[-1].split())}). "
            "Download it once online, or check the cache_dir / revision"
        )
    files = HfApi(endpoint=endpoint).list_repo_files(repo_id, revision=revision, token=token)
    if set(files) & set(PICKLE_NAMES):
        raise AdapterFormatError(
            f"Hub repo {repo_id} holds only pickle weights ({sorted(set(files) & set(PICKLE_NAMES))}); unilora_hf "
            "never unpickles downloads. Ask the author for a safetensors adapter."
        )
    raise AdapterFormatError(
        f"Hub repo {repo_id} (revision {revision or 'main'}) holds no Uni-LoRA adapter ({CONFIG_NAME} or "
        f"{PEFT_CONFIG_NAME}); it holds: {', '.join(sorted(files)) or 'no files'}"
    )


def load_adapter(model: nn.Module, adapter: str | os.PathLike, *, revision: str | None = None,
                 token: str | bool | None = None, cache_dir: str | os.PathLike | None = None,
                 local_files_only: bool = False, endpoint: str | None = None):
    """Attach a stored adapter to ``model``, an already loaded base model, in place; returns the
    `UniLoraAdapter` handle (also ``unilora_hf.get_adapter(model)``).

    ``adapter`` is a local folder or a Hub repo id; ``revision`` (branch, tag or commit sha), ``token``,
    ``cache_dir``, ``local_files_only`` and ``endpoint`` mean what they mean in ``hf_hub_download``, and
    ``HF_HUB_OFFLINE=1`` serves the adapter from the cache. Either file format loads (unilora_hf's native
    one, or PEFT's UNILORA one). The projection is rebuilt from the stored seed, the model's adapted
    layers are checked against the stored layout (LayoutMismatchError names the first difference), and
    θ_d (float32, on the device of the model's first adapted weight) and any trained heads (in the model's
    dtype) are loaded; when a check fails, the model is left as it was. The adapter starts unmerged and
    enabled; the model's train/eval mode is left as it is.
    """
    from .errors import AdapterStateError
    from .model import has_adapter, unwrap

    if not isinstance(model, nn.Module):
        raise TypeError(
            f"model must be a loaded torch.nn.Module (e.g. from AutoModel.from_pretrained), got {type(model).__name__}; "
            "to load the base and the adapter in one call use UniLoraAutoModel.from_pretrained(base, adapter)"
        )
    model = unwrap(model)
    if has_adapter(model):
        raise AdapterStateError(
            "this model already has a Uni-LoRA adapter; call unilora_hf.get_adapter(model).unload() first, "
            "or load the new adapter onto a fresh base model"
        )
    folder = resolve_adapter(adapter, revision=revision, token=token,
                             cache_dir=None if cache_dir is None else str(cache_dir),
                             local_files_only=local_files_only, endpoint=endpoint)
    return apply_adapter(model, read_adapter(folder))
