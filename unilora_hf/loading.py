"""Attaching adapter files to a base model: every check first, then one transaction.

`plan_load` compares `AdapterFiles` with the model without changing it: the adapted layout (fingerprint
and D when the files record them; D = Σ r·(in + out) is recomputed from the config in any case and must
hold d), PEFT's stored indices when present, and every trained tensor (names, shapes, dtypes). Only when
everything fits does `apply_adapter` inject the adapter (itself undone on any failure) and copy θ_d and
the tensors in. So a refused load leaves the caller's model bit-identical: parameters, buffers,
``requires_grad`` flags and modules.

Dtype rule for heads and biases: a floating-point tensor is cast to the dtype of the parameter it
replaces (exact when widening, round-to-nearest-even when narrowing); an integer buffer (BatchNorm's
counter) must have the live buffer's dtype. A tensor is never reinterpreted.
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn

from .errors import AdapterFormatError, AdapterStateError, InvalidArgumentError, InvalidConfigError, LayoutMismatchError
from .hub import resolve_adapter
from .layout import check_layout
from .model import (
    InjectionPlan, UniLoraAdapter, get_adapter, has_adapter, inject_adapter, plan_injection, refuse_adapted, unwrap,
)
from .projection import Projection
from .serialization import AdapterFiles, read_adapter


def _describe_names(names: list[str], limit: int = 8) -> str:
    shown = [n[:120] for n in names[:limit]]
    return str(shown) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def plan_load(model: nn.Module, files: AdapterFiles) -> InjectionPlan:
    """Check ``files`` against ``model`` (unchanged); returns the injection plan. Raises LayoutMismatchError
    when the base is not the one the adapter was trained on, AdapterFormatError when the files' tensors do
    not fit, InvalidConfigError when the config does not fit the model, AdapterStateError when the model
    already carries an adapter."""
    if not isinstance(model, nn.Module):
        raise InvalidArgumentError(
            f"model must be a loaded torch.nn.Module (e.g. from AutoModel.from_pretrained), got {type(model).__name__}; "
            "to load the base and the adapter in one call use UniLoraAutoModel.from_pretrained(base, adapter)"
        )
    model = unwrap(model)
    try:
        plan = plan_injection(model, files.config)
    except InvalidConfigError as exc:
        raise LayoutMismatchError(
            f"this base ({type(model).__name__}) does not fit the adapter in {files.folder}: {exc}. Load the adapter "
            "onto the base model it was trained for."
        ) from None
    if files.layout is not None:
        check_layout(plan.layers, files.layout["groups"], files.layout["fingerprint"])
    if files.D is not None and files.D != plan.D:
        raise LayoutMismatchError(
            f"the adapter was trained with D = {files.D:,} LoRA parameters; this base's adapted layers give "
            f"{plan.D:,}. Load the adapter onto the base model it was trained for."
        )
    _check_tensors(model, plan, files)
    if files.stored_indices:
        _check_stored_indices(plan, files)
    return plan


def _check_tensors(model: nn.Module, plan: InjectionPlan, files: AdapterFiles) -> None:
    expected = plan.state
    missing = sorted(set(expected) - set(files.tensors))
    unexpected = sorted(set(files.tensors) - set(expected))
    if missing or unexpected:
        raise AdapterFormatError(
            f"the adapter's trained tensors do not fit this model: missing {_describe_names(missing)}, unexpected "
            f"{_describe_names(unexpected)}. Check modules_to_save / bias / task_type and that the base model is "
            "the right one."
        )
    for name, tensor in files.tensors.items():
        live = expected[name]
        if tuple(live.shape) != tuple(tensor.shape):
            raise LayoutMismatchError(
                f"layout mismatch at {name!r}: shape {tuple(live.shape)} on this base, {tuple(tensor.shape)} in the "
                "adapter (for a classifier head, load the base with the adapter's num_labels)"
            )
        if live.is_floating_point() != tensor.is_floating_point() or (
            not live.is_floating_point() and live.dtype != tensor.dtype
        ):
            raise AdapterFormatError(
                f"{name!r} is {tensor.dtype} in the adapter and {live.dtype} in the model; a tensor is cast between "
                "floating-point dtypes only, never reinterpreted"
            )
    targets = {name for name, _ in plan.targets}
    params = dict(model.named_parameters())
    for module_name, weight in files.peft_base_weights.items():
        live = params.get(f"{module_name}.weight")
        if module_name not in targets or live is None or live.shape != weight.shape or not torch.equal(
            live.detach().cpu(), weight.to(live.dtype)
        ):
            raise LayoutMismatchError(
                f"the adapter carries a copy of the base weight of {module_name!r} (PEFT saves it beside an adapted "
                "output head) that differs from this base's; load the adapter onto the base model it was trained for"
            )


def _check_stored_indices(plan: InjectionPlan, files: AdapterFiles) -> None:
    projection = Projection.build(files.config.projection, files.config.proj_seed, plan.D, files.config.theta_d_length)
    for spec in plan.layers:
        for part, start, n in (("A", 0, spec.r * spec.in_features),
                               ("B", spec.r * spec.in_features, spec.r * spec.out_features)):
            key = f"{spec.name}.unilora_indices_{part}"
            if key in files.stored_indices:
                stored = files.stored_indices[key]
                ours = projection.indices(spec.offset + start, n)
                if stored.numel() != n or not torch.equal(stored.flatten().long(), ours):
                    raise AdapterFormatError(
                        f"the indices stored for {spec.name} ({part}) differ from PEFT 0.21.2's generate_index with "
                        f"seed {files.config.proj_seed}; the adapter was made by another PEFT version"
                    )


def apply_adapter(model: nn.Module, files: AdapterFiles) -> UniLoraAdapter:
    """Inject ``files`` into ``model`` and load θ_d and the trained tensors, after `plan_load` accepted them;
    on any failure the model is left as it was."""
    model = unwrap(model)
    plan = plan_load(model, files)
    adapter = inject_adapter(model, files.config, theta_d=files.theta_d, plan=plan)
    try:
        live = adapter.saved_state()
        with torch.no_grad():
            for name, tensor in files.tensors.items():
                target = live[name]
                target.copy_(tensor.to(device=target.device, dtype=target.dtype))
    except BaseException:
        adapter.unload()
        raise
    adapter.base_model_revision = files.base.revision
    return adapter


def load_adapter(model: nn.Module, adapter: str | os.PathLike, *, adapter_name: str | None = None,
                 revision: str | None = None, token: str | bool | None = None,
                 cache_dir: str | os.PathLike | None = None, local_files_only: bool = False,
                 endpoint: str | None = None):
    """Attach a stored adapter to ``model``, an already loaded base model, in place; returns the
    `UniLoraAdapter` handle (also ``unilora_hf.get_adapter(model)``).

    ``adapter`` is a local folder or a Hub repo id; ``revision`` (branch, tag or commit sha), ``token``,
    ``cache_dir``, ``local_files_only`` and ``endpoint`` mean what they mean in ``hf_hub_download``, and
    ``HF_HUB_OFFLINE=1`` serves the adapter from the cache. Either file format loads (unilora_hf's native
    one, or PEFT's UNILORA one). Every check runs before the model is touched: the files' integrity, the
    projection rebuilt from the stored seed, the model's adapted layers against the stored layout
    (LayoutMismatchError names the first difference), every trained tensor's name, shape and dtype; a refused
    load leaves the model bit-identical. θ_d (float32, on the device of the model's first adapted weight)
    and any trained heads (cast to the model's dtype) are loaded. The adapter starts unmerged and enabled;
    the model's train/eval mode is left as it is.

    ``adapter_name``: on a model that already carries an adapter, load this one beside it under that name (it must
    share the projection and layout; see `add_adapter`); on a plain model, the first adapter's name
    (default ``"default"``).
    """
    if not isinstance(model, nn.Module):
        raise InvalidArgumentError(
            f"model must be a loaded torch.nn.Module (e.g. from AutoModel.from_pretrained), got {type(model).__name__}; "
            "to load the base and the adapter in one call use UniLoraAutoModel.from_pretrained(base, adapter)"
        )
    model = unwrap(model)
    if has_adapter(model) and adapter_name is not None:
        folder = resolve_adapter(adapter, revision=revision, token=token, cache_dir=cache_dir,
                                 local_files_only=local_files_only, endpoint=endpoint)
        return add_adapter(model, adapter_name, read_adapter(folder))
    if has_adapter(model):
        raise AdapterStateError(
            "this model already has a Uni-LoRA adapter; pass adapter_name=... to load another one beside it "
            "(model.set_adapter switches, adapter_names=[...] mixes them per batch row), or unload() the first"
        )
    refuse_adapted(model)
    folder = resolve_adapter(adapter, revision=revision, token=token, cache_dir=cache_dir,
                             local_files_only=local_files_only, endpoint=endpoint)
    handle = apply_adapter(model, read_adapter(folder))
    if adapter_name is not None:
        handle.rename_default(adapter_name)
    return handle


def add_adapter(model: nn.Module, name: str, files: AdapterFiles):
    """Keep the adapter of ``files`` beside the resident one(s) of ``model`` under ``name``: it must share their
    projection (kind, seed, d, D), layout and trained tensors (LayoutMismatchError otherwise: such an adapter needs
    its own copy of the base). Costs reading θ_d (d values) and its heads; nothing of size D."""
    handle = get_adapter(model)
    handle.check_compatible(name, files.config, files.D, (files.layout or {}).get("fingerprint"), files.tensors)
    live = handle.saved_state()
    for key, tensor in files.tensors.items():
        if live[key].is_floating_point() != tensor.is_floating_point():
            raise AdapterFormatError(f"{key!r} is {tensor.dtype} in adapter {name!r} and {live[key].dtype} in the model")
    handle.add(name, files.theta_d, files.tensors)
    return handle
