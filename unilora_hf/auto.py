"""`UniLoraAutoModel`: a base model plus a Uni-LoRA adapter, in one call, ready to use."""

from __future__ import annotations

import contextlib
import logging
import os

import torch.nn as nn

from .errors import AdapterFormatError, BaseModelError, InvalidArgumentError, UniLoraError
from .hub import resolve_adapter
from .loading import apply_adapter
from .serialization import AdapterFiles, read_adapter


def model_class_for(files: AdapterFiles, base_config) -> type:
    """The transformers class to build the base with: the task class the adapter records (e.g.
    AutoModelForSequenceClassification), else the base's own ``architectures[0]`` when transformers has
    it, else AutoModel. Only classes of the transformers package itself: never remote code."""
    import transformers

    auto = files.base.auto_class
    if auto and auto != "AutoModel":
        cls = getattr(transformers, auto, None)
        if cls is None:
            raise AdapterFormatError(f"the adapter asks for transformers.{auto}, which this transformers lacks")
        return cls
    for arch in getattr(base_config, "architectures", None) or []:
        cls = getattr(transformers, arch, None) if isinstance(arch, str) and arch.isidentifier() else None
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            return cls
    return transformers.AutoModel


@contextlib.contextmanager
def _quiet_about(files: AdapterFiles):
    """While the base loads: no "... newly initialized" warning for weights the adapter is about to supply (its
    trained head), which would read as if the head were random. Other warnings stay."""
    from transformers.utils import logging as hf_logging

    if not files.tensors:
        yield
        return
    logger = hf_logging.get_logger("transformers.modeling_utils")
    heads = {name.rsplit(".", 1)[0] for name in files.tensors}

    class _Filter(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            text = record.getMessage()
            return not (("newly initialized" in text or "MISSING" in text)
                        and all(any(h in line for h in heads) for line in _weight_lines(text)))

    f = _Filter()
    logger.addFilter(f)
    try:
        yield
    finally:
        logger.removeFilter(f)


def _weight_lines(text: str) -> list[str]:
    """The parameter names a transformers loading report lists (lines naming a ``*.weight``/``*.bias``)."""
    return [line for line in text.splitlines() if ".weight" in line or ".bias" in line] or [text]


class UniLoraAutoModel:
    """Loads ``base`` with the right transformers class and attaches the adapter to it."""

    @classmethod
    def from_pretrained(cls, base: str | os.PathLike | nn.Module | None, adapter: str | os.PathLike | None = None, *,
                        revision: str | None = None, merge: bool = False, dtype=None, device_map=None,
                        token: str | bool | None = None, cache_dir: str | None = None,
                        local_files_only: bool = False, base_revision: str | None = None,
                        endpoint: str | None = None, adapter_name: str | None = None, **model_kwargs) -> nn.Module:
        """Load ``adapter`` (a folder or Hub repo id at ``revision``) onto ``base``; with one argument,
        ``from_pretrained(adapter)``, onto the base model the adapter records.

        ``base`` is a Hub model id, a local folder, an already loaded ``PreTrainedModel``, or None to use
        the base model recorded in the adapter (its Hub id and revision, or the local folder it was trained
        from when that still exists here). The model class is the task class the adapter records, else
        the base's own ``architectures``; classifier settings (``num_labels``, labels) come from the
        adapter; ``dtype``, ``device_map`` and other keyword arguments (``trust_remote_code`` included: only
        yours count, never the adapter's) go to the base's ``from_pretrained``. The adapter is checked
        completely before the model is changed; θ_d and the heads are loaded. With ``merge=True`` ΔW is
        merged into the weights and the wrappers removed (a plain transformers model at the base model's
        speed); otherwise the adapter stays unmerged (``unilora_hf.get_adapter(model)`` merges, unmerges or
        disables it later). ``adapter_name`` names it (default ``"default"``), as PEFT's ``adapter_name``: more
        adapters join it with ``model.load_adapter(other, adapter_name=...)``. The model is returned in eval mode.
        """
        if adapter_name is not None and (not isinstance(adapter_name, str) or not adapter_name
                                         or adapter_name == "__base__" or len(adapter_name) > 200):
            raise InvalidArgumentError(f"adapter_name {adapter_name!r} is not a usable name (non-empty, not "
                                       "'__base__')")
        if adapter is None:
            if isinstance(base, nn.Module) or base is None:
                raise InvalidArgumentError("from_pretrained(adapter) takes the adapter (a folder or Hub repo id); "
                                           "to use a loaded model, call from_pretrained(model, adapter)")
            base, adapter = None, base
        folder = resolve_adapter(adapter, revision=revision, token=token, cache_dir=cache_dir,
                                 local_files_only=local_files_only, endpoint=endpoint)
        files = read_adapter(folder)
        if isinstance(base, nn.Module):
            model = base
            if dtype is not None or device_map is not None:
                model = model.to(device=device_map if isinstance(device_map, str) and device_map != "auto" else None,
                                 dtype=dtype)
        else:
            model = cls._load_base(files, base, dtype=dtype, device_map=device_map, token=token, cache_dir=cache_dir,
                                   local_files_only=local_files_only, base_revision=base_revision, **model_kwargs)
        handle = apply_adapter(model, files)
        if adapter_name is not None:
            handle.rename_default(adapter_name)
        if merge:
            model = handle.merge_and_unload()
        return model.eval()

    @staticmethod
    def _load_base(files: AdapterFiles, base, *, dtype, device_map, token, cache_dir, local_files_only,
                   base_revision, **model_kwargs) -> nn.Module:
        from transformers import AutoConfig

        name = base if base is not None else files.base.name_or_path
        if not name:
            hint = f" (it was trained on a local folder named {files.base.local_name!r})" if files.base.local_name else ""
            raise AdapterFormatError(f"the adapter records no base model{hint}: pass the base as the first argument "
                                     "(a Hub id, a folder or a loaded model)")
        name = str(name)
        if base is None and files.base.is_local and not os.path.isdir(name):
            raise BaseModelError(
                f"the adapter records its base as the local folder {name}, which does not exist here: pass the base "
                "as the first argument (a Hub id, a folder or a loaded model)"
            )
        revision = base_revision if base is not None or base_revision else files.base.revision
        trust = model_kwargs.pop("trust_remote_code", False) is True  # the caller's own argument, nothing else
        common = dict(revision=revision, token=token, cache_dir=cache_dir, local_files_only=local_files_only,
                      trust_remote_code=trust)
        try:
            base_config = AutoConfig.from_pretrained(name, **common)
            model_cls = model_class_for(files, base_config)
            kwargs = {**files.base.config_overrides, **model_kwargs}
            if isinstance(kwargs.get("id2label"), dict):  # JSON keys are strings; transformers wants class ids
                kwargs["id2label"] = {int(k): v for k, v in kwargs["id2label"].items()}
            if dtype is not None:
                kwargs["dtype"] = dtype
            if device_map is not None:
                kwargs["device_map"] = device_map
            with _quiet_about(files):
                return model_cls.from_pretrained(name, **common, **kwargs)
        except (OSError, ValueError, KeyError) as exc:
            if isinstance(exc, UniLoraError):
                raise
            source = "the base model recorded in the adapter" if base is None else "the base model"
            raise BaseModelError(
                f"{source} {name!r} could not be loaded ({type(exc).__name__}: {' '.join(str(exc).split())[:400]}). "
                "Pass base= (a model id, folder or loaded model) that exists here; remote code runs only with your "
                "own trust_remote_code=True"
            ) from None
