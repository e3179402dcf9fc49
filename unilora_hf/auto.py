"""`UniLoraAutoModel`: a base model plus a Uni-LoRA adapter, in one call, ready to use."""

from __future__ import annotations

import os

import torch.nn as nn
import transformers

from .errors import AdapterFormatError
from .hub import resolve_adapter
from .serialization import apply_adapter, read_adapter


class UniLoraAutoModel:
    """Loads ``base`` with the right transformers Auto class and attaches the adapter to it."""

    @classmethod
    def from_pretrained(cls, base: str | os.PathLike | nn.Module | None, adapter: str | os.PathLike, *,
                        revision: str | None = None, merge: bool = False, dtype=None, device_map=None,
                        token: str | bool | None = None, cache_dir: str | None = None,
                        local_files_only: bool = False, base_revision: str | None = None,
                        endpoint: str | None = None, **model_kwargs) -> nn.Module:
        """Load ``adapter`` (a folder or Hub repo id at ``revision``) onto ``base``.

        ``base`` is a Hub model id, a local folder, an already loaded ``PreTrainedModel``, or None to use
        the base model recorded in the adapter. The Auto class (causal LM, sequence classification, ...)
        and classifier settings (``num_labels``, labels) come from the adapter; ``dtype``, ``device_map``
        and other keyword arguments go to the base's ``from_pretrained``. The projection is rebuilt from
        the stored seed, the layout is checked against the base, θ_d and the heads are loaded. With
        ``merge=True`` ΔW is merged into the weights and the wrappers removed (a plain transformers model
        at the base model's speed); otherwise the adapter stays unmerged (``unilora_hf.get_adapter(model)``
        merges, unmerges or disables it later). The model is returned in eval mode.
        """
        folder = resolve_adapter(adapter, revision=revision, token=token, cache_dir=cache_dir,
                                 local_files_only=local_files_only, endpoint=endpoint)
        files = read_adapter(folder)
        if isinstance(base, nn.Module):
            model = base
            if dtype is not None or device_map is not None:
                model = model.to(device=device_map if isinstance(device_map, str) and device_map != "auto" else None,
                                 dtype=dtype)
        else:
            name = base if base is not None else files.base_model.get("name_or_path")
            if not name:
                raise AdapterFormatError("the adapter records no base model: pass base= (a model id, folder or model)")
            auto_name = files.base_model.get("auto_class") or "AutoModel"
            auto = getattr(transformers, auto_name, None)
            if auto is None:
                raise AdapterFormatError(f"the adapter asks for transformers.{auto_name}, which this transformers lacks")
            kwargs = {**files.base_model.get("config_overrides", {}), **model_kwargs}
            if isinstance(kwargs.get("id2label"), dict):  # JSON keys are strings; transformers wants class ids
                kwargs["id2label"] = {int(k): v for k, v in kwargs["id2label"].items()}
            if dtype is not None:
                kwargs["dtype"] = dtype
            if device_map is not None:
                kwargs["device_map"] = device_map
            model = auto.from_pretrained(str(name), revision=base_revision, token=token, cache_dir=cache_dir,
                                         local_files_only=local_files_only, **kwargs)
        handle = apply_adapter(model, files)
        if merge:
            model = handle.merge_and_unload()
        return model.eval()
