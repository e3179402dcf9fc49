"""Export any Uni-LoRA adapter (either projection) as a standard PEFT LoRA adapter.

Uni-LoRA's layer output is ``base(x) + B A x``; a LoRA adapter with the materialised A and B, ``lora_alpha
= r`` (so PEFT's scaling alpha/r is 1) and the same targets computes exactly that, so every serving
engine that loads PEFT LoRA adapters can serve a Uni-LoRA adapter. The export costs r·(in+out) floats per
layer instead of θ_d's d.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from .model import UniLoraAdapter, get_adapter
from .serialization import AUTO_CLASS_TO_PEFT_TASK, PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME, adapter_metadata


def _lora_targets(adapter: UniLoraAdapter) -> list[str]:
    """Suffixes when they select exactly the adapted modules, else the full module names."""
    adapted = [spec.name for spec in adapter.layers]
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in adapted})
    same_suffix = {n for n, _ in adapter.model.named_modules()
                   if n.rsplit(".", 1)[-1] in suffixes and ".original_module" not in n and ".modules_to_save." not in n}
    return suffixes if same_suffix == set(adapted) else adapted


def export_lora(model_or_adapter, save_directory: str | os.PathLike, dtype: torch.dtype = torch.float32) -> list[str]:
    """Write a PEFT LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors``) equal in output
    to the Uni-LoRA adapter on ``model_or_adapter``; returns the paths written."""
    adapter = model_or_adapter if isinstance(model_or_adapter, UniLoraAdapter) else get_adapter(model_or_adapter)
    meta = adapter_metadata(adapter)
    tensors = {}
    for name, (A, B) in adapter.lora_weights().items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = A.to(dtype).cpu().contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = B.to(dtype).cpu().contiguous()
    for name, param in adapter.trainable_state().items():
        tensors[f"base_model.model.{name}"] = param.detach().cpu().contiguous()
    cfg = adapter.config
    config = {
        "peft_type": "LORA",
        "task_type": AUTO_CLASS_TO_PEFT_TASK.get(meta["base_model"]["auto_class"]),
        "base_model_name_or_path": meta["base_model"]["name_or_path"],
        "revision": meta["base_model"]["revision"],
        "r": cfg.r,
        "lora_alpha": cfg.r,
        "lora_dropout": cfg.unilora_dropout,
        "target_modules": _lora_targets(adapter),
        "modules_to_save": cfg.modules_to_save,
        "bias": cfg.bias,
        "fan_in_fan_out": any(s.fan_in_fan_out for s in adapter.layers),
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
    }
    out = Path(save_directory)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / PEFT_WEIGHTS_NAME), metadata={"format": "pt", "unilora_hf_source": json.dumps(
        {"projection_spec": meta["projection_spec"], "fingerprint": meta["layout"]["fingerprint"]})})
    (out / PEFT_CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return [str(out / PEFT_CONFIG_NAME), str(out / PEFT_WEIGHTS_NAME)]
