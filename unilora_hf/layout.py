"""Which modules of a model are adapted, in which order, and a fingerprint of that layout.

The layout is the ordered list of adapted layers (module name, in/out features, r). Its order is
``model.named_modules()`` order, which is also PEFT's, so position offsets in θ_D agree with PEFT.
The fingerprint is ``sha256`` over the lines ``name:in x out:r``; the compact form groups modules
whose names differ only in their numeric path components (``model.layers.*.self_attn.q_proj``), so a
config stays small for any depth while still naming the first differing module on a mismatch.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
from transformers.pytorch_utils import Conv1D

from .config import ALL_LINEAR, DEFAULT_TARGETS, UniLoraConfig
from .errors import LayoutMismatchError

SEQ_CLS_HEAD_NAMES = ("classifier", "score")
LINEAR_TYPES = (nn.Linear, Conv1D)


@dataclass(frozen=True)
class LayerSpec:
    """One adapted layer: its slice [offset, offset + size) of θ_D holds A (r×in) then B (out×r)."""

    name: str
    in_features: int
    out_features: int
    r: int
    offset: int
    fan_in_fan_out: bool

    @property
    def size(self) -> int:
        return self.r * (self.in_features + self.out_features)

    @property
    def split_sizes(self) -> tuple[int, int]:
        """Entries of A and of B in the layer's slice."""
        return self.r * self.in_features, self.r * self.out_features

    def lora_views(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) as views of ``flat``, the layer's slice of θ_D (``size`` entries)."""
        A, B = torch.split(flat, self.split_sizes)
        return A.view(self.r, self.in_features), B.view(self.out_features, self.r)


def in_out_features(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, Conv1D):
        in_f, out_f = module.weight.shape
        return int(in_f), int(out_f)
    return module.in_features, module.out_features


def _name_matches(name: str, suffixes) -> bool:
    return any(name == s or name.endswith("." + s) for s in suffixes)


def _layer_index(name: str, patterns) -> int | None:
    if not patterns:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        match = None
        for pattern in [patterns] if isinstance(patterns, str) else patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
            if match:
                break
    return int(match.group("idx")) if match else None


def _excluded_heads(model: nn.Module) -> set[str]:
    """Output heads left out by 'all-linear': the output embedding, else a classifier head (and children)."""
    heads = []
    get_out = getattr(model, "get_output_embeddings", None)
    out_emb = get_out() if callable(get_out) else None
    if out_emb is not None:
        heads.append(out_emb)
    else:
        heads += [getattr(model, n) for n in SEQ_CLS_HEAD_NAMES if isinstance(getattr(model, n, None), nn.Module)]
    ids = {id(h) for h in heads}
    excluded: set[str] = set()
    for name, module in model.named_modules():
        if id(module) in ids:
            excluded |= {name} | {f"{name}.{sub}" for sub, _ in module.named_modules() if sub}
    return excluded


def resolve_targets(model: nn.Module, config: UniLoraConfig) -> list[tuple[str, nn.Module]]:
    """The (name, module) pairs to adapt, in ``named_modules()`` order. Raises ValueError when the
    pattern matches nothing (listing the model's linear modules) or matches a non-linear module."""
    targets = config.target_modules
    if targets is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in DEFAULT_TARGETS:
            raise ValueError(
                f"UniLoraConfig.target_modules is None and there is no default for model type {model_type!r}; "
                f"set target_modules (suffixes, a regex, or 'all-linear'). Linear modules: {_linear_summary(model)}"
            )
        targets = DEFAULT_TARGETS[model_type]
    saved = config.modules_to_save or []
    excluded = _excluded_heads(model) if targets == ALL_LINEAR else set()
    chosen = []
    for name, module in model.named_modules():
        if not name or (saved and any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", name) for m in saved)):
            continue
        if targets == ALL_LINEAR:
            hit = isinstance(module, LINEAR_TYPES) and name not in excluded
        elif isinstance(targets, str):
            hit = re.fullmatch(targets, name) is not None
        else:
            hit = _name_matches(name, targets)
            if hit and config.layers_to_transform is not None:
                index = _layer_index(name, config.layers_pattern)
                wanted = config.layers_to_transform
                hit = index is not None and (index == wanted if isinstance(wanted, int) else index in wanted)
        if not hit:
            continue
        if not isinstance(module, LINEAR_TYPES):
            raise ValueError(
                f"target_modules matched {name!r}, a {type(module).__name__}; Uni-LoRA adapts nn.Linear and "
                f"Conv1D only. Name its linear children instead, e.g. {_linear_summary(module)}"
            )
        chosen.append((name, module))
    if not chosen:
        raise ValueError(
            f"target_modules={targets!r} (layers_to_transform={config.layers_to_transform!r}) matched no module "
            f"of {type(model).__name__}. Its linear modules are: {_linear_summary(model)}"
        )
    return chosen


def _linear_summary(model: nn.Module, limit: int = 40) -> str:
    names = [n for n, m in model.named_modules() if n and isinstance(m, LINEAR_TYPES)]
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in names})
    shown = ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")
    return f"[{shown}] (suffixes: {suffixes})" if names else "none"


def build_layout(targets: list[tuple[str, nn.Module]], r: int) -> list[LayerSpec]:
    specs, offset = [], 0
    for name, module in targets:
        in_f, out_f = in_out_features(module)
        spec = LayerSpec(name, in_f, out_f, r, offset, isinstance(module, Conv1D))
        specs.append(spec)
        offset += spec.size
    return specs


def fingerprint(specs: list[LayerSpec]) -> str:
    text = "\n".join(f"{s.name}:{s.in_features}x{s.out_features}:{s.r}" for s in specs)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def _ranges(numbers: list[int]) -> str:
    parts, start = [], None
    for i, n in enumerate(numbers):
        if start is None:
            start = n
        if i + 1 == len(numbers) or numbers[i + 1] != n + 1:
            parts.append(str(start) if start == n else f"{start}-{n}")
            start = None
    return ",".join(parts)


def compact(specs: list[LayerSpec]) -> list[dict]:
    """Group modules by name template and shape: ``{"modules": "a.*.q", "shape": [in, out], "at": "0-21"}``.
    Names with several numeric components list them as dotted tuples (``"0.1,0.2"``)."""
    groups: dict[tuple, list[str]] = {}
    for s in specs:
        parts = s.name.split(".")
        template = ".".join("*" if p.isdigit() else p for p in parts)
        groups.setdefault((template, s.in_features, s.out_features), []).append(
            ".".join(p for p in parts if p.isdigit())
        )
    out = []
    for (template, in_f, out_f), where in groups.items():
        if all(w.isdigit() for w in where) and where:
            at = _ranges([int(w) for w in where])
        else:
            at = ",".join(where)
        out.append({"modules": template, "shape": [in_f, out_f], "at": at})
    return out


def expand(groups: list[dict]) -> dict[str, tuple[int, int]]:
    """Inverse of `compact`: module name -> (in, out)."""
    names: dict[str, tuple[int, int]] = {}
    for g in groups:
        template, shape, at = g["modules"], tuple(g["shape"]), g["at"]
        if "*" not in template:
            names[template] = shape
            continue
        for item in at.split(","):
            if "-" in item:
                lo, hi = item.split("-")
                numbers = [[str(n)] for n in range(int(lo), int(hi) + 1)]
            else:
                numbers = [item.split(".")]
            for nums in numbers:
                it = iter(nums)
                names[".".join(next(it) if p == "*" else p for p in template.split("."))] = shape
    return names


def check_layout(specs: list[LayerSpec], stored_groups: list[dict], stored_fingerprint: str) -> None:
    """Raise LayoutMismatchError naming the first module where the model differs from the adapter."""
    if fingerprint(specs) == stored_fingerprint:
        return
    stored = expand(stored_groups)
    for s in specs:
        if s.name not in stored:
            raise LayoutMismatchError(
                f"layout mismatch: this base adapts {s.name!r} ({s.in_features}x{s.out_features}), which the "
                "adapter was not trained on. Load the adapter onto the base model it was trained for."
            )
        if stored[s.name] != (s.in_features, s.out_features):
            a, b = stored[s.name]
            raise LayoutMismatchError(
                f"layout mismatch at {s.name!r}: shape {s.in_features}x{s.out_features} (in x out) on this base, "
                f"{a}x{b} in the adapter. Load the adapter onto the base model it was trained for."
            )
    present = {s.name for s in specs}
    for name, (a, b) in stored.items():
        if name not in present:
            raise LayoutMismatchError(
                f"layout mismatch: the adapter has {name!r} ({a}x{b}), which this base does not adapt. "
                "Load the adapter onto the base model it was trained for."
            )
    raise LayoutMismatchError(
        "layout mismatch: the same modules and shapes, but in another order or rank than the adapter's "
        f"(fingerprint {fingerprint(specs)} here, {stored_fingerprint} in the adapter)."
    )
