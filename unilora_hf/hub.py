"""Finding adapter files: a local folder, or a Hub repo pulled with huggingface_hub's own cache.

Downloads go through ``hf_hub_download`` so the user's cache, token, ``revision`` pinning,
``local_files_only`` and ``HF_HUB_OFFLINE`` behave as everywhere else in the ecosystem. One request
(``model_info``, no retries, a short timeout) first says whether the Hub answers, which adapter files the
revision holds and at which commit; the files are then fetched pinned to that commit. When the Hub cannot
be reached the cache serves the revision if it holds it, else `HubConnectionError` says so within
seconds. Only the config and the safetensors file are fetched; nothing downloaded is ever unpickled.

Errors are unilora_hf's and huggingface_hub's at once: `AdapterRepoNotFoundError` is a
``RepositoryNotFoundError``, `AdapterRevisionNotFoundError` a ``RevisionNotFoundError``,
`AdapterNotCachedError` a ``LocalEntryNotFoundError``; each message is one line naming the repo and the fix.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import (
    AdapterFormatError, HubAuthError, HubConnectionError, HubError, UnsafeAdapterError,
)
from .serialization import (
    CONFIG_NAME, PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME, PICKLE_NAMES, WEIGHTS_NAME, read_adapter,
)

PROBE_TIMEOUT = 10.0

try:  # huggingface_hub is a dependency; its error types are bases of ours
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError
except ImportError:  # pragma: no cover
    raise


class AdapterRepoNotFoundError(HubError, RepositoryNotFoundError):
    """The adapter repo does not exist, is private (and the token cannot read it) or is gated."""

    def __init__(self, message: str, response=None):
        RepositoryNotFoundError.__init__(self, message, response=response)


class AdapterRevisionNotFoundError(HubError, RevisionNotFoundError):
    """The adapter repo has no such revision."""

    def __init__(self, message: str, response=None):
        RevisionNotFoundError.__init__(self, message, response=response)


class AdapterNotCachedError(HubConnectionError, LocalEntryNotFoundError):
    """Downloads are off or the Hub cannot be reached, and the cache does not hold the adapter."""


def is_network_error(exc: BaseException) -> bool:
    """A failure to reach the Hub (connection refused, DNS, timeout, cut transfer), as opposed to an answer."""
    module = type(exc).__module__ or ""
    if module.startswith(("httpx", "httpcore", "h11", "ssl")):
        return True
    from huggingface_hub.errors import HfHubHTTPError

    return isinstance(exc, (ConnectionError, TimeoutError)) and not isinstance(exc, HfHubHTTPError)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300] or type(exc).__name__


def _token_note(token) -> str:
    from huggingface_hub.utils import get_token

    if token is False or (token is None and get_token() is None):
        return "no token was sent"
    return "the token sent cannot read it"


def hub_error(exc: Exception, repo_id: str, revision: str | None, token, endpoint: str | None,
              doing: str = "reading") -> Exception:
    """One of our errors for a huggingface_hub / network failure while ``doing`` something with ``repo_id``."""
    from huggingface_hub import constants
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError

    where = endpoint or constants.ENDPOINT
    response = getattr(exc, "response", None)
    if isinstance(exc, GatedRepoError):
        return AdapterRepoNotFoundError(
            f"Hub repo {repo_id} at {where} is gated: accept its conditions on the repo page, then pass a token of "
            "that account (token=... / --token, or `hf auth login`)", response)
    if isinstance(exc, RepositoryNotFoundError):
        return AdapterRepoNotFoundError(
            f"Hub repo {repo_id} was not found at {where}: the id is wrong, or the repo is private and "
            f"{_token_note(token)}. Check the id, or pass a token that can read it (token=... / --token, or "
            "`hf auth login`)", response)
    if isinstance(exc, RevisionNotFoundError):
        return AdapterRevisionNotFoundError(
            f"Hub repo {repo_id} has no revision {revision!r} (a branch, tag or commit sha); check the name, e.g. "
            f"with huggingface_hub.HfApi().list_repo_refs({repo_id!r})", response)
    if isinstance(exc, HfHubHTTPError):
        status = getattr(response, "status_code", None)
        if status in (401, 403):
            return HubAuthError(
                f"the Hub at {where} refused the token for {repo_id} (HTTP {status}): pass a valid token with "
                "token=... / --token, or log in with `hf auth login`")
        return HubError(f"{doing} {repo_id} at {where} failed (HTTP {status}): {_one_line(exc)}; try again later")
    if is_network_error(exc) and any(k in type(exc).__name__ for k in ("Protocol", "Read", "Incomplete", "Chunked")):
        return HubConnectionError(
            f"the connection to the Hub at {where} broke off again and again while {doing} {repo_id} "
            f"({type(exc).__name__}: {_one_line(exc)}). Try again later")
    if is_network_error(exc):
        return HubConnectionError(
            f"the Hub at {where} cannot be reached while {doing} {repo_id} ({type(exc).__name__}: {_one_line(exc)}). "
            "Check the network and HF_ENDPOINT, or use a cached copy (local_files_only=True / HF_HUB_OFFLINE=1)")
    return exc


def _cached_snapshot(repo_id: str, revision: str | None, cache_dir, token) -> Path | None:
    """The cached snapshot folder of ``repo_id`` at ``revision`` when it holds an adapter config, else None."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    for name in (CONFIG_NAME, PEFT_CONFIG_NAME):
        try:
            return Path(hf_hub_download(repo_id, name, revision=revision, cache_dir=cache_dir, token=token,
                                        local_files_only=True)).parent
        except (EntryNotFoundError, OSError, ValueError):
            continue
    return None


def resolve_adapter(adapter: str | os.PathLike, revision: str | None = None, token: str | bool | None = None,
                    cache_dir: str | os.PathLike | None = None, local_files_only: bool = False,
                    endpoint: str | None = None) -> Path:
    """A local folder holding the adapter's files: ``adapter`` itself when it is a folder, otherwise the
    snapshot folder of the Hub repo ``adapter`` at ``revision`` in the huggingface_hub cache.

    Raises AdapterFormatError when the id is invalid or the repo holds no adapter (or two);
    AdapterRepoNotFoundError / AdapterRevisionNotFoundError for a missing, private or gated repo and a missing
    revision; HubAuthError for a refused token; AdapterNotCachedError when downloads are off (``local_files_only``
    or ``HF_HUB_OFFLINE=1``) or the Hub cannot be reached, and the cache has no copy; HubError for a download
    that keeps failing.
    """
    if os.path.isdir(adapter):
        return Path(adapter)
    from huggingface_hub import HfApi, constants, hf_hub_download
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    repo_id = str(adapter)
    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise AdapterFormatError(
            f"{repo_id!r} is neither a local folder nor a valid Hub repo id ({_one_line(exc)}); pass an existing "
            "folder or 'user/name'"
        ) from None
    cache_dir = None if cache_dir is None else str(cache_dir)
    where = endpoint or constants.ENDPOINT
    if local_files_only or constants.HF_HUB_OFFLINE:
        folder = _cached_snapshot(repo_id, revision, cache_dir, token)
        if folder is None:
            why = "local_files_only=True" if local_files_only else "HF_HUB_OFFLINE=1"
            raise AdapterNotCachedError(
                f"the adapter {repo_id} (revision {revision or 'main'}) is not in the huggingface_hub cache "
                f"({cache_dir or constants.HF_HUB_CACHE}) and downloads are off ({why}). Download it once online, or "
                "check the cache_dir / revision"
            )
        return folder
    try:
        info = HfApi(endpoint=endpoint).model_info(repo_id, revision=revision, token=token, timeout=PROBE_TIMEOUT)
    except Exception as exc:  # noqa: BLE001 — every failure becomes one of our errors below
        error = hub_error(exc, repo_id, revision, token, endpoint)
        if isinstance(error, HubConnectionError):
            folder = _cached_snapshot(repo_id, revision, cache_dir, token)
            if folder is not None:
                return folder
            raise AdapterNotCachedError(
                f"the Hub at {where} cannot be reached ({type(exc).__name__}: {_one_line(exc)}) and the adapter "
                f"{repo_id} (revision {revision or 'main'}) is not in the cache. Check the network and HF_ENDPOINT"
            ) from None
        if error is exc:
            raise
        raise error from None
    files = {s.rfilename for s in (info.siblings or [])}
    native, peft = CONFIG_NAME in files, PEFT_CONFIG_NAME in files
    if native and peft:
        raise AdapterFormatError(
            f"Hub repo {repo_id} holds two adapters ({CONFIG_NAME} and {PEFT_CONFIG_NAME}); which one to load is "
            "ambiguous. Ask the author to keep one of them"
        )
    if not (native or peft):
        if files & set(PICKLE_NAMES):
            raise UnsafeAdapterError(
                f"Hub repo {repo_id} holds only pickle weights ({sorted(files & set(PICKLE_NAMES))}); unilora_hf "
                "never unpickles downloads. Ask the author for a safetensors adapter."
            )
        raise AdapterFormatError(
            f"Hub repo {repo_id} (revision {revision or 'main'}) holds no Uni-LoRA adapter ({CONFIG_NAME} or "
            f"{PEFT_CONFIG_NAME}); it holds: {', '.join(sorted(files)[:30]) or 'no files'}"
        )
    wanted = (CONFIG_NAME, WEIGHTS_NAME) if native else (PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME)
    folder = None
    for name in wanted:
        if name not in files:
            continue  # read_adapter names what is missing
        try:
            # By the revision's name, so the cache records the ref for later offline use; a push landing
            # between the two files is caught by the digest that ties them together.
            path = hf_hub_download(repo_id, name, revision=revision, token=token, cache_dir=cache_dir,
                                   endpoint=endpoint, etag_timeout=PROBE_TIMEOUT)
        except Exception as exc:  # noqa: BLE001
            error = hub_error(exc, repo_id, revision, token, endpoint, doing=f"downloading {name} of")
            if error is exc:
                raise
            raise error from None
        folder = Path(path).parent
    return folder
