"""Finding adapter files: a local folder, or a Hub repo pulled with huggingface_hub's own cache.

Downloads go through ``hf_hub_download`` so the user's cache, token, ``revision`` pinning,
``local_files_only`` and ``HF_HUB_OFFLINE`` behave as everywhere else in the ecosystem. Only the config
and the safetensors file are fetched; nothing downloaded is ever unpickled.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import AdapterFormatError
from .serialization import CONFIG_NAME, PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME, PICKLE_NAMES, WEIGHTS_NAME


def resolve_adapter(adapter: str | os.PathLike, revision: str | None = None, token: str | bool | None = None,
                    cache_dir: str | None = None, local_files_only: bool = False,
                    endpoint: str | None = None) -> Path:
    """A local folder holding the adapter's files: ``adapter`` itself when it is a folder, otherwise the
    snapshot folder of the Hub repo ``adapter`` at ``revision`` in the huggingface_hub cache."""
    if os.path.isdir(adapter):
        return Path(adapter)
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HFValidationError
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
    for config_name, weights_name in ((CONFIG_NAME, WEIGHTS_NAME), (PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME)):
        try:
            config_path = hf_hub_download(filename=config_name, **common)
        except EntryNotFoundError:
            continue
        try:
            hf_hub_download(filename=weights_name, **common)
        except EntryNotFoundError:
            pass  # read_adapter names what is missing (and refuses pickle files)
        return Path(config_path).parent
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
