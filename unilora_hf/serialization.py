"""Adapter files on disk: the two formats, written atomically, and read back with every check that needs
no model. This module never imports the code that attaches an adapter (``model``, ``loading``).

Two formats, chosen by the projection kind:

``native`` — ``unilora_config.json`` + ``unilora_model.safetensors`` (keys ``unilora.theta_d`` and
    ``model.<name>`` for heads and biases, under the base model's own names). PEFT looks for
    ``adapter_config.json`` and finds none, so it can never mistake such an adapter for one of its own and
    rebuild another projection.
``peft`` — exactly PEFT 0.21.2's files: ``adapter_config.json`` (``peft_type: "UNILORA"``) +
    ``adapter_model.safetensors`` (``base_model.unilora_theta_d``; heads as ``base_model.model.<name>``;
    an adapted layer's bias as ``base_model.model.<layer>.base_layer.bias``). Our metadata (spec version,
    D, layout fingerprint, base model) rides in the safetensors header, which PEFT ignores.

Integrity (format 2): the safetensors header records ``unilora_hf.digest``, a sha256 over the fields that
define the adapted function (format, projection spec, D, layout fingerprint and every config field), and
``unilora_hf.checksum``, a sha256 over every tensor's name, dtype, shape and bytes. Reading recomputes
both: an edited config field, seed or layout, or a flipped byte of θ_d or a head, is refused
(AdapterIntegrityError). Adapters written by PEFT itself carry neither and are checked for everything
else. θ_d must be finite and stored as float32, float16 or bfloat16 (the last two, as PEFT writes after
``model.half()``, widen to float32 exactly); heads must be finite floating-point tensors (integer buffers
such as BatchNorm's counter excepted); casting them to the model's dtype happens at loading.

Writing is atomic at the folder level: the new folder is built beside the old one (with the user's other
files hard-linked into it) and swapped in with one ``renameat2(RENAME_EXCHANGE)``; a save killed at any
point leaves the previous adapter loadable, and files that are not adapter files survive. A folder
holding another library's adapter files is never overwritten. Only safetensors is read; pickle files are
refused, never unpickled.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch

from .config import TASK_TYPES, UniLoraConfig
from .errors import (
    AdapterFormatError, AdapterIntegrityError, InvalidConfigError, SaveError, UniLoraError, UnsafeAdapterError,
)
from .projection import NATIVE, PEFT, SPEC_VERSIONS
from .safe_io import (
    MAX_JSON_BYTES, TensorEntry, UntrustedFolder, build_tensor, parse_json, parse_safetensors_header,
    read_safetensors_head, tensor_bytes,
)
from .version import __version__

CONFIG_NAME = "unilora_config.json"
WEIGHTS_NAME = "unilora_model.safetensors"
PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_FILE_NAMES = (CONFIG_NAME, WEIGHTS_NAME, PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME)
FORMAT_VERSION = 2
READABLE_FORMAT_VERSIONS = (1, 2)
THETA_KEY = "unilora.theta_d"
PEFT_THETA_KEY = "base_model.unilora_theta_d"
PEFT_PREFIX = "base_model.model."
PICKLE_NAMES = ("adapter_model.bin", "unilora_model.bin", "pytorch_model.bin")
REQUIRED_KEYS = ("library", "format_version", "projection_spec", "config", "D", "layout", "base_model")
MAX_WEIGHTS_BYTES = 1 << 40
META_VERSION = "unilora_hf.version"
META_FORMAT = "unilora_hf.format_version"
META_DIGEST = "unilora_hf.digest"
META_CHECKSUM = "unilora_hf.checksum"
META_RECORD = "unilora_hf.meta"
EXPORT_SOURCE = "unilora_hf_source"
THETA_DTYPES = ("F32", "F16", "BF16")
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
BUFFER_DTYPES = ("I64", "I32", "I16", "I8", "U8", "BOOL")

AUTO_CLASSES = (
    "AutoModel", "AutoModelForCausalLM", "AutoModelForSequenceClassification", "AutoModelForTokenClassification",
    "AutoModelForQuestionAnswering", "AutoModelForSeq2SeqLM", "AutoModelForMaskedLM",
    "AutoModelForImageClassification", "AutoModelForSpeechSeq2Seq", "AutoModelForAudioClassification",
)
PEFT_TASK_TO_AUTO_CLASS = {
    "CAUSAL_LM": "AutoModelForCausalLM", "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification", "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM", "FEATURE_EXTRACTION": "AutoModel",
}
CLASSIFIER_CONFIG_KEYS = ("num_labels", "id2label", "label2id", "problem_type")
PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")
MAX_LABELS = 100_000
PEFT_CONFIG_FIELDS = {
    "task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
    "inference_mode", "r", "proj_seed", "theta_d_length", "target_modules", "unilora_dropout", "fan_in_fan_out",
    "bias", "modules_to_save", "init_theta_d_bound", "init_weights", "save_indices", "layers_to_transform",
    "layers_pattern",
}


class AdapterState(NamedTuple):
    """θ_d (float32, shape (d,)) and the other saved tensors (heads, trained biases) under the base model's
    names, all whole."""

    theta_d: torch.Tensor
    tensors: dict[str, torch.Tensor]


@dataclass
class BaseRecord:
    """What an adapter records about its base model; read from files, so every field is checked.

    ``config_overrides`` holds classifier settings only (``num_labels``, ``id2label``, ``label2id``,
    ``problem_type``): nothing read from an adapter can turn on a loader option (``trust_remote_code`` or
    any other)."""

    name_or_path: str | None = None
    revision: str | None = None
    auto_class: str | None = None
    model_type: str | None = None
    config_overrides: dict[str, Any] = field(default_factory=dict)
    local_name: str | None = None

    def to_json(self) -> dict[str, Any]:
        out = {"name_or_path": self.name_or_path, "revision": self.revision, "auto_class": self.auto_class,
               "model_type": self.model_type, "config_overrides": self.config_overrides}
        if self.local_name is not None:
            out["local_name"] = self.local_name
        return out

    @property
    def is_local(self) -> bool:
        """Whether ``name_or_path`` is a path on this machine rather than a Hub id."""
        return is_local_path(self.name_or_path)

    @classmethod
    def from_json(cls, data: Any, where: str) -> "BaseRecord":
        if not isinstance(data, dict):
            raise AdapterFormatError(f"{where}: base_model must be a JSON object, got {type(data).__name__}")
        unknown = sorted(set(data) - {"name_or_path", "revision", "auto_class", "model_type", "config_overrides",
                                      "local_name"})
        if unknown:
            raise AdapterFormatError(f"{where}: base_model holds unknown field(s) {[str(u)[:50] for u in unknown]}")

        def text(key: str, limit: int) -> str | None:
            value = data.get(key)
            if value is not None and not (isinstance(value, str) and 0 < len(value) <= limit):
                raise AdapterFormatError(f"{where}: base_model.{key} must be a string of at most {limit} characters")
            return value

        auto_class = text("auto_class", 100)
        if auto_class is not None and auto_class not in AUTO_CLASSES:
            raise AdapterFormatError(
                f"{where}: base_model.auto_class = {auto_class[:100]!r} is not one of the transformers Auto classes "
                f"unilora_hf builds ({', '.join(AUTO_CLASSES)})"
            )
        return cls(text("name_or_path", 1000), text("revision", 200), auto_class, text("model_type", 100),
                   check_overrides(data.get("config_overrides") or {}, where), text("local_name", 200))


def is_local_path(name: str | None) -> bool:
    """Whether ``name`` names a local folder (absolute, relative with ./ ../ ~, or existing) rather than a Hub id."""
    if not name:
        return False
    return (os.path.isabs(name) or name.startswith((".", "~")) or os.path.isdir(name) or name.count("/") > 1
            or "\\" in name)


def hub_id_of_cache_path(path: str) -> tuple[str, str] | None:
    """(repo id, commit) when ``path`` is a snapshot folder of the huggingface_hub cache
    (``.../models--org--name/snapshots/<sha>``), else None."""
    parts = os.path.normpath(os.path.abspath(path)).split(os.sep)
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        return parts[-3][len("models--"):].replace("--", "/"), parts[-1]
    return None


def base_identity(cfg, base_model_name_or_path: str | None, revision: str | None) -> tuple[str | None, str | None,
                                                                                          str | None]:
    """(name_or_path, revision, local_name) to record for the base: the name the user set, else the Hub id and
    commit when the base came from the Hub or its cache, else the local folder's absolute path (kept in local
    saves only; `publishable` drops it) and its folder name."""
    if base_model_name_or_path:
        return base_model_name_or_path, revision, None
    name = getattr(cfg, "_name_or_path", None) or None
    commit = revision or getattr(cfg, "_commit_hash", None)
    if not name:
        return None, commit, None
    if is_local_path(name):
        hub = hub_id_of_cache_path(name)
        if hub is not None:
            return hub[0], revision or hub[1], None
        return os.path.abspath(os.path.expanduser(name)), None, os.path.basename(os.path.normpath(name))
    return name, commit, None


def check_overrides(overrides: Any, where: str) -> dict[str, Any]:
    """The classifier settings of ``overrides``, checked; UnsafeAdapterError for any other key (a loader option
    from a file could run code: ``trust_remote_code``, ``code_revision``, ...)."""
    if not isinstance(overrides, dict):
        raise AdapterFormatError(f"{where}: base_model.config_overrides must be a JSON object")
    others = sorted(str(k)[:60] for k in overrides if k not in CLASSIFIER_CONFIG_KEYS)
    if others:
        raise UnsafeAdapterError(
            f"{where}: base_model.config_overrides holds {others}; an adapter may only set the classifier's "
            f"{list(CLASSIFIER_CONFIG_KEYS)}. Loader options such as trust_remote_code come from your own "
            "arguments only, never from an adapter file; remove the key if you wrote it."
        )
    out: dict[str, Any] = {}
    bad = lambda key: AdapterFormatError(f"{where}: base_model.config_overrides.{key} is malformed")  # noqa: E731
    if "num_labels" in overrides:
        n = overrides["num_labels"]
        if type(n) is not int or not 0 < n <= MAX_LABELS:
            raise bad("num_labels")
        out["num_labels"] = n
    for key, value_type in (("id2label", str), ("label2id", int)):
        if key in overrides:
            mapping = overrides[key]
            if not isinstance(mapping, dict) or len(mapping) > MAX_LABELS or not all(
                isinstance(k, str) and len(k) <= 1000 and type(v) is value_type and (value_type is int or len(v) <= 1000)
                for k, v in mapping.items()
            ):
                raise bad(key)
            if key == "id2label" and not all(k.isdigit() and len(k) < 7 for k in mapping):
                raise bad(key)
            out[key] = dict(mapping)
    if "problem_type" in overrides:
        if overrides["problem_type"] not in PROBLEM_TYPES:
            raise bad("problem_type")
        out["problem_type"] = overrides["problem_type"]
    return out


@dataclass
class AdapterFiles:
    """The content of an adapter folder, validated as far as it can be without the base model.

    ``tensors``: heads and trained biases under the base model's names. ``D``/``layout``: None for an
    adapter written by PEFT itself. ``integrity``: ``"verified"`` when the digest and checksum were checked,
    ``"unverified"`` for files that carry none (written by PEFT, or by unilora_hf before format 2).
    ``peft_base_weights``: base weights PEFT saved beside an adapted output head (checked at loading to be
    the base's own); ``stored_indices``: PEFT's ``save_indices`` tensors (checked at loading)."""

    folder: Path
    format: str
    written_by: str
    config: UniLoraConfig
    theta_d: torch.Tensor
    tensors: dict[str, torch.Tensor]
    base: BaseRecord
    projection_spec: str
    D: int | None = None
    layout: dict | None = None
    integrity: str = "unverified"
    peft_base_weights: dict[str, torch.Tensor] = field(default_factory=dict)
    stored_indices: dict[str, torch.Tensor] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)
    header_meta: dict[str, str] = field(default_factory=dict)

    @property
    def source(self) -> str:
        return self.written_by

    @property
    def base_model(self) -> dict[str, Any]:
        return self.base.to_json()

    @property
    def meta(self) -> dict[str, Any]:
        """The non-tensor record as one dict (``base_model``, ``D``, ``layout``, ``projection_spec``)."""
        out: dict[str, Any] = {"base_model": self.base.to_json(), "projection_spec": self.projection_spec}
        if self.D is not None:
            out["D"] = self.D
        if self.layout is not None:
            out["layout"] = self.layout
        return out


# -- digests -------------------------------------------------------------------------------------------
def function_digest(config: UniLoraConfig, D: int, projection_spec: str, layout_fingerprint: str,
                    base: BaseRecord) -> str:
    """sha256 over what defines the adapted function: format, projection spec, D, layout, every config field,
    and the model class and classifier settings the adapter was trained with (not the base's name or revision,
    which a user may re-point)."""
    record = {"format_version": FORMAT_VERSION, "projection_spec": projection_spec, "D": D,
              "layout_fingerprint": layout_fingerprint, "config": config.to_dict(),
              "auto_class": base.auto_class, "config_overrides": base.config_overrides}
    text = json.dumps(record, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def tensors_checksum(entries: dict[str, TensorEntry], data: bytes, data_start: int) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(entries):
        e = entries[name]
        h.update(f"{name}\0{e.dtype}\0{','.join(map(str, e.shape))}\0".encode())
        h.update(tensor_bytes(data, e, data_start))
    return "sha256:" + h.hexdigest()


def _safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """The safetensors file of ``tensors`` with ``metadata`` plus the checksum of its own tensors."""
    from safetensors.torch import save

    draft = save(tensors, metadata=metadata)
    entries, _, start = parse_safetensors_header(draft, "the adapter being written")
    return save(tensors, metadata={**metadata, META_CHECKSUM: tensors_checksum(entries, draft, start)})


# -- writing ---------------------------------------------------------------------------------------------
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
        ("AutoModelForImageClassification", ma.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES),
        ("AutoModelForSpeechSeq2Seq", ma.MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES),
        ("AutoModelForAudioClassification", ma.MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING_NAMES),
    ):
        for value in mapping.values():
            if name == value or (isinstance(value, (list, tuple)) and name in value):
                return auto
    return "AutoModel"


def adapter_metadata(adapter, base_model_name_or_path: str | None = None, revision: str | None = None) -> dict:
    """Everything besides θ_d and the heads that a loader needs: spec, D, layout, base model."""
    model = adapter.model
    cfg = getattr(model, "config", None)
    auto = auto_class_of(model)
    overrides: dict[str, Any] = {}
    if auto in ("AutoModelForSequenceClassification", "AutoModelForTokenClassification",
                "AutoModelForImageClassification", "AutoModelForAudioClassification") and cfg is not None:
        overrides = {k: getattr(cfg, k, None) for k in CLASSIFIER_CONFIG_KEYS}
        overrides = {k: v for k, v in overrides.items() if v is not None}
        for key in ("id2label", "label2id"):
            if key in overrides:
                overrides[key] = {str(k): v for k, v in overrides[key].items()}
    name, rev, local = base_identity(cfg, base_model_name_or_path or getattr(adapter, "base_model_name_or_path", None),
                                     revision or adapter.base_model_revision)
    base = BaseRecord(name_or_path=name, revision=rev, auto_class=auto, model_type=getattr(cfg, "model_type", None),
                      config_overrides=overrides, local_name=local)
    return {
        "library": "unilora_hf",
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "projection_spec": adapter.projection.spec_version,
        "D": adapter.D,
        "layout": {"fingerprint": adapter.fingerprint, "num_layers": len(adapter.layers),
                   "groups": adapter.compact_layout},
        "base_model": base.to_json(),
    }


def peft_config_dict(config: UniLoraConfig, base: dict) -> dict:
    """PEFT 0.21.2's adapter_config.json for ``config`` (every field as PEFT writes it)."""
    return {
        "auto_mapping": None,
        "base_model_name_or_path": base.get("name_or_path"),
        "bias": config.bias,
        "fan_in_fan_out": config.fan_in_fan_out,
        "inference_mode": True,
        "init_theta_d_bound": config.init_theta_d_bound,
        "init_weights": True,
        "layers_pattern": config.layers_pattern,
        "layers_to_transform": config.layers_to_transform,
        "modules_to_save": config.modules_to_save,
        "peft_type": "UNILORA",
        "peft_version": "0.21.2",
        "proj_seed": config.proj_seed,
        "r": config.r,
        "revision": base.get("revision"),
        "save_indices": False,
        "target_modules": config.target_modules,
        "task_type": config.task_type,
        "theta_d_length": config.theta_d_length,
        "unilora_dropout": config.unilora_dropout,
    }


def peft_tensor_name(name: str, adapted: set[str]) -> str:
    """The key PEFT uses for a saved tensor: an adapted layer's bias lives under ``<layer>.base_layer``."""
    module, _, leaf = name.rpartition(".")
    if module in adapted:
        return f"{PEFT_PREFIX}{module}.base_layer.{leaf}"
    return PEFT_PREFIX + name


def save_adapter(adapter, save_directory: str | os.PathLike, base_model_name_or_path: str | None = None,
                 revision: str | None = None, state: AdapterState | None = None) -> list[str]:
    """Write the adapter into ``save_directory`` (created if needed), atomically; returns the two paths.

    ``state``: the whole trained tensors when FSDP shards the live ones (gather them with
    ``gather_adapter_state(model)`` on every rank, then save on one). Refuses (before writing anything) a θ_d
    or head with NaN/inf, and a folder holding another library's adapter files."""
    if state is None:
        state = adapter.live_state()
    theta = state.theta_d.detach().float().cpu().contiguous()
    extras = {k: v.detach().cpu().contiguous() for k, v in state.tensors.items()}
    for name, tensor in [("θ_d", theta), *extras.items()]:
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise AdapterIntegrityError(
                f"{name} holds NaN/inf values; such an adapter would be refused at loading, so nothing was written. "
                "Save a healthy checkpoint (lower the learning rate, or resume from an earlier step)."
            )
    meta = adapter_metadata(adapter, base_model_name_or_path, revision)
    config = adapter.config
    digest = function_digest(config, meta["D"], meta["projection_spec"], meta["layout"]["fingerprint"],
                             BaseRecord.from_json(meta["base_model"], "the adapter being written"))
    header = {"format": "pt", META_VERSION: __version__, META_FORMAT: str(FORMAT_VERSION), META_DIGEST: digest}
    if config.projection == PEFT:
        config_text = json.dumps(peft_config_dict(config, meta["base_model"]), indent=2, sort_keys=True)
        adapted = {spec.name for spec in adapter.layers}
        tensors = {PEFT_THETA_KEY: theta, **{peft_tensor_name(k, adapted): v for k, v in extras.items()}}
        header[META_RECORD] = json.dumps({k: v for k, v in meta.items() if k != "library"}, sort_keys=True)
        names = (PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME)
    else:
        config_text = json.dumps({**meta, "config": config.to_dict()}, indent=2)
        tensors = {THETA_KEY: theta, **{f"model.{k}": v for k, v in extras.items()}}
        names = (CONFIG_NAME, WEIGHTS_NAME)
    out = Path(save_directory)
    replaced = files_to_replace(out, config.projection)
    files = {names[0]: (config_text + "\n").encode(), names[1]: _safetensors_bytes(tensors, header)}
    write_folder(out, files, remove=replaced)
    return [str(out / names[0]), str(out / names[1])]


def _peft_files_kind(folder: Path) -> str:
    """Who wrote the PEFT-format files in ``folder``: ``"unilora"`` (a UniLoRA adapter saved by unilora_hf),
    ``"export"`` (a LoRA adapter written by `export_lora`) or ``"foreign"`` (anything else)."""
    try:
        with open(folder / PEFT_WEIGHTS_NAME, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n)) if n <= 16 << 20 else {}
        with open(folder / PEFT_CONFIG_NAME, "rb") as f:
            peft_type = json.loads(f.read(MAX_JSON_BYTES)).get("peft_type")
    except (OSError, ValueError, AttributeError):
        return "foreign"
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict):
        return "foreign"
    if peft_type == "UNILORA" and (META_VERSION in meta or "unilora_hf" in meta):
        return "unilora"
    if peft_type == "LORA" and EXPORT_SOURCE in meta:
        return "export"
    return "foreign"


def files_to_replace(out: Path, writing: str) -> set[str]:
    """The adapter files of another format in ``out`` that writing ``writing`` replaces: an earlier Uni-LoRA
    adapter of unilora_hf's, or the LoRA export written beside a native one (a stale companion). ``writing``:
    ``"native"``, ``"peft"``, ``"export"`` (a LoRA export into its own folder) or ``"companion"`` (a LoRA export
    beside the native adapter in ``out``). Anything else that would end up beside the new adapter, or be
    overwritten by it, is refused (AdapterFormatError naming it and the fix)."""
    if not out.is_dir():
        return set()
    native = [n for n in (CONFIG_NAME, WEIGHTS_NAME) if os.path.lexists(out / n)]
    peft = [n for n in (PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME) if os.path.lexists(out / n)]
    kind = _peft_files_kind(out) if peft else None
    if writing in ("export", "companion"):
        if writing == "export" and native:
            return _refuse(out, f"a unilora_hf adapter ({', '.join(native)}): the export would put a second adapter "
                                "beside it")
        if writing == "companion" and not native:
            return _refuse(out, "no unilora_hf adapter for a LoRA export to accompany")
        if peft and kind != "export":
            return _refuse(out, f"another adapter ({', '.join(peft)}): the export would overwrite it")
        return set()
    if peft and kind == "export" and native:
        return set(peft) if writing == "native" else set(native)  # the companion of the adapter being replaced
    if peft and kind != "unilora":
        what = "a LoRA adapter exported by unilora_hf" if kind == "export" else "another library's adapter"
        return _refuse(out, f"{what} ({', '.join(peft)}), which saving a Uni-LoRA adapter here would "
                            f"{'overwrite' if writing == 'peft' else 'sit beside'}")
    return set(peft) if writing == "native" else set(native)


def _refuse(out: Path, what: str) -> set[str]:
    raise AdapterFormatError(f"{out} holds {what}. Save into another folder, or move those files away first.")


_RENAME_EXCHANGE = 2


@functools.lru_cache(maxsize=1)
def _renameat2():
    """libc's ``renameat2``, or None where there is none (not Linux, or an old libc)."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError, TypeError):
        try:
            fn = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).renameat2
        except (OSError, AttributeError, TypeError):
            return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where it is not available."""
    fn = _renameat2()
    if fn is None:
        return False
    at_fdcwd = -100
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EXDEV, errno.EBUSY, errno.EPERM, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _fsync(path: Path, directory: bool = False) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _link_tree(src: Path, dst: Path) -> None:
    """Recreate ``src`` at ``dst`` with hard links to its files (copies where links are impossible)."""
    if src.is_symlink():
        os.symlink(os.readlink(src), dst)
    elif src.is_dir():
        os.mkdir(dst)
        shutil.copystat(src, dst)
        for entry in os.scandir(src):
            _link_tree(Path(entry.path), dst / entry.name)
    elif src.is_file():
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)


STAGING_MARK = ".unilora-staging-"


def _clear_stale_staging(parent: Path, name: str) -> None:
    """Remove staging folders of earlier saves of ``name`` whose process is gone (a killed save)."""
    prefix = f".{name}{STAGING_MARK}"
    for entry in parent.iterdir() if parent.is_dir() else ():
        if entry.name.startswith(prefix):
            pid = entry.name[len(prefix):].split("-", 1)[0]
            alive = pid.isdigit() and _pid_alive(int(pid)) and int(pid) != os.getpid()
            if not alive:
                shutil.rmtree(entry, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def write_folder(out: Path, files: dict[str, bytes], remove: set[str] = frozenset()) -> None:
    """Make ``out`` hold ``files`` (and no longer the names in ``remove``), keeping every other entry, in one
    atomic step: a staging folder beside ``out`` gets the new files plus hard links of everything else, then
    ``renameat2(RENAME_EXCHANGE)`` swaps it in and the old tree is removed. Entries created in ``out`` while
    this runs are moved over. Where the exchange is unavailable (not Linux, another filesystem, no write
    access to the parent) the files are replaced one by one, each atomically."""
    out = Path(os.path.abspath(out))
    if out.exists() and not out.is_dir():
        raise SaveError(f"{out} exists and is not a folder; pass a folder path to save the adapter into")
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        _clear_stale_staging(parent, out.name)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}{STAGING_MARK}{os.getpid()}-", dir=parent))
    except OSError:
        return _write_files_in_place(out, files, remove)
    try:
        existed = out.is_dir()
        if existed:
            shutil.copystat(out, staging)
            for entry in os.scandir(out):
                if entry.name not in files and entry.name not in remove:
                    _link_tree(Path(entry.path), staging / entry.name)
        else:
            os.chmod(staging, 0o777 & ~_umask())
        for name, data in files.items():
            path = staging / name
            with open(path, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        _fsync(staging, directory=True)
        if not existed:
            os.rename(staging, out)
        elif _exchange(staging, out):
            for entry in os.scandir(staging):  # entries that appeared in the old folder meanwhile
                if not (out / entry.name).exists() and entry.name not in files and entry.name not in remove:
                    os.rename(entry.path, out / entry.name)
            shutil.rmtree(staging, ignore_errors=True)
        else:
            shutil.rmtree(staging, ignore_errors=True)
            return _write_files_in_place(out, files, remove)
        _fsync(parent, directory=True)
    except BaseException:
        if staging.exists() and staging != out:
            shutil.rmtree(staging, ignore_errors=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_files_in_place(out: Path, files: dict[str, bytes], remove: set[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    temps = []
    try:
        for name, data in files.items():
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".unilora-tmp", dir=out)
            temps.append(tmp)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        for (name, _), tmp in zip(files.items(), temps):
            os.replace(tmp, out / name)
        for name in remove:
            with_suppress_unlink(out / name)
    finally:
        for tmp in temps:
            with_suppress_unlink(Path(tmp))


def with_suppress_unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _with_metadata(data: bytes, metadata: dict[str, str]) -> bytes:
    """The safetensors file ``data`` with its ``__metadata__`` replaced (tensors and their bytes unchanged)."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    header["__metadata__"] = metadata
    body = json.dumps(header, separators=(",", ":")).encode()
    body += b" " * (-len(body) % 8)  # keep the data section 8-byte aligned, as safetensors writes it
    return len(body).to_bytes(8, "little") + body + data[8 + n :]


def publishable(folder: Path, files: AdapterFiles, base_model_name_or_path: str | None = None) -> dict[str, bytes]:
    """The bytes of the two adapter files of ``folder`` as they may be published: a base model recorded as a local
    path is replaced by ``base_model_name_or_path`` (a Hub id) or dropped (its folder name is kept as
    ``local_name``); nothing else changes (neither is covered by the digest, so the files still verify)."""
    base = files.base
    name, revision = base.name_or_path, base.revision
    if base_model_name_or_path:
        name, revision = base_model_name_or_path, (revision if not base.is_local else None)
    elif base.is_local:
        name, revision = None, None
    record = BaseRecord(name, revision, base.auto_class, base.model_type, base.config_overrides,
                        base.local_name or (os.path.basename(os.path.normpath(base.name_or_path))
                                            if base.is_local else None))
    if files.format == NATIVE:
        config = json.loads((folder / CONFIG_NAME).read_text())
        config["base_model"] = record.to_json()
        return {CONFIG_NAME: (json.dumps(config, indent=2) + "\n").encode(),
                WEIGHTS_NAME: (folder / WEIGHTS_NAME).read_bytes()}
    config = json.loads((folder / PEFT_CONFIG_NAME).read_text())
    config["base_model_name_or_path"], config["revision"] = record.name_or_path, record.revision
    weights = (folder / PEFT_WEIGHTS_NAME).read_bytes()
    n = int.from_bytes(weights[:8], "little")
    meta = json.loads(weights[8 : 8 + n]).get("__metadata__") or {}
    if META_RECORD in meta:
        inner = json.loads(meta[META_RECORD])
        inner["base_model"] = record.to_json()
        meta[META_RECORD] = json.dumps(inner, sort_keys=True)
        weights = _with_metadata(weights, meta)
    return {PEFT_CONFIG_NAME: (json.dumps(config, indent=2, sort_keys=True) + "\n").encode(),
            PEFT_WEIGHTS_NAME: weights}


# -- reading ---------------------------------------------------------------------------------------------
def _refuse_pickle(folder: Path, names: set[str]) -> None:
    pickles = sorted(n for n in names if n in PICKLE_NAMES or n.endswith((".bin", ".pt", ".pth", ".ckpt")))
    raise UnsafeAdapterError(
        f"{folder} holds no safetensors adapter file, only {pickles}. unilora_hf never unpickles adapter files "
        "(a pickle can run code). Convert it to safetensors where you trust the file, e.g. "
        "safetensors.torch.save_file(torch.load(path, weights_only=True), 'adapter_model.safetensors')."
    )


def _describe(names: set[str]) -> str:
    shown = sorted(names)[:30]
    return (", ".join(shown) + (f", ... ({len(names)} entries)" if len(names) > 30 else "")) if names else "no files"


def read_adapter(folder: str | os.PathLike | UntrustedFolder, extra_roots: tuple = ()) -> AdapterFiles:
    """Read and validate the adapter in ``folder`` (either format). Links in ``folder`` may lead into
    ``extra_roots`` only; for a huggingface_hub snapshot (``.../snapshots/<sha>``) that is the repo's ``blobs``."""
    if not isinstance(folder, UntrustedFolder):
        path = Path(folder)
        if not extra_roots and path.parent.name == "snapshots":
            extra_roots = (path.parent.parent / "blobs",)
        folder = UntrustedFolder(path, extra_roots)
    uf = folder
    try:
        return _read(uf)
    except UniLoraError:
        raise
    except (TypeError, KeyError, AttributeError, IndexError, OverflowError, RecursionError, UnicodeError) as exc:
        # A shape of input no check above anticipated: still a refusal, never a crash.
        raise AdapterFormatError(
            f"the adapter files in {uf.path} are malformed ({type(exc).__name__}: {' '.join(str(exc).split())[:200]}); "
            "download or save the adapter again"
        ) from None


def _is_companion(uf: UntrustedFolder, header_meta: dict[str, str]) -> bool:
    """Whether the PEFT-format files beside a native adapter are its LoRA export (`export_lora(...,
    companion=True)`, written so that transformers' own adapter loading can load the folder): a LoRA adapter
    whose recorded source digest and checksum are the native adapter's."""
    try:
        config = parse_json(uf.read(PEFT_CONFIG_NAME, MAX_JSON_BYTES), str(uf.path / PEFT_CONFIG_NAME))
        meta = read_safetensors_head(uf, PEFT_WEIGHTS_NAME).get("__metadata__") or {}
        source = json.loads(meta.get(EXPORT_SOURCE, "{}"))
    except (AdapterFormatError, ValueError, TypeError):
        return False
    return (isinstance(config, dict) and config.get("peft_type") == "LORA" and isinstance(source, dict)
            and META_DIGEST in header_meta and source.get("digest") == header_meta.get(META_DIGEST)
            and source.get("checksum") == header_meta.get(META_CHECKSUM))


def _read(uf: UntrustedFolder) -> AdapterFiles:
    names = uf.names()
    native, peft = CONFIG_NAME in names, PEFT_CONFIG_NAME in names
    if native and peft:
        files = _read_native(uf, names)
        if _is_companion(uf, files.header_meta):
            return files
        raise AdapterFormatError(
            f"{uf.path} holds two adapters: a unilora_hf one ({CONFIG_NAME}, {WEIGHTS_NAME}) and a PEFT-format one "
            f"({PEFT_CONFIG_NAME}, {PEFT_WEIGHTS_NAME}); which one to load is ambiguous. Move one of them into its "
            "own folder."
        )
    if native:
        return _read_native(uf, names)
    if peft:
        return _read_peft(uf, names)
    if names & set(PICKLE_NAMES):
        _refuse_pickle(uf.path, names)
    raise AdapterFormatError(
        f"{uf.path} holds no Uni-LoRA adapter (no {CONFIG_NAME} or {PEFT_CONFIG_NAME}); it holds: {_describe(names)}"
    )


read_adapter_config = read_adapter


def _weights(uf: UntrustedFolder, names: set[str], weights_name: str, config_name: str):
    if weights_name not in names:
        if names & set(PICKLE_NAMES):
            _refuse_pickle(uf.path, names)
        raise AdapterFormatError(f"{uf.path} has {config_name} but no {weights_name}; it holds: {_describe(names)}")
    data = uf.read(weights_name, MAX_WEIGHTS_BYTES)
    where = str(uf.path / weights_name)
    try:
        entries, header, start = parse_safetensors_header(data, where)
    except AdapterFormatError as exc:
        raise AdapterFormatError(f"{exc} (not a readable safetensors file)") from None
    return data, entries, header, start, where


def _verify(header: dict[str, str], entries, data: bytes, start: int, digest: str, where: str) -> None:
    if header.get(META_DIGEST) != digest:
        raise AdapterIntegrityError(
            f"the adapter's config does not match the digest recorded in {where} when it was saved (a field that "
            "defines the adapted function — projection, seed, D, d, r, layout, targets, heads or bias — was edited, "
            "or the files come from two different saves). Download or save the adapter again; to change a "
            "setting, train or convert the adapter with it."
        )
    if header.get(META_CHECKSUM) != tensors_checksum(entries, data, start):
        raise AdapterIntegrityError(
            f"the tensors in {where} do not match the checksum recorded when it was saved: the file was changed or "
            "damaged after it was written. Download or save the adapter again."
        )


def _theta(entries, data, start, key: str, d: int, where: str) -> torch.Tensor:
    entry = entries.get(key)
    if entry is None:
        raise AdapterFormatError(f"{where} has no tensor {key!r}: it is not a Uni-LoRA adapter file")
    if entry.dtype not in THETA_DTYPES:
        raise AdapterFormatError(
            f"θ_d ({key!r} in {where}) is stored as {entry.torch_dtype}; Uni-LoRA adapters store it as torch.float32 "
            "(float16/bfloat16 are read too). Re-save it with θ_d in float32."
        )
    if entry.shape != (d,):
        raise AdapterFormatError(
            f"θ_d ({key!r} in {where}) has shape {entry.shape} but the config says theta_d_length = {d}; "
            "the weights and config belong to different adapters"
        )
    theta = build_tensor(data, entry, start).float()
    bad = (~torch.isfinite(theta)).sum().item()
    if bad:
        raise AdapterIntegrityError(
            f"θ_d in {where} holds {bad} NaN/inf value(s): the adapter is broken (training diverged, or the file is "
            "damaged). Load an earlier checkpoint of it."
        )
    return theta


def _extra_tensor(data, entry: TensorEntry, start: int, name: str, where: str) -> torch.Tensor:
    if entry.dtype not in FLOAT_DTYPES + BUFFER_DTYPES:
        raise AdapterFormatError(f"{name!r} in {where} is stored as {entry.torch_dtype}, which no trained head or bias "
                                 "can be; the file is corrupt")
    tensor = build_tensor(data, entry, start)
    if tensor.is_floating_point():
        bad = (~torch.isfinite(tensor)).sum().item()
        if bad:
            raise AdapterIntegrityError(f"{name!r} in {where} holds {bad} NaN/inf value(s): the adapter is broken")
    return tensor


def _config_from(data: Any, where: str) -> UniLoraConfig:
    try:
        return UniLoraConfig.from_dict(data)
    except InvalidConfigError as exc:
        raise AdapterFormatError(f"{where}: {exc}") from None
    except TypeError as exc:  # a field that is not a keyword of UniLoraConfig (from_dict checks the names)
        raise AdapterFormatError(f"{where}: {exc}") from None


def _check_layout_record(layout: Any, where: str) -> dict:
    if not (isinstance(layout, dict) and set(layout) == {"fingerprint", "num_layers", "groups"}
            and isinstance(layout["fingerprint"], str) and layout["fingerprint"].startswith("sha256:")
            and len(layout["fingerprint"]) == 71 and type(layout["num_layers"]) is int and layout["num_layers"] > 0
            and isinstance(layout["groups"], list)):
        raise AdapterFormatError(f"{where}: the layout record is malformed; the config file is corrupt")
    return layout


def _read_native(uf: UntrustedFolder, names: set[str]) -> AdapterFiles:
    where = str(uf.path / CONFIG_NAME)
    data = parse_json(uf.read(CONFIG_NAME, MAX_JSON_BYTES), where)
    if not isinstance(data, dict):
        raise AdapterFormatError(f"{where} holds a JSON {type(data).__name__}, not an object")
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise AdapterFormatError(f"{where} lacks the field(s) {missing}; it is incomplete or not a unilora_hf config")
    version = data["format_version"]
    if data["library"] != "unilora_hf" or type(version) is not int or version not in READABLE_FORMAT_VERSIONS:
        raise AdapterFormatError(
            f"{where} is format {str(data['library'])[:50]!r} v{str(version)[:20]}; this unilora_hf {__version__} reads "
            f"'unilora_hf' v{READABLE_FORMAT_VERSIONS[0]}-v{FORMAT_VERSION}. Upgrade unilora_hf (pip install -U unilora_hf)."
        )
    config = _config_from(data["config"], where)
    spec = data["projection_spec"]
    if not isinstance(spec, str) or spec not in SPEC_VERSIONS.values():
        raise AdapterFormatError(
            f"{where} uses projection spec {str(spec)[:60]!r}, unknown to unilora_hf {__version__} (known: "
            f"{sorted(SPEC_VERSIONS.values())}). Upgrade unilora_hf to load it."
        )
    if spec != SPEC_VERSIONS[config.projection]:
        raise AdapterFormatError(f"{where} says projection {config.projection!r} but spec {spec!r}; the file is inconsistent")
    D = data["D"]
    if type(D) is not int or D <= 0:
        raise AdapterFormatError(f"{where}: D must be a positive integer")
    layout = _check_layout_record(data["layout"], where)
    base = BaseRecord.from_json(data["base_model"], where)
    blob, entries, header, start, wpath = _weights(uf, names, WEIGHTS_NAME, CONFIG_NAME)
    integrity = "unverified"
    if version >= 2:
        _verify(header, entries, blob, start, function_digest(config, D, spec, layout["fingerprint"], base), wpath)
        integrity = "verified"
    theta = _theta(entries, blob, start, THETA_KEY, config.theta_d_length, wpath)
    tensors: dict[str, torch.Tensor] = {}
    for key, entry in entries.items():
        if key == THETA_KEY:
            continue
        if not key.startswith("model.") or len(key) <= len("model."):
            raise AdapterFormatError(f"{wpath} holds an unexpected tensor {key[:100]!r}")
        tensors[key[len("model."):]] = _extra_tensor(blob, entry, start, key, wpath)
    return AdapterFiles(uf.path, NATIVE, "unilora_hf", config, theta, tensors, base, spec, D, layout, integrity,
                        sizes={CONFIG_NAME: len(json.dumps(data)), WEIGHTS_NAME: len(blob)}, header_meta=header)


def _peft_config(data: dict, where: str) -> UniLoraConfig:
    unknown = sorted(str(k)[:60] for k in set(data) - PEFT_CONFIG_FIELDS)
    if unknown:
        raise AdapterFormatError(
            f"{where} holds field(s) {unknown} that PEFT 0.21.2's UniLoraConfig does not have; the adapter was written "
            "by another PEFT version, whose meaning of them unilora_hf cannot reproduce"
        )
    missing = [k for k in ("r", "theta_d_length") if k not in data]
    if missing:
        raise AdapterFormatError(f"{where} lacks the field {missing[0]!r} that a PEFT UNILORA config has")
    for key in ("inference_mode", "init_weights", "save_indices"):
        if key in data and not isinstance(data[key], bool):
            raise AdapterFormatError(f"{where}: {key} must be true or false")
    for key in ("base_model_name_or_path", "revision", "peft_version"):
        if data.get(key) is not None and not (isinstance(data[key], str) and len(data[key]) <= 1000):
            raise AdapterFormatError(f"{where}: {key} must be a string")
    task = data.get("task_type")
    if task is not None and task not in TASK_TYPES:
        raise AdapterFormatError(f"{where}: task_type = {str(task)[:50]!r} is not a PEFT task type ({list(TASK_TYPES)})")
    targets = data.get("target_modules")
    fields = dict(
        r=data["r"], theta_d_length=data["theta_d_length"], proj_seed=data.get("proj_seed", 42), projection=PEFT,
        target_modules=targets, layers_to_transform=data.get("layers_to_transform"),
        layers_pattern=data.get("layers_pattern"), unilora_dropout=data.get("unilora_dropout", 0.0),
        init_theta_d_bound=data.get("init_theta_d_bound", 0.02), modules_to_save=data.get("modules_to_save"),
        bias=data.get("bias", "none"), fan_in_fan_out=data.get("fan_in_fan_out", False), task_type=task,
    )
    saved = fields["modules_to_save"]
    if isinstance(saved, list) and all(isinstance(m, str) for m in saved):  # PEFT's task classes append: repeats mean nothing
        fields["modules_to_save"] = list(dict.fromkeys(fields["modules_to_save"]))
    return _config_from(fields, where)


def _read_peft(uf: UntrustedFolder, names: set[str]) -> AdapterFiles:
    where = str(uf.path / PEFT_CONFIG_NAME)
    data = parse_json(uf.read(PEFT_CONFIG_NAME, MAX_JSON_BYTES), where)
    if not isinstance(data, dict):
        raise AdapterFormatError(f"{where} holds a JSON {type(data).__name__}, not an object")
    peft_type = data.get("peft_type")
    if peft_type != "UNILORA":
        raise AdapterFormatError(
            f"{uf.path} holds a PEFT {str(peft_type)[:40]} adapter, not a Uni-LoRA one; load it with "
            "peft.PeftModel.from_pretrained"
        )
    config = _peft_config(data, where)
    blob, entries, header, start, wpath = _weights(uf, names, PEFT_WEIGHTS_NAME, PEFT_CONFIG_NAME)
    spec, D, layout, integrity, written_by = SPEC_VERSIONS[PEFT], None, None, "unverified", "peft"
    task = data.get("task_type")
    record_text = header.get(META_RECORD) or (header.get("unilora_hf") if META_VERSION not in header else None)
    if record_text is not None:
        record = parse_json(record_text.encode(), f"the unilora_hf record in {wpath}")
        if not isinstance(record, dict) or type(record.get("D")) is not int or record.get("projection_spec") != spec:
            raise AdapterFormatError(f"the unilora_hf record in {wpath} is malformed; the file is corrupt")
        D, layout = record["D"], _check_layout_record(record.get("layout"), wpath)
        base = BaseRecord.from_json(record.get("base_model"), wpath)
        written_by = "unilora_hf"
        if META_VERSION in header:
            _verify(header, entries, blob, start, function_digest(config, D, spec, layout["fingerprint"], base), wpath)
            integrity = "verified"
    else:
        base = BaseRecord(data.get("base_model_name_or_path"), data.get("revision"), PEFT_TASK_TO_AUTO_CLASS.get(task))
    theta = _theta(entries, blob, start, PEFT_THETA_KEY, config.theta_d_length, wpath)
    tensors: dict[str, torch.Tensor] = {}
    duplicates: dict[str, torch.Tensor] = {}
    stored: dict[str, torch.Tensor] = {}
    base_weights: dict[str, torch.Tensor] = {}
    for key, entry in entries.items():
        if key == PEFT_THETA_KEY:
            continue
        if not key.startswith(PEFT_PREFIX) or len(key) <= len(PEFT_PREFIX):
            raise AdapterFormatError(f"{wpath} holds an unexpected tensor {key[:100]!r}")
        name = key[len(PEFT_PREFIX):]
        if name.rsplit(".", 1)[-1] in ("unilora_indices_A", "unilora_indices_B", "unilora_scales_A", "unilora_scales_B"):
            if entry.dtype not in ("I64", "I32") + FLOAT_DTYPES:
                raise AdapterFormatError(f"{key[:100]!r} in {wpath} has dtype {entry.dtype}; the file is corrupt")
            stored[name] = build_tensor(blob, entry, start)
            continue
        if ".original_module." in name:
            continue  # PEFT saves the frozen original head's bias with bias="all"; it never enters the output
        tensor = _extra_tensor(blob, entry, start, key, wpath)
        if ".modules_to_save." in name:
            duplicates[name.replace(".modules_to_save.", ".")] = tensor
        elif name.endswith(".base_layer.weight"):
            base_weights[name.removesuffix(".base_layer.weight")] = tensor
        elif ".base_layer." in name:
            tensors[name.replace(".base_layer.", ".")] = tensor
        else:
            tensors[name] = tensor
    for name, tensor in duplicates.items():
        if name in tensors and not torch.equal(tensors[name], tensor):
            raise AdapterFormatError(f"{wpath} holds two different values for {name!r}; the file is corrupt")
        tensors.setdefault(name, tensor)
    if written_by == "peft" and task in ("SEQ_CLS", "TOKEN_CLS"):
        heads = [v for k, v in tensors.items() if k.endswith(".weight") and v.dim() == 2
                 and k.split(".")[0] in ("classifier", "score")]
        if heads:
            base.config_overrides = {"num_labels": int(heads[-1].shape[0])}
    return AdapterFiles(uf.path, PEFT, written_by, config, theta, tensors, base, spec, D, layout, integrity,
                        base_weights, stored, sizes={PEFT_CONFIG_NAME: len(json.dumps(data)), PEFT_WEIGHTS_NAME: len(blob)})
