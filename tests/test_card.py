"""The model card of a pushed adapter: its metadata parses, and the load snippets it shows RUN as written
(in a fresh process whose only change is ``HF_ENDPOINT`` pointing at the local Hub server)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import ModelCard, ModelCardData
from models import output, tiny_llama, tokens
from transformers import AutoModelForCausalLM

from unilora_hf import UniLoraConfig, get_adapter, inject_adapter, push_adapter, read_adapter
from unilora_hf.push import render_card

TOKEN = "hf_test_token"
TESTS = Path(__file__).resolve().parent
SUMMARY = {"hyperparameters": {"learning_rate": 0.005, "max_steps": 3}, "metrics": {"eval_accuracy": 0.9},
           "loss_history": [(1, 2.0), (2, 1.5), (3, 1.2)]}


def snippets(card: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", card, flags=re.S | re.M)


def front_matter(card: str) -> dict:
    match = re.match(r"---\n(.*?)\n---\n", card, flags=re.S)
    assert match, card[:300]
    return yaml.safe_load(match.group(1))


@pytest.mark.parametrize("projection", ["native", "peft"])
def test_card_snippets_run_as_written(projection, hub_server, hf_api, hf_cache, tmp_path):
    base_id, repo_id = f"alice/snippet-base-{projection}", f"alice/snippet-{projection}"
    tiny_llama().save_pretrained(tmp_path / "base")
    hf_api.create_repo(base_id)
    hf_api.upload_folder(repo_id=base_id, folder_path=tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    adapter = inject_adapter(model, UniLoraConfig(r=2, theta_d_length=300, projection=projection,
                                                  target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        adapter.theta_d.normal_(generator=torch.Generator().manual_seed(5))
    # What loading the base as AutoModelForCausalLM.from_pretrained(base_id) records.
    adapter.save_adapter(tmp_path / "adapter", base_model_name_or_path=base_id)
    push_adapter(tmp_path / "adapter", repo_id, token=TOKEN, endpoint=hub_server.url, training_summary=SUMMARY,
                 datasets=["roneneldan/TinyStories"], license="mit")
    card = hub_server.repo_files(repo_id)["README.md"].decode()

    assert "{{" not in card and "{%" not in card and "}}" not in card
    meta = front_matter(card)
    data = ModelCardData(**meta)
    assert data.base_model == base_id and data.base_model_relation == "adapter"
    assert data.library_name == "unilora_hf" and data.pipeline_tag == "text-generation" and data.license == "mit"
    parsed = ModelCard(card).data
    assert parsed.eval_results[0].metric_type == "accuracy" and parsed.eval_results[0].metric_value == 0.9
    assert "| eval_accuracy | 0.9000 |" in card and "| learning_rate | 0.005 |" in card and "![training loss](training_loss.svg)" in card
    assert "training_loss.svg" in hub_server.repo_files(repo_id)

    code = snippets(card)
    assert len(code) == (2 if projection == "peft" else 1)
    assert f'UniLoraAutoModel.from_pretrained("{base_id}", "{repo_id}")' in code[0].replace("'", '"')
    if projection == "peft":
        assert "PeftModel.from_pretrained(" in code[1]
    else:
        assert f"unilora-hf export-lora {repo_id} OUT_DIR" in card
    ids = tokens(model)
    torch.save({"ids": ids, "expected": output(model, ids)}, tmp_path / "ref.pt")
    (tmp_path / "snippets.json").write_text(json.dumps(code))
    script = f"""
import json, sys, torch
sys.path.insert(0, {str(TESTS)!r})
from models import output
ref = torch.load({str(tmp_path / 'ref.pt')!r})
for i, code in enumerate(json.loads(open({str(tmp_path / 'snippets.json')!r}).read())):
    namespace = {{}}
    exec(compile(code, f"<README.md snippet {{i}}>", "exec"), namespace)
    got = output(namespace["model"].eval(), ref["ids"])
    assert torch.equal(got, ref["expected"]), (i, (got - ref["expected"]).abs().max().item())
    print("SNIPPET", i, type(namespace["model"]).__name__, "EQUAL")
"""
    env = {k: v for k, v in os.environ.items() if k != "HF_TOKEN"}
    env.update(HF_ENDPOINT=hub_server.url, PYTHONPATH=str(TESTS.parent))
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env,
                         cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    printed = [line for line in run.stdout.splitlines() if line.startswith("SNIPPET")]
    assert printed[0] == "SNIPPET 0 LlamaForCausalLM EQUAL"
    if projection == "peft":
        assert printed[1] == "SNIPPET 1 PeftModel EQUAL"  # task_type as given: None, as PEFT writes it
    assert len(printed) == len(code)


def test_card_for_a_local_base_shows_a_placeholder_not_the_authors_path(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "my-base")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "my-base")
    inject_adapter(model, UniLoraConfig(r=2, theta_d_length=100, target_modules=["q_proj"]))
    get_adapter(model).save_adapter(tmp_path / "adapter")
    card = render_card(read_adapter(tmp_path / "adapter"), "alice/local-base")
    assert str(tmp_path) not in card
    assert "UniLoraAutoModel.from_pretrained('path/to/my-base', 'alice/local-base')" in snippets(card)[0]
    assert "local folder (`my-base`)" in card
    assert "base_model" not in front_matter(card)
