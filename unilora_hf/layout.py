"""Which modules of a model are adapted, in which order, and a fingerprint of that layout.

Target selection is PEFT 0.21.2's (``BaseTuner.inject_adapter`` with ``check_target_module_exists``):
modules are visited in ``model.named_modules()`` order, which is also the order of their slices in θ_D,
so position offsets agree with PEFT's; a module whose name matches a ``modules_to_save`` entry (the
regex ``(^|.*\\.)<entry>($|\\..*)``) is never a target; a list matches a name equal to an entry or ending
with ``"." + entry``, optionally restricted by ``layers_to_transform``/``layers_pattern``; a string is a
regex that must match the whole name; ``"all-linear"`` takes every ``nn.Linear``/``Conv1D`` except the
output embedding (or, for ``task_type="SEQ_CLS"`` without one, the first of ``classifier``/``score``).
Patterns come from config files, so they run on the ``regex`` module with a shared time budget
(`MatchBudget`): a pattern that backtracks catastrophically is refused within a second.

The fingerprint is ``sha256`` over the lines ``name:in x out:r``; the compact form groups modules whose
names differ only in their numeric path components (``model.layers.*.self_attn.q_proj``), so a config
stays small for any depth while still naming the first differing module on a mismatch.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
from transformers.pytorch_utils import Conv1D

from .config import DEFAULT_TARGETS, SUGGESTED_TARGETS, UniLoraConfig, compile_pattern, is_all_linear
from .errors import InvalidConfigError, LayoutMismatchError

SEQ_CLS_HEAD_NAMES = ("classifier", "score")
LINEAR_TYPES = (nn.Linear, Conv1D)
MATCH_SECONDS = 1.0
# D may exceed the adapted weights' own size by this factor (or reach SMALL_D): ranks above min(in, out) add
# nothing a full-rank update could not, and only serve to allocate gigabytes.
MAX_D_OVER_WEIGHTS = 4
SMALL_D = 1 << 24
MAX_D = (1 << 31) - 1


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
        return lora_views(flat, self.r, self.in_features, self.out_features)


def lora_views(flat: torch.Tensor, r: int, n_in: int, n_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) as views of ``flat``, a layer's slice of θ_D: A (r×n_in) then B (n_out×r)."""
    A, B = torch.split(flat, (r * n_in, r * n_out))
    return A.view(r, n_in), B.view(n_out, r)


class MatchBudget:
    """Regex matching of config patterns against module names within one shared time budget."""

    def __init__(self, seconds: float = MATCH_SECONDS):
        self.deadline = time.monotonic() + seconds
        self.seconds = seconds
        self._compiled: dict[str, object] = {}

    def _run(self, method: str, pattern: str, name: str, field: str):
        compiled = self._compiled.get(pattern)
        if compiled is None:
            compiled = self._compiled[pattern] = compile_pattern(pattern)
        left = self.deadline - time.monotonic()
        try:
            if left <= 0:
                raise TimeoutError
            return getattr(compiled, method)(name, timeout=left)
        except TimeoutError:
            raise InvalidConfigError(
                f"UniLoraConfig.{field} = {pattern[:200]!r} took more than {self.seconds:g} s to match this model's "
                "module names (the pattern backtracks catastrophically); use module-name suffixes or a simpler pattern"
            ) from None

    def fullmatch(self, pattern: str, name: str, field: str = "target_modules") -> bool:
        return self._run("fullmatch", pattern, name, field) is not None

    def match(self, pattern: str, name: str, field: str):
        return self._run("match", pattern, name, field)


def in_out_features(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, Conv1D):
        in_f, out_f = module.weight.shape
        return int(in_f), int(out_f)
    return module.in_features, module.out_features


def excluded_by_modules_to_save(config: UniLoraConfig) -> list[str]:
    """The ``modules_to_save`` entries that keep a module from being a target, as in PEFT: the config's, plus
    ``classifier``/``score`` for ``task_type="SEQ_CLS"`` (``PeftModelForSequenceClassification`` adds them
    before the adapter is injected)."""
    names = list(config.modules_to_save or [])
    if config.task_type == "SEQ_CLS":
        names += [n for n in SEQ_CLS_HEAD_NAMES if n not in names]
    return names


def head_entries(config: UniLoraConfig) -> list[str]:
    """The ``modules_to_save`` entries whose modules train in full, as in PEFT: the config's, plus
    ``classifier``/``score`` for SEQ_CLS and TOKEN_CLS, ``qa_outputs`` for QUESTION_ANS."""
    extra = {"SEQ_CLS": SEQ_CLS_HEAD_NAMES, "TOKEN_CLS": SEQ_CLS_HEAD_NAMES, "QUESTION_ANS": ("qa_outputs",)}
    names = list(config.modules_to_save or [])
    names += [n for n in extra.get(config.task_type, ()) if n not in names]
    return names


def effective_heads(model: nn.Module, config: UniLoraConfig, target_names: list[str]) -> list[str]:
    """The modules trained in full: every module whose name ends with a `head_entries` entry (PEFT's
    ``_set_trainable`` rule), outermost only. InvalidConfigError when a ``modules_to_save`` entry of the config
    matches nothing or a head is also adapted."""
    entries = head_entries(config)
    chosen: list[str] = []
    for name, _ in model.named_modules():
        if name and any(name.endswith(e) for e in entries) and not any(name.startswith(c + ".") for c in chosen):
            chosen.append(name)
    user = config.modules_to_save or []
    if user and not any(name.endswith(e) for e in user for name in chosen):
        raise InvalidConfigError(
            f"UniLoraConfig.modules_to_save = {user!r} matched no module of {type(model).__name__}; its top-level "
            f"modules are {[n for n, _ in model.named_children()]}"
        )
    for head in chosen:
        for target in target_names:
            if target == head or target.startswith(head + ".") or head.startswith(target + "."):
                raise InvalidConfigError(
                    f"{head!r} would be both trained in full (modules_to_save / task_type {config.task_type}) and "
                    f"adapted ({target!r} is a target); leave it out of target_modules"
                )
    return chosen


def _layer_index(name: str, patterns, budget: MatchBudget) -> int | None:
    if not patterns:
        match = budget.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name, "layers_pattern")
    else:
        match = None
        for pattern in [patterns] if isinstance(patterns, str) else patterns:
            match = budget.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name, "layers_pattern")
            if match:
                break
    return int(match.group("idx")) if match else None


def all_linear_names(model: nn.Module, task_type: str | None) -> set[str]:
    """PEFT's ``"all-linear"``: every Linear/Conv1D except the output embedding; for a SEQ_CLS task without one,
    except the first classifier head found (only that module itself, not its children)."""
    from transformers import PreTrainedModel

    names = {n for n, m in model.named_modules() if isinstance(m, LINEAR_TYPES)}
    if isinstance(model, PreTrainedModel):
        out_emb = model.get_output_embeddings()
        if out_emb is not None:
            names -= {next(n for n, m in model.named_modules() if m is out_emb)}
        elif task_type == "SEQ_CLS":
            for head in SEQ_CLS_HEAD_NAMES:
                module = getattr(model, head, None)
                if module is not None:
                    names -= {next(n for n, m in model.named_modules() if m is module)}
                    break
    return names


def default_targets(model: nn.Module) -> list[str] | str:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in DEFAULT_TARGETS:
        hint = f" (the paper's choice here: {SUGGESTED_TARGETS[model_type]})" if model_type in SUGGESTED_TARGETS else ""
        raise InvalidConfigError(
            f"UniLoraConfig.target_modules is None and there is no default for model type {model_type!r}, as in PEFT; "
            f"set target_modules (suffixes, a regex, or 'all-linear'){hint}. Linear modules: {_linear_summary(model)}"
        )
    return DEFAULT_TARGETS[model_type]


def resolve_targets(model: nn.Module, config: UniLoraConfig,
                    budget: MatchBudget | None = None) -> list[tuple[str, nn.Module]]:
    """The (name, module) pairs to adapt, in ``named_modules()`` order. Raises InvalidConfigError when the
    targets match nothing (listing the model's linear modules), match a module that is not Linear/Conv1D,
    or take too long to match."""
    budget = budget or MatchBudget()
    targets = config.target_modules if config.target_modules is not None else default_targets(model)
    if is_all_linear(targets):
        targets = all_linear_names(model, config.task_type)
    saved = excluded_by_modules_to_save(config)
    layers = config.layers_to_transform
    using_layers = layers is not None and (len(layers) != 0 if isinstance(layers, list) else True)
    chosen = []
    for name, module in model.named_modules():
        if not name:
            continue
        if saved and any(budget.match(rf"(^|.*\.){m}($|\..*)", name, "modules_to_save") for m in saved):
            continue
        if isinstance(targets, str):
            hit = budget.fullmatch(targets, name)
        elif name in targets:
            hit = True
        else:
            hit = any(name.endswith("." + t) for t in targets)
            if hit and using_layers:
                index = _layer_index(name, config.layers_pattern, budget)
                hit = index is not None and (index == layers if isinstance(layers, int) else index in layers)
        if not hit:
            continue
        if not isinstance(module, LINEAR_TYPES):
            raise InvalidConfigError(
                f"target_modules matched {name!r}, a {type(module).__name__}; Uni-LoRA adapts nn.Linear and "
                f"transformers' Conv1D only (as PEFT's UniLoRA). Name its linear children instead, e.g. "
                f"{_linear_summary(module)}"
            )
        chosen.append((name, module))
    if not chosen:
        shown = sorted(targets) if isinstance(targets, (set, list)) else targets
        raise InvalidConfigError(
            f"target_modules={str(shown)[:300]} (layers_to_transform={config.layers_to_transform!r}) matched no "
            f"module of {type(model).__name__}. Its linear modules are: {_linear_summary(model)}"
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


def total_size(specs: list[LayerSpec]) -> int:
    """D: the number of LoRA parameters of the layout."""
    return specs[-1].offset + specs[-1].size if specs else 0


def check_sizes(specs: list[LayerSpec], config: UniLoraConfig) -> int:
    """D, after checking it before anything of size D exists: at most MAX_D, at most MAX_D_OVER_WEIGHTS times the
    adapted weights (or SMALL_D), and at least d."""
    D = total_size(specs)
    weights = sum(s.in_features * s.out_features for s in specs)
    if D > MAX_D or D > max(MAX_D_OVER_WEIGHTS * weights, SMALL_D):
        raise InvalidConfigError(
            f"UniLoraConfig.r = {config.r} gives D = {D:,} LoRA parameters over {len(specs)} layers whose weights hold "
            f"{weights:,}: more than {MAX_D_OVER_WEIGHTS}x their size (and above {SMALL_D:,}). Use a smaller r (a rank "
            "above min(in, out) adds nothing)"
        )
    if config.theta_d_length > D:
        raise InvalidConfigError(
            f"UniLoraConfig.theta_d_length = {config.theta_d_length:,} exceeds D = {D:,}, the number of LoRA parameters "
            f"of the {len(specs)} adapted layers: {config.theta_d_length - D:,} entries of θ_d would never be used. "
            f"Use theta_d_length <= {D:,} (or adapt more layers, or raise r)"
        )
    return D


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


def expand(groups: list[dict], limit: int) -> dict[str, tuple[int, int]]:
    """Inverse of `compact`: module name -> (in, out). ``groups`` are read from a file, so they are checked,
    and more than ``limit`` names is refused before they are built (LayoutMismatchError)."""
    from .errors import AdapterFormatError

    bad = AdapterFormatError("the adapter's layout record is malformed; the config file is corrupt")
    names: dict[str, tuple[int, int]] = {}

    def add(name: str, shape: tuple[int, int]) -> None:
        names[name] = shape
        if len(names) > limit:
            raise LayoutMismatchError(
                f"layout mismatch: the adapter adapts more than {limit} modules, more than this base has; load it onto "
                "the base model it was trained for"
            )

    if not isinstance(groups, list):
        raise bad
    for g in groups:
        if not isinstance(g, dict) or set(g) != {"modules", "shape", "at"}:
            raise bad
        template, shape, at = g["modules"], g["shape"], g["at"]
        if not (isinstance(template, str) and isinstance(at, str) and isinstance(shape, list) and len(shape) == 2
                and all(type(s) is int and s > 0 for s in shape) and len(template) <= 1000):
            raise bad
        shape = (shape[0], shape[1])
        stars = template.split(".").count("*")
        if stars == 0:
            add(template, shape)
            continue
        for item in at.split(","):
            if "-" in item:
                lo, _, hi = item.partition("-")
                if not (lo.isdigit() and hi.isdigit() and len(lo) < 10 and len(hi) < 10) or stars != 1:
                    raise bad
                if int(hi) - int(lo) + 1 > limit:
                    add("", shape)  # one name too many either way: refuse before building the range
                    raise bad
                numbers = [[str(n)] for n in range(int(lo), int(hi) + 1)]
            else:
                numbers = [item.split(".")]
            for nums in numbers:
                if len(nums) != stars or not all(n.isdigit() for n in nums):
                    raise bad
                it = iter(nums)
                add(".".join(next(it) if p == "*" else p for p in template.split(".")), shape)
    return names


def check_layout(specs: list[LayerSpec], stored_groups: list[dict], stored_fingerprint: str) -> None:
    """Raise LayoutMismatchError naming the first module where the model differs from the adapter."""
    if fingerprint(specs) == stored_fingerprint:
        return
    stored = expand(stored_groups, limit=max(4 * len(specs), 64))
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
