"""examples/sft.py and examples/load_and_generate.py, end to end with tiny settings."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from models import REPO, minilm_path
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from unilora_hf import UniLoraConfig, inject_adapter, read_adapter

EXAMPLES = REPO / "examples"


def load_script(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(args, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, *map(str, args)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done.stdout


def test_sft_then_load_and_generate(tmp_path):
    out = tmp_path / "run"
    printed = run([EXAMPLES / "sft.py", "--max-steps", 4, "--train-limit", 32, "--eval-limit", 4, "--batch-size", 4,
                   "--max-length", 96, "--theta-d-length", 1024, "--gsm8k-accuracy", "--max-new-tokens", 8,
                   "--output-dir", out], tmp_path)
    results = json.loads((out / "results.json").read_text())
    assert results["steps"] == 4 and results["train_records"] == 32 and results["eval_records"] == 4
    assert results["eval_loss_trained"] < results["eval_loss_base"]
    assert results["eval_loss_reloaded"] == pytest.approx(results["eval_loss_trained"], rel=1e-4)
    assert 0.0 <= results["gsm8k_accuracy"] <= 1.0 and "held-out completion loss" in printed
    adapter = read_adapter(out / "adapter")
    assert adapter.config.theta_d_length == 1024 and adapter.base_model["auto_class"] == "AutoModelForCausalLM"
    saved = set(os.listdir(out / "adapter"))
    assert {"unilora_config.json", "unilora_model.safetensors", "tokenizer.json"} <= saved
    assert not {"model.safetensors", "pytorch_model.bin"} & saved
    assert results["adapter_bytes"] < 4 * 1024 + 8 * 1024

    # The base recorded in the adapter, the same prompt, greedy: the same continuation as the trained run.
    sample = results["sample"]
    printed = run([EXAMPLES / "load_and_generate.py", "--adapter", out / "adapter", "--prompt", sample["prompt"],
                   "--max-new-tokens", 8, "--json"], tmp_path)
    [generated] = json.loads(printed.strip().splitlines()[-1])
    assert generated == {"prompt": sample["prompt"], "generation": sample["generation"]}


def test_load_and_generate_classifies_with_the_real_minilm(tmp_path, capsys):
    base = minilm_path()
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=2,
                                                               id2label={0: "negative", 1: "positive"})
    adapter = inject_adapter(model, UniLoraConfig(r=4, theta_d_length=512, target_modules=["query", "value"],
                                                  modules_to_save=["classifier"]))
    with torch.no_grad():
        adapter.theta_d.uniform_(-0.3, 0.3)
        model.classifier.modules_to_save.weight.normal_(0, 0.5)
    adapter.save_adapter(tmp_path / "adapter")
    texts = ["a gripping, funny and moving film", "dull and far too long"]
    tok = AutoTokenizer.from_pretrained(base)
    with torch.no_grad():
        expected = model.eval()(**tok(texts, return_tensors="pt", padding=True)).logits.softmax(-1)

    script = load_script("load_and_generate")
    results = script.main(["--adapter", str(tmp_path / "adapter"), "--base", str(base), "--text", texts[0],
                           "--text", texts[1]])
    printed = capsys.readouterr().out
    assert "BertForSequenceClassification" in printed and texts[1] in printed
    for r, probs in zip(results, expected):
        torch.testing.assert_close(torch.tensor(r["probabilities"]), probs, rtol=1e-5, atol=1e-6)
        assert r["label"] == ["negative", "positive"][int(probs.argmax())]
    with pytest.raises(SystemExit, match="pass --text, not --prompt"):
        script.main(["--adapter", str(tmp_path / "adapter"), "--base", str(base), "--prompt", "hi"])


@pytest.mark.parametrize("name", ["sft", "load_and_generate"])
def test_scripts_have_help(name, capsys):
    with pytest.raises(SystemExit) as exit_:
        load_script(name).parse_args(["--help"])
    assert exit_.value.code == 0
    assert {"sft": "--gsm8k-accuracy", "load_and_generate": "--adapter"}[name] in capsys.readouterr().out
