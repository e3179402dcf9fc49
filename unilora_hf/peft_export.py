"""Export any Uni-LoRA adapter (either projection) as a standard PEFT LoRA adapter.

Uni-LoRA's layer output is ``base(x) + B A x``; a LoRA adapter with the materialised A and B, ``lora_alpha
= r`` (so PEFT's scaling alpha/r is 1) and the same targets computes exactly that, so every serving
engine that loads PEFT LoRA adapters can serve a Uni-LoRA adapter. The export costs r·(in+out) floats per
layer instead of θ_d's d. The config is PEFT 0.21.2's ``LoraConfig``: ``task_type`` as the adapter's
(None when it has none, as PEFT writes it), ``bias`` ``"unilora_only"`` as LoRA's ``"lora_only"``, trained
biases under PEFT's own keys (``<layer>.base_layer.bias`` for an adapted layer).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .model import UniLoraAdapter, get_adapter
from .serialization import (
    EXPORT_SOURCE, PEFT_CONFIG_NAME, PEFT_PREFIX, PEFT_WEIGHTS_NAME, files_to_replace, _safetensors_bytes, adapter_metadata,
    peft_tensor_name, write_folder,
)

BIAS_TO_LORA = {"none": "none", "all": "all", "unilora_only": "lora_only"}


def _lora_targets(adapter: UniLoraAdapter) -> list[str]:
    """Suffixes when they select exactly the adapted modules, else the full module names."""
    adapted = [spec.name for spec in adapter.layers]
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in adapted})
    same_suffix = {n for n, _ in adapter.model.named_modules()
                   if n.rsplit(".", 1)[-1] in suffixes and ".original_module" not in n and ".modules_to_save." not in n}
    return suffixes if same_suffix == set(adapted) else adapted


def export_lora(model_or_adapter, save_directory: str | os.PathLike, dtype: torch.dtype = torch.float32,
                companion: bool = False) -> list[str]:
    """Write a PEFT LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors``) equal in output
    to the Uni-LoRA adapter on ``model_or_adapter``; returns the paths written (atomically, as `save_adapter`).

    ``companion=True`` writes it beside the native adapter just saved in ``save_directory`` (the trainers do
    this in their output folder): transformers' own adapter loading then loads the folder
    (``AutoModelFor....from_pretrained(folder)``: the base recorded in the config plus this LoRA adapter, the same
    function), while unilora_hf still reads the Uni-LoRA adapter there, the companion being tied to it by the
    adapter's digest and checksum."""
    adapter = model_or_adapter if isinstance(model_or_adapter, UniLoraAdapter) else get_adapter(model_or_adapter)
    meta = adapter_metadata(adapter)
    adapted = {spec.name for spec in adapter.layers}
    tensors = {}
    for name, (A, B) in adapter.lora_weights().items():
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = A.to(dtype).cpu().contiguous()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = B.to(dtype).cpu().contiguous()
    for name, tensor in adapter.live_state().tensors.items():
        tensors[peft_tensor_name(name, adapted)] = tensor.detach().cpu().contiguous()
    cfg = adapter.config
    config = {
        "peft_type": "LORA",
        "task_type": cfg.task_type,
        "base_model_name_or_path": meta["base_model"]["name_or_path"],
        "revision": meta["base_model"]["revision"],
        "r": cfg.r,
        "lora_alpha": cfg.r,
        "lora_dropout": cfg.unilora_dropout,
        "target_modules": _lora_targets(adapter),
        "modules_to_save": cfg.modules_to_save,
        "bias": BIAS_TO_LORA[cfg.bias],
        "fan_in_fan_out": any(s.fan_in_fan_out for s in adapter.layers),
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
    }
    out = Path(save_directory)
    replaced = files_to_replace(out, "companion" if companion else "export")
    source_record = {"projection_spec": meta["projection_spec"], "fingerprint": meta["layout"]["fingerprint"]}
    if companion:
        from .safe_io import UntrustedFolder, read_safetensors_head
        from .serialization import META_CHECKSUM, META_DIGEST, WEIGHTS_NAME

        native = read_safetensors_head(UntrustedFolder(out), WEIGHTS_NAME).get("__metadata__") or {}
        source_record.update(digest=native.get(META_DIGEST), checksum=native.get(META_CHECKSUM))
    source = json.dumps(source_record)
    files = {
        PEFT_CONFIG_NAME: (json.dumps(config, indent=2, sort_keys=True) + "\n").encode(),
        PEFT_WEIGHTS_NAME: _safetensors_bytes(tensors, {"format": "pt", EXPORT_SOURCE: source,
                                                        "unilora_hf.version": meta["library_version"]}),
    }
    write_folder(out, files, remove=replaced)
    return [str(out / PEFT_CONFIG_NAME), str(out / PEFT_WEIGHTS_NAME)]
