"""`UniLoraConfig`: the hyperparameters of a Uni-LoRA adapter, validated when constructed.

Every field is checked in ``__post_init__``; a bad value raises ``ValueError`` naming the field, the
value and what is allowed. ``to_dict``/``from_dict`` round-trip every field; ``from_dict`` refuses
unknown fields rather than dropping them.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .projection import SPEC_VERSIONS

ALL_LINEAR = "all-linear"
BIAS_MODES = ("none", "all", "unilora_only")

# Default targets by `config.model_type`, as in the paper and PEFT (attention query and value).
DEFAULT_TARGETS = {
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"],
    "deberta-v2": ["query_proj", "value_proj"],
    "gpt2": ["c_attn"],
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "opt": ["q_proj", "v_proj"],
    "phi3": ["qkv_proj"],
    "t5": ["q", "v"],
    "bart": ["q_proj", "v_proj"],
    "vit": ["query", "value"],
}


def _bad(name: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"UniLoraConfig.{name} = {value!r} is invalid: {allowed}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class UniLoraConfig:
    """Configuration of a Uni-LoRA adapter (arXiv 2506.00799).

    Args:
        r: LoRA rank of every adapted layer (paper: 4).
        theta_d_length: d, the length of the one trained vector θ_d (paper: 23,040 for GLUE with
            RoBERTa, 524,288 for 7B LLMs; PEFT's default of 256 trains to almost nothing).
        proj_seed: seed of the fixed projection; with the same seed and ``projection="peft"`` the
            projection equals PEFT 0.21.2's.
        projection: ``"native"`` (computed on the fly, nothing of size D stored) or ``"peft"``
            (bit-identical to PEFT's, so the adapter interchanges with PEFT).
        target_modules: module-name suffixes (a list), a regular expression that must match the whole
            module name (a string), ``"all-linear"`` (every Linear/Conv1D except the output head), or
            None for the architecture's default (query and value).
        layers_to_transform: restrict adaptation to these layer indices (needs a list of targets).
        layers_pattern: the name of the layer list (``"layers"``, ``"h"``, ...) used to find a layer
            index; None finds the first numbered segment.
        unilora_dropout: dropout on the input of the LoRA path, in [0, 1).
        init_theta_d_bound: θ_d starts uniform in [-bound, bound].
        modules_to_save: modules (e.g. a classifier head) trained as full copies and saved.
        bias: which biases train: ``"none"``, ``"all"`` or ``"unilora_only"`` (adapted layers').
        fan_in_fan_out: True when the targets store weights as (in, out) (GPT-2's Conv1D). Detected per
            layer; recorded for PEFT interchange.
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

    def __post_init__(self) -> None:
        if not _is_int(self.r) or self.r <= 0:
            raise _bad("r", self.r, "the rank must be a positive integer (the paper uses 4)")
        if not _is_int(self.theta_d_length) or self.theta_d_length <= 0:
            raise _bad("theta_d_length", self.theta_d_length, "d must be a positive integer (e.g. 23040)")
        if not _is_int(self.proj_seed) or not 0 <= self.proj_seed < 2**63:
            raise _bad("proj_seed", self.proj_seed, "the seed must be an integer in [0, 2^63)")
        if self.projection not in SPEC_VERSIONS:
            raise _bad("projection", self.projection, f"use one of {sorted(SPEC_VERSIONS)}")
        self._check_targets()
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)
        self._check_layers()
        if not isinstance(self.unilora_dropout, (int, float)) or isinstance(self.unilora_dropout, bool) or not (
            0.0 <= self.unilora_dropout < 1.0
        ):
            raise _bad("unilora_dropout", self.unilora_dropout, "dropout must be a number in [0, 1)")
        bound = self.init_theta_d_bound
        if isinstance(bound, bool) or not isinstance(bound, (int, float)) or not math.isfinite(bound) or bound <= 0:
            raise _bad("init_theta_d_bound", bound, "the bound must be a finite number > 0 (paper: 0.02)")
        if self.modules_to_save is not None:
            if isinstance(self.modules_to_save, str) or not all(
                isinstance(m, str) and m for m in self.modules_to_save
            ):
                raise _bad("modules_to_save", self.modules_to_save, "give a list of module names, e.g. ['classifier']")
            self.modules_to_save = list(self.modules_to_save)
        if self.bias not in BIAS_MODES:
            raise _bad("bias", self.bias, f"use one of {list(BIAS_MODES)}")
        if not isinstance(self.fan_in_fan_out, bool):
            raise _bad("fan_in_fan_out", self.fan_in_fan_out, "must be True or False")

    def _check_targets(self) -> None:
        t = self.target_modules
        if t is None:
            return
        if isinstance(t, str):
            if not t:
                raise _bad("target_modules", t, "give module-name suffixes, a regex, 'all-linear' or None")
            if t != ALL_LINEAR:
                try:
                    re.compile(t)
                except re.error as exc:
                    raise _bad("target_modules", t, f"the string is not a valid regular expression ({exc})") from None
            return
        if not isinstance(t, (list, tuple)) or not t or not all(isinstance(m, str) and m for m in t):
            raise _bad("target_modules", t, "give a non-empty list of module-name suffixes, a regex string, "
                       "'all-linear' or None")

    def _check_layers(self) -> None:
        layers = self.layers_to_transform
        if layers is None:
            if self.layers_pattern is not None:
                raise _bad("layers_pattern", self.layers_pattern, "it only applies together with layers_to_transform")
            return
        if isinstance(self.target_modules, str):
            raise _bad("layers_to_transform", layers, "it needs target_modules as a list of suffixes, not a string")
        items = [layers] if _is_int(layers) else layers
        if not isinstance(items, (list, tuple)) or not items or not all(_is_int(i) and i >= 0 for i in items):
            raise _bad("layers_to_transform", layers, "give a non-negative layer index or a list of them")
        if isinstance(layers, tuple):
            self.layers_to_transform = list(layers)
        pattern = self.layers_pattern
        if pattern is not None:
            items = [pattern] if isinstance(pattern, str) else pattern
            if not isinstance(items, (list, tuple)) or not all(isinstance(p, str) and p for p in items):
                raise _bad("layers_pattern", pattern, "give a layer-list name such as 'layers' or a list of them")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "UniLoraConfig":
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(
                f"unknown UniLoraConfig field(s) {unknown}: the adapter was written by a newer or different "
                f"library; known fields are {known}"
            )
        return cls(**data)
