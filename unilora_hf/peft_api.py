"""PEFT's names on an adapted model, by composition: functions bound to the model instance.

A PEFT user types ``model.print_trainable_parameters()``, ``with model.disable_adapter():``,
``model.merge_and_unload()`` or ``model.save_pretrained(dir)``. `install` sets these as attributes of the model
*instance* when an adapter is attached (the class stays transformers' own; only this object's attribute
lookup changes) and `uninstall` removes them when it is unloaded, so the class's methods (transformers'
``save_pretrained`` for a full checkpoint, its PEFT integration's ``disable_adapters``) come back.

``save_pretrained(dir)`` writes the adapter (kilobytes), as PEFT's model does; ``save_pretrained(dir,
merged=True)`` writes a complete transformers checkpoint with ΔW merged into the weights (computed out of
place: the live model is not changed), which loads with the base's own class and needs no unilora_hf.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch
import torch.nn as nn

from .errors import AdapterStateError, InvalidArgumentError

def _adapter(model: nn.Module):
    adapter = model.__dict__.get("unilora_adapter")
    if adapter is None:
        raise AdapterStateError(f"{type(model).__name__} carries no Uni-LoRA adapter (it was unloaded)")
    return adapter


NAMES = ("save_pretrained", "push_to_hub", "print_trainable_parameters", "get_nb_trainable_parameters",
         "disable_adapter", "merge_and_unload", "unload", "merge_adapter", "unmerge_adapter", "load_adapter",
         "set_adapter", "delete_adapter", "active_adapters", "list_adapters")
WRAPPED = ("forward", "generate")


def get_nb_trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, all) parameter counts, each shared parameter once (PEFT's definition: ``all`` includes θ_d
    and both the original and the trainable copy of every head)."""
    seen, trainable, total = set(), 0, 0
    for param in model.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        total += param.numel()
        if param.requires_grad:
            trainable += param.numel()
    return trainable, total


def trainable_line(model: nn.Module) -> str:
    trainable, total = get_nb_trainable_parameters(model)
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"


def merged_state_dict(adapter) -> dict[str, torch.Tensor]:
    """The model's state as the base model names it, with ΔW merged into every adapted weight, the trained
    heads and biases in place; computed out of place (the live model is unchanged)."""
    from .layer import ModulesToSave, UniLoraLinear, logical_name

    model = adapter.model
    theta_D = adapter._theta_D_now()
    from .kernels import merge_delta_

    state: dict[str, torch.Tensor] = {}
    replaced: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if isinstance(module, UniLoraLinear) and not module.merged:
            weight = module.base_layer.weight
            A, B = adapter._layer_pair(theta_D, module, weight.device)
            replaced[f"{name}.weight"] = merge_delta_(weight, A, B, fan_in_fan_out=module.spec.fan_in_fan_out,
                                                      out=torch.empty_like(weight))
    heads = {n for n, m in model.named_modules() if isinstance(m, ModulesToSave)}
    for key, tensor in model.state_dict().items():
        if key == "unilora_theta_d" or any(key.startswith(h + ".original_module.") for h in heads):
            continue
        name = logical_name(key)
        state[name] = replaced.get(name, tensor)
    return state


def save_pretrained(model: nn.Module, save_directory: str | os.PathLike, *, merged: bool = False,
                    is_main_process: bool = True, safe_serialization: bool = True, state_dict=None,
                    push_to_hub: bool = False, base_model_name_or_path: str | None = None, **kwargs) -> None:
    """The adapter (config + θ_d + heads, a few kilobytes) into ``save_directory``, as PEFT's model does; with
    ``merged=True``, a complete transformers checkpoint with ΔW merged in (``kwargs`` go to transformers'
    ``save_pretrained``, e.g. ``max_shard_size``). ``state_dict`` (passed by a plain ``Trainer``) is not
    needed: the adapter's own tensors are saved. Pickle output (``safe_serialization=False``) is refused."""
    if not safe_serialization:
        raise InvalidArgumentError("safe_serialization=False would write a pickle; unilora_hf writes safetensors only")
    if not is_main_process:
        return
    adapter = _adapter(model)
    if merged:
        cls_save = type(model).save_pretrained
        config = getattr(model, "config", None)
        tied = getattr(config, "tie_word_embeddings", None)
        untie = tied and any(s.name == _output_name(model) for s in adapter.layers)
        try:
            if untie:
                config.tie_word_embeddings = False  # the merged head differs from the input embeddings
            cls_save(model, save_directory, state_dict=merged_state_dict(adapter), push_to_hub=push_to_hub, **kwargs)
        finally:
            if untie:
                config.tie_word_embeddings = tied
        return
    unknown = sorted(set(kwargs) - {"selected_adapters", "save_embedding_layers", "max_shard_size", "variant",
                                    "token", "save_peft_format"})
    if unknown:
        raise InvalidArgumentError(
            f"save_pretrained of an adapted model got {unknown}, which apply to full checkpoints only; pass "
            "merged=True for a full checkpoint, or leave them out for the adapter"
        )
    adapter.save_adapter(save_directory, base_model_name_or_path=base_model_name_or_path)
    if push_to_hub:
        from .push import push_adapter

        push_adapter(save_directory, os.path.basename(os.path.abspath(save_directory)), token=kwargs.get("token"))


def _output_name(model: nn.Module) -> str | None:
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    if out is None:
        return None
    return next((n for n, m in model.named_modules() if m is out), None)


def push_to_hub(model: nn.Module, repo_id: str, *, private: bool | None = None, token: str | None = None,
                revision: str | None = None, commit_message: str | None = None, create_pr: bool = False,
                endpoint: str | None = None, **card) -> str:
    """`push_adapter` for this model: the adapter repo (config, θ_d, heads and a model card) in one commit."""
    from .push import push_adapter

    return push_adapter(model, repo_id, private=private, token=token, revision=revision,
                        commit_message=commit_message, create_pr=create_pr, endpoint=endpoint, **card)


def print_trainable_parameters(model: nn.Module) -> None:
    print(trainable_line(model))


@contextlib.contextmanager
def disable_adapter(model: nn.Module):
    """Inside, the model runs as its base (PEFT's ``with model.disable_adapter():``)."""
    with _adapter(model).disabled():
        yield


def merge_and_unload(model: nn.Module, progressbar: bool = False, safe_merge: bool = True,
                     adapter_names=None) -> nn.Module:
    return _adapter(model).unload(merge=True)


def unload(model: nn.Module) -> nn.Module:
    return _adapter(model).unload()


def merge_adapter(model: nn.Module, safe_merge: bool = True) -> None:
    _adapter(model).merge(safe_merge=safe_merge)


def unmerge_adapter(model: nn.Module) -> None:
    _adapter(model).unmerge()


def load_adapter(model: nn.Module, adapter: str | os.PathLike, adapter_name: str | None = None, **hub_kwargs):
    """Load another adapter of the same projection and layout under ``adapter_name`` (PEFT's
    ``model.load_adapter(path, adapter_name=...)``); it is kept beside the active one (`set_adapter`)."""
    from .loading import load_adapter as load

    return load(model, adapter, adapter_name=adapter_name, **hub_kwargs)


def set_adapter(model: nn.Module, adapter_name: str) -> None:
    _adapter(model).set_adapter(adapter_name)


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    _adapter(model).delete_adapter(adapter_name)


def active_adapters(model: nn.Module) -> list[str]:
    return [_adapter(model).active_adapter]


def list_adapters(model: nn.Module) -> list[str]:
    return _adapter(model).adapter_names


def _expansion(model: nn.Module, kwargs: dict) -> int:
    """How many rows ``generate`` makes of each input row: num_beams for beam search, else num_return_sequences."""
    config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    beams = kwargs.get("num_beams") or getattr(config, "num_beams", 1) or 1
    if beams > 1:
        return beams
    return kwargs.get("num_return_sequences") or getattr(config, "num_return_sequences", 1) or 1


class _AdapterNamesCall:
    """``model.<name>`` (forward or generate) that also takes PEFT's ``adapter_names=`` (one adapter per batch row)
    and otherwise calls the method it wraps: the class's, or ``original``, an instance attribute set before ours
    (accelerate's). ``__wrapped__`` is that method, so ``inspect.signature`` gives its parameters (Trainer keeps
    dataset columns by them); set once as an attribute (read through a property, it recursed without end under
    ``torch._dynamo.explain``). Compiled with autograd on, ``forward`` runs through the adapter's ``forward_pass``
    (a training pass reads θ_D out in the forward's graph); a compiled inference call reads nothing of the adapter
    here (no guard of its own at every decoded token). An instance pickles by the model, the name and
    ``original``, so an adapted model pickles too."""

    def __init__(self, model: nn.Module, name: str, original=None):
        self.model, self.name, self.original = model, name, original
        self.__wrapped__ = original if original is not None else getattr(type(model), name).__get__(model)

    def __call__(self, *args, adapter_names=None, **kwargs):
        method = self.__wrapped__
        if adapter_names is None:
            if self.name == "forward" and torch.is_grad_enabled() and torch.compiler.is_compiling():
                return _adapter(self.model).forward_pass(method, args, kwargs)  # a readout may be pending
            return method(*args, **kwargs)
        rows = list(adapter_names)
        if self.name == "generate":
            rows = [n for n in rows for _ in range(_expansion(self.model, kwargs))]
        with _adapter(self.model).mixed_batch(rows):
            return method(*args, **kwargs)

    def __reduce__(self):
        return _AdapterNamesCall, (self.model, self.name, self.original)


def install(model: nn.Module) -> None:
    """Bind PEFT's names on ``model`` (the instance, not the class), and let ``forward``/``generate`` take PEFT's
    ``adapter_names=`` (one adapter per batch row). Each is a ``functools.partial`` of this module's function or an
    ``_AdapterNamesCall``: both pickle (bound methods and closures in the instance's dict would not)."""
    for name in NAMES:
        model.__dict__[name] = functools.partial(globals()[name], model)
    for name in WRAPPED:
        if hasattr(model, name):
            model.__dict__[name] = _AdapterNamesCall(model, name, model.__dict__.get(name))


def uninstall(model: nn.Module) -> None:
    for name in NAMES:
        model.__dict__.pop(name, None)
    for name in WRAPPED:
        current = model.__dict__.get(name)
        if isinstance(current, _AdapterNamesCall):
            if current.original is not None:
                model.__dict__[name] = current.original
            else:
                model.__dict__.pop(name, None)
