"""Adapter files on disk: writing them, reading them back with every check, and applying them to a model.

Two on-disk formats, chosen by the projection kind:

``native`` — ``unilora_config.json`` + ``unilora_model.safetensors`` (keys ``unilora.theta_d`` and
    ``model.<param name>`` for heads and biases). PEFT looks for ``adapter_config.json`` and finds
    none, so it can never mistake such an adapter for one of its own and rebuild another projection.
``peft`` — exactly PEFT 0.21.2's files: ``adapter_config.json`` (``peft_type: "UNILORA"``) +
    ``adapter_model.safetensors`` (``base_model.unilora_theta_d``, ``base_model.model.<param name>``).
    Our metadata (spec version, D, layout fingerprint, base revision) rides in the safetensors header,
    which PEFT ignores.

Only safetensors is read; a folder with pickle files alone is refused, never unpickled.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import UniLoraConfig
from .errors import AdapterFormatError, AdapterStateError, LayoutMismatchError
from .layout import build_layout, check_layout, compact, fingerprint, resolve_targets
from .projection import NATIVE, PEFT, SPEC_VERSIONS
from .version import __version__

CONFIG_NAME = "unilora_config.json"
WEIGHTS_NAME = "unilora_model.safetensors"
PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT_VERSION = 1
THETA_KEY = "unilora.theta_d"
PEFT_THETA_KEY = "base_model.unilora_theta_d"
PICKLE_NAMES = ("adapter_model.bin", "unilora_model.bin", "pytorch_model.bin")
REQUIRED_KEYS = ("library", "format_version", "projection_spec", "config", "D", "layout", "base_model")

AUTO_CLASS_TO_PEFT_TASK = {
    "AutoModelForCausalLM": "CAUSAL_LM",
    "AutoModelForSequenceClassification": "SEQ_CLS",
    "AutoModelForTokenClassification": "TOKEN_CLS",
    "AutoModelForQuestionAnswering": "QUESTION_ANS",
    "AutoModelForSeq2SeqLM": "SEQ_2_SEQ_LM",
    "AutoModel": "FEATURE_EXTRACTION",
}
PEFT_TASK_TO_AUTO_CLASS = {v: k for k, v in AUTO_CLASS_TO_PEFT_TASK.items()}
CLASSIFIER_CONFIG_KEYS = ("num_labels", "id2label", "label2id", "problem_type")


@dataclass
class AdapterFiles:
    """The content of an adapter folder, validated."""

    config: UniLoraConfig
    theta_d: torch.Tensor
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)
    source: str = "unilora_hf"  # or "peft": written by PEFT itself, no layout metadata

    @property
    def base_model(self) -> dict[str, Any]:
        return self.meta.get("base_model", {})


def auto_class_of(model: torch.nn.Module) -> str:
    """The transformers Auto class that builds ``model``'s class ("AutoModel" when none fits better)."""
    from transformers.models.auto import modeling_auto as ma

    # FSDP2 re-classes a sharded model as a subclass named FSDP<Name>: look through the MRO.
    name = next((c.__name__ for c in type(model).__mro__ if not c.__name__.startswith("FSDP")), type(model).__name__)
    for auto, mapping in (
        ("AutoModelForCausalLM", ma.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES),
        ("AutoModelForSequenceClassification", ma.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES),
        ("AutoModelForTokenClassification", ma.MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES),
        ("AutoModelForQuestionAnswering", ma.MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES),
        ("AutoModelForSeq2SeqLM", ma.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES),
        ("AutoModelForMaskedLM", ma.MODEL_FOR_MASKED_LM_MAPPING_NAMES),
    ):
        for value in mapping.values():
            if name == value or (isinstance(value, (list, tuple)) and name in value):
                return auto
    return "AutoModel"


def adapter_metadata(adapter, base_model_name_or_path: str | None = None, revision: str | None = None) -> dict:
    """Everything besides θ_d and the heads that a loader needs: spec, D, layout, base model."""
    model = adapter.model
    cfg = getattr(model, "config", None)
    base = {
        "name_or_path": base_model_name_or_path or getattr(cfg, "_name_or_path", None) or None,
        "revision": revision or adapter.base_model_revision or getattr(cfg, "_commit_hash", None),
        "auto_class": auto_class_of(model),
        "model_type": getattr(cfg, "model_type", None),
        "config_overrides": {},
    }
    if base["auto_class"] == "AutoModelForSequenceClassification" and cfg is not None:
        overrides = {k: getattr(cfg, k, None) for k in CLASSIFIER_CONFIG_KEYS}
        base["config_overrides"] = {k: v for k, v in overrides.items() if v is not None}
    return {
        "library": "unilora_hf",
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "projection_spec": adapter.projection.spec_version,
        "D": adapter.D,
        "layout": {"fingerprint": adapter.fingerprint, "num_layers": len(adapter.layers),
                   "groups": compact(adapter.layers)},
        "base_model": base,
    }


def _peft_config_dict(adapter, meta: dict) -> dict:
    cfg = adapter.config
    targets = cfg.target_modules
    if not isinstance(targets, list):  # a regex, 'all-linear' or a default: write the resolved names
        targets = [spec.name for spec in adapter.layers]
    return {
        "auto_mapping": None,
        "base_model_name_or_path": meta["base_model"]["name_or_path"],
        "bias": cfg.bias,
        "fan_in_fan_out": any(s.fan_in_fan_out for s in adapter.layers),
        "inference_mode": True,
        "init_theta_d_bound": cfg.init_theta_d_bound,
        "init_weights": True,
        "layers_pattern": cfg.layers_pattern,
        "layers_to_transform": cfg.layers_to_transform,
        "modules_to_save": cfg.modules_to_save,
        "peft_type": "UNILORA",
        "peft_version": "0.21.2",
        "proj_seed": cfg.proj_seed,
        "r": cfg.r,
        "revision": meta["base_model"]["revision"],
        "save_indices": False,
        "target_modules": targets,
        "task_type": AUTO_CLASS_TO_PEFT_TASK.get(meta["base_model"]["auto_class"]),
        "theta_d_length": cfg.theta_d_length,
        "unilora_dropout": cfg.unilora_dropout,
    }


def save_adapter(adapter, save_directory: str | os.PathLike, base_model_name_or_path: str | None = None,
                 revision: str | None = None, state=None) -> list[str]:
    """Write the adapter into ``save_directory`` (created if needed); returns the two paths written.
    Files are written to temporary names and renamed, so a failure leaves no half-written adapter.

    ``state``: the whole trained tensors (`unilora_hf.distributed.AdapterState`) when FSDP shards the live
    ones; gather them with ``gather_adapter_state(model)`` on every rank, then save on one."""
    out = Path(save_directory)
    if state is None:
        state = _live_state(adapter)
    out.mkdir(parents=True, exist_ok=True)
    meta = adapter_metadata(adapter, base_model_name_or_path, revision)
    theta = state.theta_d.detach().float().cpu().contiguous()
    extras = {k: v.detach().cpu().contiguous() for k, v in state.tensors.items()}
    if adapter.config.projection == PEFT:
        config_text = json.dumps(_peft_config_dict(adapter, meta), indent=2, sort_keys=True)
        tensors = {PEFT_THETA_KEY: theta, **{f"base_model.model.{k}": v for k, v in extras.items()}}
        header = {"format": "pt", "unilora_hf": json.dumps(meta, sort_keys=True)}
        names = (PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME)
    else:
        config_text = json.dumps({**meta, "config": adapter.config.to_dict()}, indent=2)
        tensors = {THETA_KEY: theta, **{f"model.{k}": v for k, v in extras.items()}}
        header = {"format": "pt", "unilora_hf": __version__, "projection_spec": meta["projection_spec"]}
        names = (CONFIG_NAME, WEIGHTS_NAME)
    config_path, weights_path = out / names[0], out / names[1]
    tmp_weights, tmp_config = weights_path.with_suffix(".tmp"), config_path.with_suffix(".tmp")
    save_file(tensors, str(tmp_weights), metadata=header)
    tmp_config.write_text(config_text + "\n")
    os.replace(tmp_weights, weights_path)
    os.replace(tmp_config, config_path)
    return [str(config_path), str(weights_path)]


def _live_state(adapter):
    from .distributed import AdapterState, _is_dtensor

    theta = adapter.theta_d
    if _is_dtensor(theta) or theta.numel() != adapter.config.theta_d_length:
        raise AdapterStateError(
            f"θ_d is sharded by FSDP (this rank holds {theta.numel() if not _is_dtensor(theta) else 'a DTensor'} "
            f"of its {adapter.config.theta_d_length} values). Call state = unilora_hf.gather_adapter_state(model) on "
            "every rank, then save_adapter(..., state=state) on rank 0 (UniLoraTrainer.save_model does this)."
        )
    return AdapterState(theta, adapter.trainable_state())


# -- reading -------------------------------------------------------------------------------------
def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterFormatError(f"{path} is not valid JSON ({exc}); re-download or re-save the adapter") from None
    if not isinstance(data, dict):
        raise AdapterFormatError(f"{path} holds a JSON {type(data).__name__}, not an object")
    return data


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as exc:  # safetensors raises its own SafetensorError and OSError
        raise AdapterFormatError(
            f"{path} is not a readable safetensors file ({type(exc).__name__}: {exc}); it is truncated or "
            "corrupt: download or save the adapter again"
        ) from None


def _check_theta(theta: torch.Tensor | None, d: int, path: Path, key: str) -> torch.Tensor:
    if theta is None:
        raise AdapterFormatError(f"{path} has no tensor {key!r}: it is not a Uni-LoRA adapter file")
    if theta.dtype != torch.float32:
        raise AdapterFormatError(
            f"θ_d ({key!r} in {path}) is {theta.dtype}; Uni-LoRA adapters store it as torch.float32. "
            "Re-save it with θ_d in float32."
        )
    if tuple(theta.shape) != (d,):
        raise AdapterFormatError(
            f"θ_d ({key!r} in {path}) has shape {tuple(theta.shape)} but the config says theta_d_length = {d}; "
            "the weights and config belong to different adapters"
        )
    return theta


def _refuse_pickle(folder: Path, names: set[str]) -> None:
    pickles = sorted(n for n in names if n in PICKLE_NAMES or n.endswith((".bin", ".pt", ".pth", ".ckpt")))
    raise AdapterFormatError(
        f"{folder} holds no safetensors adapter file, only {pickles}. unilora_hf never unpickles adapter files "
        "(a pickle can run code). Convert it to safetensors where you trust the file, e.g. "
        "safetensors.torch.save_file(torch.load(path, weights_only=True), 'adapter_model.safetensors')."
    )


def _describe(names: set[str]) -> str:
    return ", ".join(sorted(names)) if names else "no files"


def read_adapter(folder: str | os.PathLike) -> AdapterFiles:
    """Read and validate the adapter in ``folder`` (either format)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise AdapterFormatError(f"adapter folder {folder} does not exist")
    names = {p.name for p in folder.iterdir()}
    if CONFIG_NAME in names:
        return _read_native(folder, names)
    if PEFT_CONFIG_NAME in names:
        return _read_peft(folder, names)
    if names & set(PICKLE_NAMES):
        _refuse_pickle(folder, names)
    raise AdapterFormatError(
        f"{folder} holds no Uni-LoRA adapter (no {CONFIG_NAME} or {PEFT_CONFIG_NAME}); it holds: {_describe(names)}"
    )


def _read_native(folder: Path, names: set[str]) -> AdapterFiles:
    path = folder / CONFIG_NAME
    data = _read_json(path)
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise AdapterFormatError(f"{path} lacks the field(s) {missing}; it is incomplete or not a unilora_hf config")
    if data["library"] != "unilora_hf" or data["format_version"] != FORMAT_VERSION:
        raise AdapterFormatError(
            f"{path} is format {data['library']!r} v{data['format_version']}; this unilora_hf {__version__} reads "
            f"'unilora_hf' v{FORMAT_VERSION}. Upgrade unilora_hf (pip install -U unilora_hf)."
        )
    try:
        config = UniLoraConfig.from_dict(data["config"])
    except (TypeError, ValueError) as exc:
        raise AdapterFormatError(f"{path}: {exc}") from None
    if data["projection_spec"] not in SPEC_VERSIONS.values():
        raise AdapterFormatError(
            f"{path} uses projection spec {data['projection_spec']!r}, unknown to unilora_hf {__version__} (known: "
            f"{sorted(SPEC_VERSIONS.values())}). Upgrade unilora_hf to load it."
        )
    if data["projection_spec"] != SPEC_VERSIONS[config.projection]:
        raise AdapterFormatError(
            f"{path} says projection {config.projection!r} but spec {data['projection_spec']!r}; the file is inconsistent"
        )
    if WEIGHTS_NAME not in names:
        if names & set(PICKLE_NAMES):
            _refuse_pickle(folder, names)
        raise AdapterFormatError(f"{folder} has {CONFIG_NAME} but no {WEIGHTS_NAME}; it holds: {_describe(names)}")
    tensors, _ = _read_safetensors(folder / WEIGHTS_NAME)
    theta = _check_theta(tensors.pop(THETA_KEY, None), config.theta_d_length, folder / WEIGHTS_NAME, THETA_KEY)
    extras = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    unknown = sorted(set(tensors) - {f"model.{k}" for k in extras})
    if unknown:
        raise AdapterFormatError(f"{folder / WEIGHTS_NAME} holds unexpected tensors {unknown}")
    meta = {k: v for k, v in data.items() if k != "config"}
    return AdapterFiles(config, theta, extras, meta, source="unilora_hf")


def _read_peft(folder: Path, names: set[str]) -> AdapterFiles:
    path = folder / PEFT_CONFIG_NAME
    data = _read_json(path)
    peft_type = data.get("peft_type")
    if peft_type != "UNILORA":
        raise AdapterFormatError(
            f"{folder} holds a PEFT {peft_type} adapter, not a Uni-LoRA one; load it with peft.PeftModel.from_pretrained"
        )
    try:
        config = UniLoraConfig(
            r=data["r"], theta_d_length=data["theta_d_length"], proj_seed=data["proj_seed"], projection=PEFT,
            target_modules=sorted(data["target_modules"]) if isinstance(data.get("target_modules"), list)
            else data.get("target_modules"),
            layers_to_transform=data.get("layers_to_transform"), layers_pattern=data.get("layers_pattern"),
            unilora_dropout=data.get("unilora_dropout", 0.0), init_theta_d_bound=data.get("init_theta_d_bound", 0.02),
            modules_to_save=data.get("modules_to_save"), bias=data.get("bias", "none"),
            fan_in_fan_out=data.get("fan_in_fan_out", False),
        )
    except KeyError as exc:
        raise AdapterFormatError(f"{path} lacks the field {exc.args[0]!r} that a PEFT UNILORA config has") from None
    except (TypeError, ValueError) as exc:
        raise AdapterFormatError(f"{path}: {exc}") from None
    if PEFT_WEIGHTS_NAME not in names:
        if names & set(PICKLE_NAMES):
            _refuse_pickle(folder, names)
        raise AdapterFormatError(f"{folder} has {PEFT_CONFIG_NAME} but no {PEFT_WEIGHTS_NAME}; it holds: {_describe(names)}")
    tensors, header = _read_safetensors(folder / PEFT_WEIGHTS_NAME)
    theta = _check_theta(tensors.pop(PEFT_THETA_KEY, None), config.theta_d_length, folder / PEFT_WEIGHTS_NAME,
                         PEFT_THETA_KEY)
    prefix = "base_model.model."
    indices = {k: v for k, v in tensors.items() if "unilora_indices" in k or "unilora_scales" in k}
    extras = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix) and k not in indices}
    meta: dict[str, Any] = {}
    if "unilora_hf" in header:
        try:
            meta = json.loads(header["unilora_hf"])
        except json.JSONDecodeError:
            raise AdapterFormatError(f"{folder / PEFT_WEIGHTS_NAME} has a corrupt unilora_hf header") from None
    else:
        auto = PEFT_TASK_TO_AUTO_CLASS.get(data.get("task_type") or "", None)
        meta = {"base_model": {"name_or_path": data.get("base_model_name_or_path"), "revision": data.get("revision"),
                               "auto_class": auto, "config_overrides": {}}}
    files = AdapterFiles(config, theta, extras, meta, source="unilora_hf" if "unilora_hf" in header else "peft")
    files.meta["stored_indices"] = indices
    if data.get("task_type") == "SEQ_CLS" and not files.base_model.get("config_overrides"):
        heads = [v for k, v in extras.items() if k.endswith("weight") and v.dim() == 2 and
                 k.split(".")[0] in ("classifier", "score")]
        if heads:
            files.base_model["config_overrides"] = {"num_labels": int(heads[-1].shape[0])}
    return files


# -- applying ------------------------------------------------------------------------------------
def apply_adapter(model: torch.nn.Module, files: AdapterFiles):
    """Inject ``files`` into ``model`` (checking its layout first) and load θ_d and the heads."""
    from .model import inject_adapter

    layers = build_layout(resolve_targets(model, files.config), files.config.r)
    D = layers[-1].offset + layers[-1].size
    layout = files.meta.get("layout")
    if layout:
        check_layout(layers, layout["groups"], layout["fingerprint"])
    if "D" in files.meta and files.meta["D"] != D:
        raise AdapterFormatError(f"the adapter was trained with D = {files.meta['D']} LoRA parameters; this base gives {D}")
    adapter = inject_adapter(model, files.config, theta_d=files.theta_d)
    stored_indices = files.meta.pop("stored_indices", None)
    if stored_indices:
        try:
            _check_stored_indices(adapter, stored_indices)
        except AdapterFormatError:
            adapter.unload()
            raise
    live = adapter.trainable_state()
    missing = sorted(set(live) - set(files.tensors))
    unexpected = sorted(set(files.tensors) - set(live))
    if missing or unexpected:
        adapter.unload()
        raise AdapterFormatError(
            f"the adapter's trained tensors do not fit this model: missing {missing}, unexpected {unexpected}. "
            "Check modules_to_save / bias and that the base model is the right one."
        )
    with torch.no_grad():
        for name, tensor in files.tensors.items():
            param = live[name]
            if param.shape != tensor.shape:
                adapter.unload()
                raise LayoutMismatchError(
                    f"layout mismatch at {name!r}: shape {tuple(param.shape)} on this base, {tuple(tensor.shape)} "
                    "in the adapter (for a classifier head, load the base with the adapter's num_labels)"
                )
            param.copy_(tensor.to(param.dtype))
    adapter.base_model_revision = files.base_model.get("revision")
    return adapter


def _check_stored_indices(adapter, stored: dict[str, torch.Tensor]) -> None:
    for name, layer in adapter.wrapped_layers():
        for part, (start, n) in (("A", (0, layer.spec.r * layer.spec.in_features)),
                                 ("B", (layer.spec.r * layer.spec.in_features, layer.spec.r * layer.spec.out_features))):
            key = f"base_model.model.{name}.unilora_indices_{part}"
            if key in stored:
                ours = adapter.projection.indices(layer.spec.offset + start, n)
                if not torch.equal(stored[key].flatten().long(), ours):
                    raise AdapterFormatError(
                        f"the indices stored for {name} ({part}) differ from PEFT 0.21.2's generate_index with "
                        f"seed {adapter.config.proj_seed}; the adapter was made by another PEFT version"
                    )
