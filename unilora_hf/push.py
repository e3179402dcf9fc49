"""Publishing an adapter: the model card, and one all-or-nothing commit through huggingface_hub.

``push_adapter`` uploads only the adapter's config and safetensors file plus README.md (and a small
loss-curve SVG when a training history is given) in ONE ``create_commit``: the Hub applies a commit
whole or not at all, so a failed push leaves the repo as it was and can simply be retried.
"""

from __future__ import annotations

import fnmatch
import os
import platform
import tempfile
from importlib import metadata, resources
from pathlib import Path
from typing import Any

from .errors import HubAuthError, HubConnectionError, HubError, HubPushError, InvalidArgumentError, InvalidConfigError
from .projection import PEFT
from .serialization import (
    CONFIG_NAME, PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME, WEIGHTS_NAME, AdapterFiles, publishable, read_adapter,
)

CARD_MARKER = "library_name: unilora_hf"
PIPELINE_TAGS = {
    "AutoModelForCausalLM": "text-generation",
    "AutoModelForSequenceClassification": "text-classification",
    "AutoModelForTokenClassification": "token-classification",
    "AutoModelForQuestionAnswering": "question-answering",
    "AutoModelForSeq2SeqLM": "text2text-generation",
    "AutoModel": "feature-extraction",
}


def template_path() -> Path:
    """hub_templates/adapter_card.md: in the source tree, or inside the installed wheel."""
    local = Path(__file__).resolve().parents[1] / "hub_templates" / "adapter_card.md"
    if local.is_file():
        return local
    return Path(str(resources.files("unilora_hf.hub_templates").joinpath("adapter_card.md")))


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("unilora_hf", "torch", "transformers", "huggingface_hub", "safetensors", "peft", "trl"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def _is_hub_id(name: str) -> bool:
    """Whether ``name`` reads as a Hub model id (and is not a local folder or path)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if os.path.isabs(name) or name.startswith((".", "~")) or os.path.isdir(name) or name.count("/") > 1:
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def base_parameter_count(model) -> int:
    """Parameters of the base model under an adapter (θ_d and the trained head copies left out)."""
    return sum(p.numel() for n, p in model.named_parameters() if "unilora_theta_d" not in n
               and ".modules_to_save." not in n)


def _shown_metrics(metrics: dict) -> dict:
    """The metrics worth a row in the card (no timings), floats to 4 decimals."""
    return {k: f"{v:.4f}" if isinstance(v, float) else v for k, v in metrics.items()
            if not k.endswith(("_runtime", "_per_second")) and k != "epoch"}


def _human(n: int) -> str:
    return f"{n / 1024:.1f} KiB" if n < 1024**2 else f"{n / 1024**2:.1f} MiB"


def loss_svg(history: list[tuple[int, float]], width: int = 480, height: int = 200) -> str:
    """A small SVG line chart of (step, loss)."""
    steps, losses = [s for s, _ in history], [l for _, l in history]
    x0, x1, y0, y1 = min(steps), max(steps), min(losses), max(losses)
    sx = (width - 60) / max(x1 - x0, 1)
    sy = (height - 40) / max(y1 - y0, 1e-12)
    points = " ".join(f"{50 + (s - x0) * sx:.1f},{height - 25 - (l - y0) * sy:.1f}" for s, l in history)
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
        f'font-size="11"><rect width="100%" height="100%" fill="white"/>'
        f'<polyline fill="none" stroke="#3b6ea5" stroke-width="1.5" points="{points}"/>'
        f'<text x="50" y="12">training loss: {losses[0]:.4g} at step {x0} to {losses[-1]:.4g} at step {x1}</text>'
        f'<text x="4" y="{height - 25}">{y0:.3g}</text><text x="4" y="25">{y1:.3g}</text>'
        f'<text x="50" y="{height - 8}">step {x0}</text><text x="{width - 70}" y="{height - 8}">step {x1}</text></svg>\n'
    )


def _as_list(value) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else [str(v) for v in value]


def render_card(files: AdapterFiles, repo_id: str, training_summary: dict | None = None,
                base_params: int | None = None, license: str | None = None,
                datasets: list[str] | None = None, adapter_bytes: int | None = None,
                card_data: dict[str, Any] | None = None, model_name: str | None = None) -> str:
    """The README.md of an adapter repo, rendered from hub_templates/adapter_card.md.

    ``card_data``: the keywords of ``Trainer.push_to_hub`` / ``create_model_card`` and trl's (``language``,
    ``license``, ``tags``, ``finetuned_from``, ``tasks``, ``dataset_tags``, ``dataset``, ``dataset_args``,
    ``dataset_name``), which land in the card's metadata as they do in Trainer's cards."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    extra = dict(card_data or {})
    cfg, meta, base = files.config, files.meta, files.base
    summary = training_summary or {}
    license = license or extra.get("license")
    datasets = list(dict.fromkeys(_as_list(datasets) + _as_list(extra.get("dataset_tags"))
                                  + _as_list(extra.get("dataset")) + _as_list(extra.get("dataset_name")))) or None
    base_id = base.name_or_path
    hub_base = str(base_id) if base_id and _is_hub_id(str(base_id)) else None
    if hub_base is None and extra.get("finetuned_from") and _is_hub_id(str(extra["finetuned_from"])):
        hub_base = str(extra["finetuned_from"])
    # A base that was a local folder cannot be named in a published snippet: show a placeholder path.
    local_name = base.local_name or (Path(str(base_id)).name if base_id and not hub_base else None)
    base_repr = repr(hub_base or (f"path/to/{local_name}" if local_name else "BASE_MODEL_ID"))
    auto_class = base.auto_class or "AutoModel"
    tasks = _as_list(extra.get("tasks"))
    pipeline = PIPELINE_TAGS.get(auto_class) if auto_class != "AutoModel" or not tasks else None
    pipeline = pipeline or (tasks[0] if tasks else PIPELINE_TAGS.get(auto_class))
    metrics = summary.get("metrics") or {}
    eval_results = [
        EvalResult(task_type=pipeline or "other", dataset_type=(datasets or ["custom"])[0],
                   dataset_name=(datasets or ["custom"])[0], metric_type=k.removeprefix("eval_"), metric_value=v,
                   dataset_args=(_as_list(extra.get("dataset_args")) or [None])[0])
        for k, v in metrics.items() if isinstance(v, (int, float)) and k not in ("eval_runtime", "epoch")
        and not k.endswith(("_per_second", "_runtime"))
    ]
    tags = ["unilora", "uni-lora", "lora", "adapter"] + (["peft"] if cfg.projection == PEFT else [])
    tags += [t for t in _as_list(extra.get("tags")) + tasks[1:] if t not in tags]
    title = model_name or extra.get("model_name") or repo_id.split("/")[-1]
    data = ModelCardData(
        base_model=hub_base, library_name="unilora_hf", pipeline_tag=pipeline, tags=tags,
        license=license, datasets=datasets, eval_results=eval_results or None, language=extra.get("language"),
        model_name=title, base_model_relation="adapter" if hub_base else None,
    )
    trainable = cfg.theta_d_length + sum(t.numel() for t in files.tensors.values())
    targets = cfg.target_modules if cfg.target_modules is not None else "architecture default"
    card = ModelCard.from_template(
        data, template_path=str(template_path()),
        model_name=title, base_model=hub_base, base_model_repr=base_repr, base_local_name=local_name,
        base_model_type=base.model_type,
        repo_id_repr=repr(repo_id), repo_id_plain=repo_id, peft_loadable=cfg.projection == PEFT,
        auto_class=auto_class, r=cfg.r, theta_d_length=cfg.theta_d_length, D=meta.get("D", 0),
        projection=cfg.projection, projection_spec=meta.get("projection_spec", "peft-0.21"),
        proj_seed=cfg.proj_seed, targets=targets, num_layers=meta.get("layout", {}).get("num_layers", "unknown"),
        modules_to_save=", ".join(cfg.modules_to_save or []), trainable=trainable, base_params=base_params,
        trainable_share=f"{100 * trainable / base_params:.4f}%" if base_params else "",
        fingerprint=meta.get("layout", {}).get("fingerprint", "not recorded"),
        hyperparameters=summary.get("hyperparameters") or {}, metrics=_shown_metrics(metrics),
        loss_plot=bool(summary.get("loss_history")), versions=_versions(),
        adapter_bytes_human=_human(adapter_bytes or 4 * cfg.theta_d_length),
    )
    text = str(card)
    if "{{" in text or "{%" in text:
        raise RuntimeError("the model card template left a Jinja expression unrendered")
    return text.replace("![training loss](loss.png)", "![training loss](training_loss.svg)")


def resolve_repo_id(api, repo_id: str, token) -> str:
    """``repo_id`` with its namespace: a bare name (``"my-adapter"``) becomes ``"<user>/my-adapter"`` for the
    user the token belongs to, asked before anything is created. InvalidConfigError for an invalid id."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise InvalidConfigError(f"invalid repo id {repo_id!r}: {str(exc).rstrip('.')}. Use 'namespace/name'.") from None
    if "/" in repo_id:
        return repo_id
    try:
        user = api.whoami(token=token)
    except Exception as exc:  # noqa: BLE001
        raise _push_error(exc, repo_id, token, api.endpoint, doing="asking the Hub who the token belongs to for") from None
    name = user.get("name") if isinstance(user, dict) else None
    if not name:
        raise HubAuthError(f"the Hub did not say which user the token belongs to; pass repo_id as 'namespace/{repo_id}'")
    return f"{name}/{repo_id}"


def _push_error(exc: Exception, repo_id: str, token, endpoint, doing: str = "pushing to") -> Exception:
    from .hub import hub_error

    error = hub_error(exc, repo_id, None, token, endpoint, doing=doing)
    if isinstance(error, HubAuthError):
        return HubAuthError(f"{error} (nothing was uploaded to {repo_id})")
    if isinstance(error, HubError):
        return error
    return HubPushError(f"{doing} {repo_id} failed ({type(exc).__name__}: {' '.join(str(exc).split())[:300]})")


# What a checkpoint folder pushes (hub_strategy "checkpoint"/"all_checkpoints"): the adapter and what resuming
# needs. Never training_args.bin, the tokenizer or a LoRA export.
CHECKPOINT_FILES = (CONFIG_NAME, WEIGHTS_NAME, PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME, "optimizer.pt", "scheduler.pt",
                    "scaler.pt", "trainer_state.json", "rng_state*.pth")


def _staged(contents: dict[str, bytes], folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in contents.items():
        (folder / name).write_bytes(data)
    return folder


def push_adapter(model_or_folder, repo_id: str, *, private: bool | None = None, token: str | None = None,
                 revision: str | None = None, commit_message: str | None = None, create_pr: bool = False,
                 endpoint: str | None = None, training_summary: dict[str, Any] | None = None,
                 model=None, overwrite_card: bool = False, license: str | None = None,
                 datasets: list[str] | None = None, card_data: dict[str, Any] | None = None,
                 extra_folders: dict[str, str | os.PathLike] | None = None,
                 base_model_name_or_path: str | None = None) -> str:
    """Upload an adapter (a model carrying one, or a saved folder) to ``repo_id`` in one commit.

    A bare name resolves to the token's user namespace first. Creates the repo if needed. Uploads the
    adapter config and safetensors file, README.md (rendered from the template unless the repo already has
    a README that is not ours and ``overwrite_card`` is False) and, when ``training_summary`` has a loss
    history, ``training_loss.svg``. Returns the commit URL (the pull-request URL with ``create_pr=True``).

    A base model recorded as a local folder is never published: the pushed config names
    ``base_model_name_or_path`` (a Hub id) instead, or no base (with the folder's name as ``local_name``).
    ``card_data``: Trainer's / trl's card keywords (see `render_card`). ``extra_folders``: checkpoint folders to
    upload in the same commit under the given paths (``last-checkpoint``): their adapter and what resuming
    needs (`CHECKPOINT_FILES`), never ``training_args.bin`` or the tokenizer.

    A failed push leaves nothing behind: a Hub commit is all or nothing, and a repo this push created is
    deleted again. Errors: HubAuthError (token missing, wrong or without write access), HubConnectionError
    (Hub unreachable, or ``HF_HUB_OFFLINE=1``), HubPushError (the Hub refused or broke off the upload),
    InvalidConfigError (invalid repo id), AdapterFormatError (the folder holds no single adapter).
    """
    from huggingface_hub import CommitOperationAdd, HfApi, constants

    if constants.HF_HUB_OFFLINE:
        raise HubConnectionError(f"HF_HUB_OFFLINE=1 is set: pushing to {repo_id} needs the Hub. Unset HF_HUB_OFFLINE "
                                 "and push again")
    api = HfApi(endpoint=endpoint, token=token)
    with tempfile.TemporaryDirectory() as tmp:
        if isinstance(model_or_folder, (str, os.PathLike)):
            folder = Path(model_or_folder)
        else:
            model = model_or_folder if model is None else model
            inner = model_or_folder  # a model carrying an adapter (inside DDP / torch.compile), or the handle itself
            while "unilora_adapter" not in getattr(inner, "__dict__", {}) and (
                    getattr(inner, "module", None) is not None or getattr(inner, "_orig_mod", None) is not None):
                inner = getattr(inner, "module", None) or getattr(inner, "_orig_mod", None)
            adapter = getattr(inner, "__dict__", {}).get("unilora_adapter")
            adapter = model_or_folder if hasattr(model_or_folder, "save_adapter") else adapter
            if adapter is None:
                raise InvalidArgumentError(
                    f"push_adapter takes a model carrying a Uni-LoRA adapter or a saved adapter folder, got "
                    f"{type(model_or_folder).__name__}"
                )
            adapter.save_adapter(tmp)
            folder = Path(tmp)
        files = read_adapter(folder)  # refuses a folder with two adapters (a LoRA export beside its adapter is fine)
        names = (CONFIG_NAME, WEIGHTS_NAME) if files.format == "native" else (PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME)
        base_params = base_parameter_count(model) if model is not None else None
        contents = publishable(folder, files, base_model_name_or_path)
        files = read_adapter(_staged(contents, Path(tmp) / "publish"))
        repo_id = resolve_repo_id(api, repo_id, token)
        created = False
        try:
            if not api.repo_exists(repo_id, token=token):
                api.create_repo(repo_id, private=private, exist_ok=True, token=token)
                created = True
            ops = [CommitOperationAdd(path_in_repo=n, path_or_fileobj=data) for n, data in contents.items()]
            for prefix, extra in (extra_folders or {}).items():
                for path in sorted(Path(extra).iterdir()):
                    if path.is_file() and any(fnmatch.fnmatch(path.name, p) for p in CHECKPOINT_FILES):
                        ops.append(CommitOperationAdd(path_in_repo=f"{prefix}/{path.name}", path_or_fileobj=str(path)))
            keep_readme = False
            if not overwrite_card and api.file_exists(repo_id, "README.md", revision=revision, token=token):
                existing = Path(api.hf_hub_download(repo_id, "README.md", revision=revision, token=token)).read_text()
                keep_readme = CARD_MARKER not in existing
            if not keep_readme:
                card = render_card(files, repo_id, training_summary, base_params, license, datasets,
                                   adapter_bytes=len(contents[names[1]]), card_data=card_data)
                ops.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card.encode()))
                history = (training_summary or {}).get("loss_history")
                if history:
                    ops.append(CommitOperationAdd(path_in_repo="training_loss.svg",
                                                  path_or_fileobj=loss_svg(history).encode()))
            info = api.create_commit(repo_id, ops, commit_message=commit_message or "Upload Uni-LoRA adapter",
                                     revision=revision, create_pr=create_pr, token=token)
        except Exception as exc:  # noqa: BLE001 — every failure: clean up, then one of our errors
            removed = ""
            if created:
                try:
                    api.delete_repo(repo_id, token=token, missing_ok=True)
                    removed = f"; the repo {repo_id} this push created was deleted again"
                except Exception:  # noqa: BLE001
                    removed = f"; the empty repo {repo_id} this push created could not be deleted"
            error = _push_error(exc, repo_id, token, endpoint)
            if isinstance(error, (HubAuthError, HubConnectionError)):
                raise type(error)(f"{error}{removed}") from None
            status = getattr(getattr(exc, "response", None), "status_code", None)
            why = getattr(exc, "server_message", None) or " ".join(str(exc).split())[:300]
            raise HubPushError(
                f"pushing to {repo_id} failed ({f'HTTP {status}: ' if status else ''}{why}). Nothing was committed "
                f"(a Hub commit is all or nothing){removed}; run the push again"
            ) from None
        return info.pr_url if create_pr and info.pr_url else info.commit_url
