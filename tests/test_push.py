"""Adapter repos through the real huggingface_hub client against the local Hub server."""

import subprocess
import sys

import pytest
import torch
import yaml
from huggingface_hub import ModelCard
from models import output, tiny_bert, tiny_llama, tokens

from unilora_hf import AdapterFormatError, HubPushError, UniLoraAutoModel, UniLoraConfig, inject_adapter, push_adapter
from unilora_hf.trainer import UniLoraTrainer

TOKEN = "hf_test_token"


def adapted(projection="native"):
    model = tiny_llama()
    adapter = inject_adapter(model, UniLoraConfig(r=2, theta_d_length=300, projection=projection,
                                                  target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        adapter.theta_d.normal_()
    return model, adapter


def test_push_then_a_fresh_process_loads_by_repo_id(hub_server, tmp_path):
    model, adapter = adapted()
    ids = tokens(model)
    expected = output(model, ids)
    url = push_adapter(model, "alice/tiny-unilora", token=TOKEN, endpoint=hub_server.url,
                       training_summary={"hyperparameters": {"lr": 5e-3}, "metrics": {"eval_accuracy": 0.9},
                                         "loss_history": [(1, 2.0), (2, 1.5), (3, 1.2)]})
    assert "/alice/tiny-unilora/commit/" in url
    files = hub_server.repo_files("alice/tiny-unilora")
    assert set(files) == {"unilora_config.json", "unilora_model.safetensors", "README.md", "training_loss.svg"}
    adapter_bytes = len(files["unilora_config.json"]) + len(files["unilora_model.safetensors"])
    assert adapter_bytes < 4 * 300 + 8 * 1024
    for content in files.values():
        assert TOKEN.encode() not in content
    torch.save({"ids": ids, "expected": expected}, tmp_path / "ref.pt")
    script = f"""
import torch, sys
sys.path.insert(0, {str(tmp_path.parent)!r})
from unilora_hf import UniLoraAutoModel
sys.path.insert(0, {str(__file__.rsplit('/', 1)[0])!r})
from models import tiny_llama, output
ref = torch.load({str(tmp_path / 'ref.pt')!r})
model = UniLoraAutoModel.from_pretrained(tiny_llama(), "alice/tiny-unilora", token={TOKEN!r},
                                         endpoint={hub_server.url!r}, cache_dir={str(tmp_path / 'cache')!r})
assert torch.equal(output(model, ref["ids"]), ref["expected"])
print("IDENTICAL")
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert "IDENTICAL" in run.stdout, run.stderr[-2000:]


def test_card_has_valid_metadata_and_a_working_snippet(hub_server, tmp_path):
    model, _ = adapted("peft")
    push_adapter(model, "alice/card-check", token=TOKEN, endpoint=hub_server.url, license="apache-2.0")
    text = hub_server.repo_files("alice/card-check")["README.md"].decode()
    assert "{{" not in text and "{%" not in text
    card = ModelCard(text)
    meta = card.data.to_dict()
    assert meta["library_name"] == "unilora_hf" and "peft" in meta["tags"] and "unilora" in meta["tags"]
    assert meta["pipeline_tag"] == "text-generation" and meta["license"] == "apache-2.0"
    assert yaml.safe_load(text.split("---")[1])["library_name"] == "unilora_hf"
    assert "UniLoraAutoModel.from_pretrained(" in text and "PeftModel.from_pretrained(" in text
    assert "| rank r | 2 |" in text and "@inproceedings{li2025unilora" in text


def test_trainer_push_to_hub_lands_the_adapter_repo(hub_server, tmp_path):
    from transformers import TrainingArguments

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return 16

        def __getitem__(self, i):
            return {"input_ids": torch.arange(3, 11) + i, "labels": torch.tensor(i % 2)}

    args = TrainingArguments(output_dir=str(tmp_path / "my-run"), max_steps=2, per_device_train_batch_size=8,
                             report_to=[], use_cpu=True, hub_model_id="alice/trained", hub_token=TOKEN,
                             save_strategy="no")
    trainer = UniLoraTrainer(tiny_bert(num_labels=2), args, train_dataset=Data(), unilora_config=UniLoraConfig(
        r=2, theta_d_length=100, target_modules=["query"], modules_to_save=["classifier"]),
        hub_endpoint=hub_server.url)
    trainer.train()
    url = trainer.push_to_hub()
    assert "alice/trained" in url
    files = set(hub_server.repo_files("alice/trained"))
    assert {"unilora_config.json", "unilora_model.safetensors", "README.md"} <= files
    assert "training_args.bin" not in files and "tokenizer.json" not in files
    # Without hub_model_id the repo is named after output_dir, in the token owner's namespace.
    args.hub_model_id = None
    trainer = UniLoraTrainer(trainer.model, args, train_dataset=Data(), hub_endpoint=hub_server.url)
    url = trainer.push_to_hub()
    assert "alice/my-run" in url and "unilora_model.safetensors" in hub_server.repo_files("alice/my-run")


def test_push_faults_are_clear_and_lose_nothing(hub_server):
    model, _ = adapted()
    with pytest.raises(ValueError, match="invalid repo id"):
        push_adapter(model, "not a/valid//id", token=TOKEN, endpoint=hub_server.url)
    with pytest.raises(PermissionError, match="refused the token") as err:
        push_adapter(model, "alice/x", token="hf_wrong", endpoint=hub_server.url)
    assert "hf_wrong" not in str(err.value)
    push_adapter(model, "alice/faulty", token=TOKEN, endpoint=hub_server.url)
    before = hub_server.repo_files("alice/faulty")
    with torch.no_grad():
        model.unilora_theta_d.add_(1.0)
    hub_server.fail_next_commits(1)
    with pytest.raises(HubPushError, match="Nothing was committed"):
        push_adapter(model, "alice/faulty", token=TOKEN, endpoint=hub_server.url)
    assert hub_server.repo_files("alice/faulty") == before
    push_adapter(model, "alice/faulty", token=TOKEN, endpoint=hub_server.url)  # the retry succeeds
    assert hub_server.repo_files("alice/faulty")["unilora_model.safetensors"] != before["unilora_model.safetensors"]


def test_loading_repos_that_hold_no_adapter_or_are_private(hub_server, hf_api, tmp_path):
    hf_api.create_repo("alice/just-text", exist_ok=True)
    hf_api.upload_file(path_or_fileobj=b"hello", path_in_repo="notes.txt", repo_id="alice/just-text")
    with pytest.raises(AdapterFormatError, match="holds no Uni-LoRA adapter.*notes.txt"):
        UniLoraAutoModel.from_pretrained(tiny_llama(), "alice/just-text", token=TOKEN, endpoint=hub_server.url,
                                         cache_dir=str(tmp_path))
    model, _ = adapted()
    push_adapter(model, "alice/private-one", token=TOKEN, endpoint=hub_server.url, private=True)
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    with pytest.raises(RepositoryNotFoundError):
        UniLoraAutoModel.from_pretrained(tiny_llama(), "alice/private-one", token="hf_other_token",
                                         endpoint=hub_server.url, cache_dir=str(tmp_path))
    with pytest.raises(RevisionNotFoundError):
        UniLoraAutoModel.from_pretrained(tiny_llama(), "alice/private-one", token=TOKEN, revision="v9",
                                         endpoint=hub_server.url, cache_dir=str(tmp_path))
    with pytest.raises(AdapterFormatError, match="neither a local folder nor a valid Hub repo id"):
        UniLoraAutoModel.from_pretrained(tiny_llama(), "bad//id", endpoint=hub_server.url)
