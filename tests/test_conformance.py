"""PEFT interchange on every architecture PEFT tests, both ways, with identical outputs in float32.

For each architecture of ``arch_catalog`` (16 decoders, T5/BART/Whisper, BERT/RoBERTa/DeBERTa/DeBERTa-v2/ViT
and PEFT's own custom MLP and Embedding+Conv1D models) and each variant of the adapter config (PEFT's own
test config: task type and default targets; plus biases, modules_to_save, all-linear, layers_to_transform /
layers_pattern, a regex and an extra target on some of them), one test runs five directions:

``peft->here``    PEFT 0.21.2 trains (random θ_d, heads, biases) and saves; unilora_hf loads it
``here->peft``    unilora_hf (``projection="peft"``) saves; ``PeftModel.from_pretrained`` loads it
``export->peft``  `export_lora` writes a LoRA adapter; PEFT loads it as LoRA
``native``        unilora_hf's own format: save, load onto a fresh base
``merge``         merged = unmerged; unmerge and unload give the base back

and first checks that both select the same modules in the same order (so D and the offsets agree). With
``UNILORA_HF_CONFORMANCE_OUT=path.jsonl`` set, every cell's maximum absolute difference is appended there
(``benchmarks/conformance_matrix.py`` turns it into the table of the issue note).
"""

import json
import os
import warnings

import pytest
import torch
from arch_catalog import ARCHS, peft_config
from peft import PeftModel, get_peft_model
from peft.tuners.unilora.layer import UniLoraLayer

from unilora_hf import (
    InvalidConfigError, UniLoraConfig, export_lora, get_adapter, inject_adapter, load_adapter,
)

# Variants: PEFT UniLoraConfig keyword overrides, by name, and the architectures each runs on.
VARIANTS = {
    "peft-tests": ({}, list(ARCHS)),
    "bias=all": ({"bias": "all"}, ["llama", "gpt2", "bert", "t5", "MLP", "opt"]),
    "bias=unilora_only": ({"bias": "unilora_only"}, ["llama", "gpt2", "bert", "bart", "MLP"]),
    "modules_to_save": ({"modules_to_save": ["lin1"]}, ["MLP"]),
    "all-linear": ({"target_modules": "all-linear"}, ["llama", "gpt2", "opt", "bert", "roberta", "t5", "MLP"]),
    "ALL-LINEAR/no task": ({"target_modules": "ALL-LINEAR", "task_type": None}, ["bert", "roberta"]),
    "layers": ({"layers_to_transform": [0]}, ["llama", "gpt2", "bert", "t5", "falcon", "gpt_neox"]),
    "regex": ({"target_modules": r".*\.(q_proj|v_proj)", "task_type": None}, ["llama", "qwen2", "bart"]),
    "extra target": ({}, ["llama", "gpt2", "opt", "phi3", "bert", "deberta", "vit", "whisper"]),
}
CASES = [(arch, variant) for variant, (_, archs) in VARIANTS.items() for arch in archs]


def overrides(arch, variant: str) -> dict:
    kw = dict(VARIANTS[variant][0])
    if variant == "layers":
        kw["layers_pattern"] = arch.layer_list
        kw.setdefault("target_modules", arch.targets or _default(arch))
    if variant == "extra target":
        kw["target_modules"] = list(arch.targets or _default(arch)) + [arch.extra_linear]
    return kw


def _default(arch):
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as MAPPING

    return MAPPING[arch.model_type]


def our_config(arch, kw: dict, projection: str) -> UniLoraConfig:
    """Our UniLoraConfig with the same meaning as ``peft_config(arch, **kw)``."""
    cfg = peft_config(arch, **kw)
    targets = cfg.target_modules
    return UniLoraConfig(
        r=cfg.r, theta_d_length=cfg.theta_d_length, proj_seed=cfg.proj_seed, projection=projection,
        target_modules=sorted(targets) if isinstance(targets, (set, list)) else targets,
        layers_to_transform=cfg.layers_to_transform, layers_pattern=cfg.layers_pattern, bias=cfg.bias,
        modules_to_save=cfg.modules_to_save,
        task_type=None if cfg.task_type is None else str(getattr(cfg.task_type, "value", cfg.task_type)),
    )


def randomize(params, seed: int) -> None:
    """Trained-looking values: θ_d ~ N(0, 0.3²), every other trained tensor moved by N(0, 0.1²)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in params:
            noise = torch.randn(p.shape, generator=g)
            if "unilora_theta_d" in name:
                p.copy_(noise * 0.3)
            elif p.is_floating_point():
                p.add_(noise * 0.1)


def diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def record(arch: str, variant: str, cells: dict) -> None:
    path = os.environ.get("UNILORA_HF_CONFORMANCE_OUT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"arch": arch, "variant": variant, **cells}) + "\n")


@pytest.mark.parametrize("name,variant", CASES, ids=[f"{a}-{v}" for a, v in CASES])
def test_interchange_with_peft(tmp_path, name, variant):
    arch = ARCHS[name]
    kw = overrides(arch, variant)
    inputs = arch.inputs()
    base_out = arch.output(arch.build(), inputs)
    cells: dict[str, float] = {}
    warnings.simplefilter("ignore")

    # Same modules, same order, same D.
    peft_model = get_peft_model(arch.build(), peft_config(arch, **kw))
    peft_layers = [n.removeprefix("base_model.model.") for n, m in peft_model.named_modules()
                   if isinstance(m, UniLoraLayer)]
    ours = arch.build()
    adapter = inject_adapter(ours, our_config(arch, kw, "peft"))
    assert [s.name for s in adapter.layers] == peft_layers
    peft_D = sum(m.r["default"] * (m.in_features + m.out_features) for m in peft_model.modules()
                 if isinstance(m, UniLoraLayer))
    assert adapter.D == peft_D

    # peft -> here
    randomize(((n, p) for n, p in peft_model.named_parameters() if p.requires_grad), seed=1)
    peft_model.eval()
    expected = arch.output(peft_model, inputs)
    assert not torch.equal(expected, base_out)
    peft_model.save_pretrained(str(tmp_path / "from_peft"))
    loaded = arch.build()
    handle = load_adapter(loaded, tmp_path / "from_peft")
    assert handle.config.projection == "peft"
    cells["peft->here"] = diff(arch.output(loaded, inputs), expected)
    assert cells["peft->here"] == 0.0

    # here -> peft
    randomize(((n, p) for n, p in ours.named_parameters() if p.requires_grad), seed=2)
    mine = arch.output(ours, inputs)
    adapter.save_adapter(tmp_path / "from_here")
    theirs = PeftModel.from_pretrained(arch.build(), str(tmp_path / "from_here")).eval()
    cells["here->peft"] = diff(arch.output(theirs, inputs), mine)
    assert cells["here->peft"] == 0.0

    # export_lora -> PEFT LoRA
    export_lora(ours, tmp_path / "lora")
    lora = PeftModel.from_pretrained(arch.build(), str(tmp_path / "lora")).eval()
    assert lora.peft_config["default"].peft_type.value == "LORA"
    cells["export->peft"] = diff(arch.output(lora, inputs), mine)
    assert cells["export->peft"] <= 1e-5 * max(1.0, mine.abs().max().item())

    # native save / load
    native = arch.build()
    native_adapter = inject_adapter(native, our_config(arch, kw, "native"))
    randomize(((n, p) for n, p in native.named_parameters() if p.requires_grad), seed=3)
    native_out = arch.output(native, inputs)
    native_adapter.save_adapter(tmp_path / "native")
    reloaded = arch.build()
    load_adapter(reloaded, tmp_path / "native")
    cells["native"] = diff(arch.output(reloaded, inputs), native_out)
    assert cells["native"] == 0.0

    # merge / unmerge / unload
    handle = get_adapter(reloaded)
    handle.merge()
    cells["merge"] = diff(arch.output(reloaded, inputs), native_out)
    assert cells["merge"] <= 1e-4 * max(1.0, native_out.abs().max().item())
    handle.unmerge()
    handle.unload()
    assert diff(arch.output(reloaded, inputs), base_out) <= 1e-4 * max(1.0, base_out.abs().max().item())
    fresh = arch.build()
    load_adapter(fresh, tmp_path / "native")
    get_adapter(fresh).unload()
    assert torch.equal(arch.output(fresh, inputs), base_out)  # never merged: the base comes back bit for bit
    record(name, variant, cells)


@pytest.mark.parametrize("name,target", [("EmbConv1D", "emb"), ("llama", "embed_tokens")])
def test_embedding_targets_are_refused_by_both(name, target):
    arch = ARCHS[name]
    with pytest.raises(TypeError, match="not supported"):
        get_peft_model(arch.build(), peft_config(arch, target_modules=[target]))
    model = arch.build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(InvalidConfigError, match=rf"{target}.*Embedding.*nn.Linear"):
        inject_adapter(model, UniLoraConfig(r=4, theta_d_length=8, target_modules=[target]))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_conv2d_targets_are_refused_by_both():
    class Conv2dModel(torch.nn.Module):  # PEFT's ModelConv2D test model
        def __init__(self):
            super().__init__()
            self.conv2d = torch.nn.Conv2d(5, 10, 3)
            self.lin0 = torch.nn.Linear(10, 2)

        def forward(self, X):
            return self.lin0(self.conv2d(X.float().reshape(-1, 5, 3, 3)).flatten(1))

    from peft import UniLoraConfig as PeftConfig

    with pytest.raises(TypeError, match="not supported"):
        get_peft_model(Conv2dModel(), PeftConfig(theta_d_length=8, target_modules=["conv2d"]))
    with pytest.raises(InvalidConfigError, match="conv2d.*Conv2d"):
        inject_adapter(Conv2dModel(), UniLoraConfig(theta_d_length=8, target_modules=["conv2d"]))


def test_no_default_targets_where_peft_has_none():
    from peft import UniLoraConfig as PeftConfig

    for name in ("phi3", "whisper", "vit", "MLP"):
        arch = ARCHS[name]
        with pytest.raises(ValueError, match="target_modules"):
            get_peft_model(arch.build(), PeftConfig(theta_d_length=8))
        with pytest.raises(InvalidConfigError, match="no default for model type"):
            inject_adapter(arch.build(), UniLoraConfig(theta_d_length=8))
