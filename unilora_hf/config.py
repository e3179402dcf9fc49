"""`UniLoraConfig`: the hyperparameters of a Uni-LoRA adapter, validated when constructed.

Every field is checked in ``__post_init__``; a bad value raises `InvalidConfigError` (a ``ValueError``)
naming the field, the value and what is allowed. The accepted values are PEFT 0.21.2's for its
``UniLoraConfig`` (``unilora_dropout`` in [0, 1], any non-negative ``proj_seed`` for the ``peft``
projection, ``"all-linear"`` in any case, ``task_type``), plus bounds that keep hostile values from
allocating or looping: ranks, lengths, names and regular expressions are bounded here, and the number
of LoRA parameters D is checked against the model before anything of size D exists
(``layout.check_sizes``). ``to_dict``/``from_dict`` round-trip every field; ``from_dict`` refuses unknown
fields and wrong types rather than dropping or coercing them.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, fields
from typing import Any

from .errors import InvalidConfigError
from .projection import SPEC_VERSIONS

ALL_LINEAR = "all-linear"
BIAS_MODES = ("none", "all", "unilora_only")
TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")
MAX_RANK = 1 << 16
MAX_THETA_D = (1 << 31) - 1
MAX_NAME = 1000
MAX_NAMES = 10_000
MAX_REGEX = 4096
MAX_LAYER_INDEX = 1 << 20
MAX_NATIVE_SEED = 1 << 64
MAX_PEFT_SEED = 1 << 256

# Default targets by `config.model_type`: PEFT 0.21.2's TRANSFORMERS_MODELS_TO_UNILORA_TARGET_MODULES_MAPPING
# (its LoRA mapping), exactly: where PEFT has none, neither do we.
DEFAULT_TARGETS: dict[str, list[str] | str] = {
    "t5": ["q", "v"], "mt5": ["q", "v"], "bart": ["q_proj", "v_proj"], "gpt2": ["c_attn"],
    "bloom": ["query_key_value"], "blip-2": ["q", "v", "q_proj", "v_proj"], "opt": ["q_proj", "v_proj"],
    "gptj": ["q_proj", "v_proj"], "gpt_neox": ["query_key_value"], "gpt_neo": ["q_proj", "v_proj"],
    "bert": ["query", "value"], "roberta": ["query", "value"], "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"], "deberta-v2": ["query_proj", "value_proj"], "deberta": ["in_proj"],
    "layoutlm": ["query", "value"], "llama": ["q_proj", "v_proj"], "llama4": ["q_proj", "v_proj"],
    "chatglm": ["query_key_value"], "gpt_bigcode": ["c_attn"], "mpt": ["Wqkv"],
    "RefinedWebModel": ["query_key_value"], "RefinedWeb": ["query_key_value"], "falcon": ["query_key_value"],
    "btlm": ["c_proj", "c_attn"], "codegen": ["qkv_proj"], "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"], "stablelm": ["q_proj", "v_proj"], "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "gemma": ["q_proj", "v_proj"], "gemma2": ["q_proj", "v_proj"], "gemma3_text": ["q_proj", "v_proj"],
    "gemma4": r".*language_model\..*\.(q_proj|v_proj)", "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"], "nemotron_h": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "rwkv": ["key", "value", "receptance", "output"],
    "rwkv7": ["r_proj", "k_proj", "v_proj", "o_proj", "key", "value"],
}
# Where PEFT has no default the error suggests the paper's choice (attention query and value).
SUGGESTED_TARGETS = {"vit": ["q_proj", "v_proj"], "whisper": ["q_proj", "v_proj"], "phi3": ["qkv_proj"]}
# Adapters resident on one base (named adapters, mixed batches) must agree on these config keys (and on D and the
# layout fingerprint): they may differ in θ_d and in the values of their heads only.
SHARED_BY_RESIDENT_ADAPTERS = ("projection", "proj_seed", "theta_d_length", "r", "target_modules", "layers_to_transform",
                               "layers_pattern", "modules_to_save", "bias", "task_type")


def _bad(name: str, value: Any, allowed: str) -> InvalidConfigError:
    shown = repr(value)
    if len(shown) > 200:
        shown = shown[:200] + "..."
    return InvalidConfigError(f"UniLoraConfig.{name} = {shown} is invalid: {allowed}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_all_linear(targets: Any) -> bool:
    return isinstance(targets, str) and targets.lower() == ALL_LINEAR


def _names(value: Any) -> list[str] | None:
    """``value`` as a list of non-empty, bounded strings, or None when it is not one."""
    if isinstance(value, (list, tuple, set, frozenset)) and 0 < len(value) <= MAX_NAMES and all(
        isinstance(m, str) and 0 < len(m) <= MAX_NAME for m in value
    ):
        return list(value)
    return None


def compile_pattern(pattern: str):
    """A regular expression from config input, compiled by the ``regex`` module (``re``-compatible syntax,
    matching with a timeout, so a hostile pattern cannot hang the loader)."""
    import regex

    return regex.compile(pattern, flags=regex.VERSION0)


@dataclass
class UniLoraConfig:
    """Configuration of a Uni-LoRA adapter (arXiv 2506.00799).

    Args:
        r: LoRA rank of every adapted layer (paper: 4).
        theta_d_length: d, the length of the one trained vector θ_d (paper: 23,040 for GLUE with
            RoBERTa, 524,288 for 7B LLMs; PEFT's default of 256 trains to almost nothing). At most D.
        proj_seed: seed of the fixed projection; with the same seed and ``projection="peft"`` the
            projection equals PEFT 0.21.2's. ``native``: [0, 2^64); ``peft``: any non-negative integer.
        projection: ``"native"`` (computed on the fly, nothing of size D stored) or ``"peft"``
            (bit-identical to PEFT's, so the adapter interchanges with PEFT).
        target_modules: module-name suffixes (a list: a module matches when its name equals one or ends
            with ``"." + suffix``), a regular expression that must match the whole module name (a string),
            ``"all-linear"`` (any case: every Linear/Conv1D except the output embedding, and for
            ``task_type="SEQ_CLS"`` the classifier), or None for the architecture's default (PEFT's).
        layers_to_transform: restrict adaptation to these layer indices (needs a list of targets).
        layers_pattern: the name of the layer list (``"layers"``, ``"h"``, ...) used to find a layer
            index; None finds the first numbered segment.
        unilora_dropout: dropout on the input of the LoRA path, in [0, 1].
        init_theta_d_bound: θ_d starts uniform in [-bound, bound].
        modules_to_save: modules (e.g. a classifier head) trained as full copies and saved.
        bias: which biases train: ``"none"``, ``"all"`` or ``"unilora_only"`` (adapted layers'). Trained
            biases are saved with the adapter; the base's own values come back when the adapter is
            disabled or unloaded.
        fan_in_fan_out: True when the targets store weights as (in, out) (GPT-2's Conv1D). Detected per
            layer; recorded for PEFT interchange.
        task_type: PEFT's task type (``"CAUSAL_LM"``, ``"SEQ_CLS"``, ...) or None, with PEFT's meaning:
            ``"SEQ_CLS"`` adds the model's ``classifier``/``score`` head to ``modules_to_save``, as
            ``PeftModelForSequenceClassification`` does.
    """

    r: int = 4
    theta_d_length: int = 23_040
    proj_seed: int = 42
    projection: str = "native"
    target_modules: list[str] | str | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    unilora_dropout: float = 0.0
    init_theta_d_bound: float = 0.02
    modules_to_save: list[str] | None = None
    bias: str = "none"
    fan_in_fan_out: bool = False
    task_type: str | None = None

    def __post_init__(self) -> None:
        if not _is_int(self.r) or not 0 < self.r <= MAX_RANK:
            raise _bad("r", self.r, f"the rank must be an integer in [1, {MAX_RANK}] (the paper uses 4)")
        if not _is_int(self.theta_d_length) or not 0 < self.theta_d_length <= MAX_THETA_D:
            raise _bad("theta_d_length", self.theta_d_length, "d must be a positive integer below 2^31 (e.g. 23040)")
        if not isinstance(self.projection, str) or self.projection not in SPEC_VERSIONS:
            raise _bad("projection", self.projection, f"use one of {sorted(SPEC_VERSIONS)}")
        top = MAX_NATIVE_SEED if self.projection == "native" else MAX_PEFT_SEED
        if not _is_int(self.proj_seed) or not 0 <= self.proj_seed < top:
            raise _bad("proj_seed", self.proj_seed, f"the seed of the {self.projection} projection must be an integer "
                       f"in [0, 2^{top.bit_length() - 1})")
        self._check_targets()
        self._check_layers()
        if not _is_number(self.unilora_dropout) or not 0.0 <= self.unilora_dropout <= 1.0:
            raise _bad("unilora_dropout", self.unilora_dropout, "dropout must be a number in [0, 1]")
        bound = self.init_theta_d_bound
        if not _is_number(bound) or not math.isfinite(bound) or bound <= 0:
            raise _bad("init_theta_d_bound", bound, "the bound must be a finite number > 0 (paper: 0.02)")
        if self.modules_to_save is not None:
            names = _names(self.modules_to_save)
            if isinstance(self.modules_to_save, str) or names is None:
                raise _bad("modules_to_save", self.modules_to_save, "give a list of module names, e.g. ['classifier']")
            for name in names:
                self._check_pattern("modules_to_save", name)
            self.modules_to_save = names
        if not isinstance(self.bias, str) or self.bias not in BIAS_MODES:
            raise _bad("bias", self.bias, f"use one of {list(BIAS_MODES)}")
        if not isinstance(self.fan_in_fan_out, bool):
            raise _bad("fan_in_fan_out", self.fan_in_fan_out, "must be True or False")
        if self.task_type is not None and (not isinstance(self.task_type, str) or self.task_type not in TASK_TYPES):
            raise _bad("task_type", self.task_type, f"use None or one of {list(TASK_TYPES)}")

    @staticmethod
    def _check_pattern(field: str, pattern: str) -> None:
        if len(pattern) > MAX_REGEX:
            raise _bad(field, pattern, f"a pattern may be at most {MAX_REGEX} characters")
        try:
            compile_pattern(pattern)
        except Exception as exc:  # regex.error, and its own OverflowError/RecursionError on absurd patterns
            raise _bad(field, pattern, f"not a valid regular expression ({' '.join(str(exc).split())[:200]})") from None

    def _check_targets(self) -> None:
        t = self.target_modules
        if t is None:
            return
        if isinstance(t, str):
            if not t:
                raise _bad("target_modules", t, "give module-name suffixes, a regex, 'all-linear' or None")
            if not is_all_linear(t):
                self._check_pattern("target_modules", t)
            return
        names = _names(t)
        if names is None:
            raise _bad("target_modules", t, "give a non-empty list of module-name suffixes, a regex string, "
                       "'all-linear' or None")
        self.target_modules = sorted(set(names))  # a set, as in PEFT: order and repeats mean nothing

    def _check_layers(self) -> None:
        layers = self.layers_to_transform
        pattern = self.layers_pattern
        if isinstance(self.target_modules, str) and (layers is not None or pattern is not None):
            field = "layers_to_transform" if layers is not None else "layers_pattern"
            raise _bad(field, layers if layers is not None else pattern,
                       "it needs target_modules as a list of suffixes, not a string")
        if layers is not None:
            items = [layers] if _is_int(layers) else layers
            if not isinstance(items, (list, tuple)) or len(items) > MAX_NAMES or not all(
                _is_int(i) and 0 <= i <= MAX_LAYER_INDEX for i in items
            ):
                raise _bad("layers_to_transform", layers, "give a non-negative layer index or a list of them")
            if isinstance(layers, tuple):
                self.layers_to_transform = list(layers)
        if pattern is not None:
            items = [pattern] if isinstance(pattern, str) else pattern
            if not isinstance(items, (list, tuple)) or len(items) > MAX_NAMES or not all(
                isinstance(p, str) and len(p) <= MAX_NAME for p in items
            ):
                raise _bad("layers_pattern", pattern, "give a layer-list name such as 'layers' or a list of them")
            for p in items:
                self._check_pattern("layers_pattern", p)
            if isinstance(pattern, tuple):
                self.layers_pattern = list(pattern)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "UniLoraConfig":
        """The config of ``data`` (as ``to_dict`` writes it); InvalidConfigError for unknown fields or
        values of the wrong type."""
        if not isinstance(data, dict):
            raise InvalidConfigError(f"a UniLoraConfig is a JSON object of fields, got {type(data).__name__}")
        known = [f.name for f in fields(cls)]
        unknown = sorted(str(k)[:100] for k in set(data) - set(known))
        if unknown:
            raise InvalidConfigError(
                f"unknown UniLoraConfig field(s) {unknown}: the adapter was written by a newer or different "
                f"library; known fields are {known}"
            )
        return cls(**data)

    @classmethod
    def from_pretrained(cls, adapter: str | os.PathLike, **hub_kwargs) -> "UniLoraConfig":
        """The config of a stored adapter: a local folder or a Hub repo id (``revision``, ``token``,
        ``cache_dir``, ``local_files_only``, ``endpoint`` as in `unilora_hf.load_adapter`). Either file
        format (unilora_hf's own, or PEFT's UNILORA) is read, checked as at loading."""
        from .hub import resolve_adapter
        from .serialization import read_adapter_config

        return read_adapter_config(resolve_adapter(adapter, **hub_kwargs)).config
