"""The flows of the scripts users already run, with one line changed (tests/scripts/: run_glue-, run_clm- and trl
sft.py-shaped scripts), on the real all-MiniLM-L6-v2 and stories260K, pushing to the local Hub: every
``hub_strategy``, the push keywords, best-model loading, resuming, gradient checkpointing, bf16 on CPU, an
eval-only second run from the output folder, and the files each run writes and pushes."""

import json
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard, constants
from models import REPO, STORIES, minilm_path
from safetensors.torch import load_file

from unilora_hf import AdapterFormatError, InvalidConfigError, MissingDependencyError, UniLoraAutoModel, read_adapter

sys.path.insert(0, str(Path(__file__).resolve().parent / "scripts"))
import run_classification  # noqa: E402
import run_clm  # noqa: E402

SST2 = REPO / "examples" / "data" / "sst2"
GSM8K = REPO / "examples" / "data" / "gsm8k" / "train.jsonl"
TOKEN = "hf_test_token"
NEVER_PUSHED = ("training_args.bin", "tokenizer.json", "tokenizer_config.json", "model.safetensors",
                "adapter_config.json", "adapter_model.safetensors", "optimizer.pt")


@pytest.fixture
def hub(hub_server, monkeypatch, hf_cache):
    """The scripts talk to the Hub as scripts do: through HF_ENDPOINT and HF_TOKEN."""
    monkeypatch.setattr(constants, "ENDPOINT", hub_server.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub_server.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    return hub_server


def cls_args(out, *extra, steps=8):
    return ["--model_name_or_path", str(minilm_path()), "--data_dir", str(SST2), "--output_dir", str(out),
            "--max_train_samples", "64", "--max_eval_samples", "32", "--per_device_train_batch_size", "8",
            "--per_device_eval_batch_size", "16", "--max_steps", str(steps), "--learning_rate", "2e-3",
            "--logging_steps", "2", "--report_to", "none", "--use_cpu", "--seed", "0", "--disable_tqdm", "true",
            *extra]


def dev_accuracy(model, n=32) -> float:
    """The accuracy of ``model`` on the first ``n`` dev rows, computed the script's way."""
    from transformers import AutoTokenizer, DataCollatorWithPadding

    rows = run_classification.read_tsv(SST2 / "dev.tsv", n)
    tok = AutoTokenizer.from_pretrained(minilm_path())
    batch = DataCollatorWithPadding(tok)([tok(r["sentence"], truncation=True, max_length=64) for r in rows])
    with torch.no_grad():
        logits = torch.cat([model(**{k: v[i : i + 16] for k, v in batch.items()}).logits for i in range(0, n, 16)])
    return float((logits.argmax(-1) == torch.tensor([r["label"] for r in rows])).float().mean())


@pytest.mark.parametrize("strategy", ["end", "every_save", "checkpoint", "all_checkpoints"])
def test_classification_script_pushes_the_best_adapter_under_every_hub_strategy(tmp_path, hub, strategy):
    out = tmp_path / "out"
    repo = f"cls-{strategy.replace('_', '-')}"
    results = run_classification.main(cls_args(
        out, "--do_train", "--do_eval", "--do_predict", "--eval_strategy", "steps", "--eval_steps", "4",
        "--save_steps", "4", "--save_total_limit", "1", "--load_best_model_at_end", "--metric_for_best_model",
        "accuracy", "--push_to_hub", "--hub_model_id", repo, "--hub_strategy", strategy))
    files = hub.repo_files(f"alice/{repo}")  # the bare name went to the token owner's namespace
    root = {f for f in files if "/" not in f}
    assert {"unilora_config.json", "unilora_model.safetensors", "README.md"} <= root
    assert not {f for f in files if f.rsplit("/", 1)[-1] in NEVER_PUSHED} - {
        f for f in files if f.startswith(("last-checkpoint/", "checkpoint-")) and f.endswith("optimizer.pt")}
    assert root <= {"unilora_config.json", "unilora_model.safetensors", "README.md", "training_loss.svg"}
    folders = {f.split("/")[0] for f in files if "/" in f}
    assert folders == {"checkpoint": {"last-checkpoint"}, "all_checkpoints": {"checkpoint-4", "checkpoint-8"}}.get(
        strategy, set()), folders
    # The Hub holds what save_model wrote: the best checkpoint's adapter (loaded at the end).
    assert files["unilora_model.safetensors"] == (out / "unilora_model.safetensors").read_bytes()
    best = json.loads((out / "trainer_state.json").read_text())["best_model_checkpoint"]
    assert load_file(Path(best) / "unilora_model.safetensors")["unilora.theta_d"].equal(
        read_adapter(out).theta_d)
    card = ModelCard(files["README.md"].decode()).data.to_dict()
    assert card["language"] == "en" and "glue" in card["datasets"] and card["pipeline_tag"] == "text-classification"
    assert str(tmp_path) not in files["README.md"].decode() + files["unilora_config.json"].decode()
    # Loaded back by repo id, it scores exactly what the trainer reported.
    loaded = UniLoraAutoModel.from_pretrained(str(minilm_path()), f"alice/{repo}")
    assert dev_accuracy(loaded) == results["eval_accuracy"]
    assert loaded.config.id2label == {0: "negative", 1: "positive"}
    predictions = (out / "predict_results.txt").read_text().splitlines()
    assert predictions[0] == "index\tprediction" and len(predictions) == 33


@pytest.mark.parametrize("how", ["explicit path", "detected in output_dir"])
def test_resume_continues_exactly(tmp_path, how):
    """A run stopped after checkpoint-4 and resumed (from the path, or the script's own detection of the last
    checkpoint, as ``resume_from_checkpoint=True`` does) ends on the θ_d of a run that never stopped."""
    common = ("--do_train", "--save_steps", "4", "--lr_scheduler_type", "constant")
    run_classification.main(cls_args(tmp_path / "full", *common))
    run_classification.main(cls_args(tmp_path / "half", *common, steps=4))
    resume = ("--resume_from_checkpoint", str(tmp_path / "half" / "checkpoint-4")) if how == "explicit path" else ()
    run_classification.main(cls_args(tmp_path / "half", *common, *resume))
    assert torch.equal(read_adapter(tmp_path / "full").theta_d, read_adapter(tmp_path / "half").theta_d)


def test_an_eval_only_second_run_from_the_output_folder_scores_what_training_reported(tmp_path):
    out = tmp_path / "out"
    first = run_classification.main(cls_args(out, "--do_train", "--do_eval", "--gradient_checkpointing"))
    assert (out / "tokenizer.json").exists() and not (out / "model.safetensors").exists()
    # As transformers' examples are run for evaluation: the output folder as the model, its base's config.
    second = run_classification.main(cls_args(tmp_path / "eval", "--model_name_or_path", str(out), "--config_name",
                                              str(minilm_path()), "--do_eval"))
    assert second["eval_accuracy"] == first["eval_accuracy"]
    from transformers import AutoModelForSequenceClassification

    plain = AutoModelForSequenceClassification.from_pretrained(out)  # transformers alone loads the folder
    assert dev_accuracy(plain) == first["eval_accuracy"]
    assert dev_accuracy(UniLoraAutoModel.from_pretrained(out)) == first["eval_accuracy"]  # one argument


def test_bf16_on_cpu_trains_theta_in_float32(tmp_path):
    results = run_classification.main(cls_args(tmp_path, "--do_train", "--do_eval", "--bf16", "--max_eval_samples",
                                               "16", steps=2))
    files = read_adapter(tmp_path)
    assert files.theta_d.dtype == torch.float32 and files.tensors["classifier.weight"].dtype == torch.float32
    assert 0.0 <= results["eval_accuracy"] <= 1.0


def test_causal_lm_script_with_grouped_blocks(tmp_path, hub):
    out = tmp_path / "clm"
    results = run_clm.main(["--model_name_or_path", str(STORIES), "--train_file", str(GSM8K), "--output_dir", str(out),
                            "--block_size", "64", "--max_train_samples", "120", "--per_device_train_batch_size", "8",
                            "--max_steps", "10", "--learning_rate", "1e-3", "--do_train", "--do_eval",
                            "--eval_strategy", "steps", "--eval_steps", "5", "--save_steps", "5",
                            "--load_best_model_at_end", "--report_to", "none", "--use_cpu", "--seed", "0",
                            "--disable_tqdm", "true", "--push_to_hub", "--hub_model_id", "alice/clm"])
    assert results["perplexity"] < 1e6
    files = set(hub.repo_files("alice/clm"))
    assert {"unilora_config.json", "unilora_model.safetensors", "README.md"} <= files
    assert files <= {"unilora_config.json", "unilora_model.safetensors", "README.md", "training_loss.svg"}
    # The base was a local folder: the pushed config names none (never a local path), and says which folder.
    with pytest.raises(AdapterFormatError, match="local folder named 'stories260K'.*pass the base"):
        UniLoraAutoModel.from_pretrained("alice/clm")
    loaded = UniLoraAutoModel.from_pretrained(str(STORIES), "alice/clm")
    assert type(loaded).__name__ == "LlamaForCausalLM"
    assert UniLoraAutoModel.from_pretrained(out).config.model_type == "llama"  # locally, the folder is recorded


def run_sft(tmp_path, data: list[dict], *extra):
    import sft

    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in data))
    argv = ["--model_name_or_path", str(STORIES), "--dataset_name", str(path), "--output_dir", str(tmp_path / "out"),
            "--max_steps", "4", "--per_device_train_batch_size", "4", "--learning_rate", "1e-2", "--max_length", "64",
            "--report_to", "none", "--use_cpu", "--logging_steps", "1", "--disable_tqdm", "true",
            "--save_strategy", "no", *extra]
    sft.main(*sft.parse(argv))
    return tmp_path / "out"


TEXT = [{"text": f"Once upon a time, Lily found {i} red balls in the park."} for i in range(16)]
PROMPTS = [{"prompt": f"Tom had {i} balls. How many?", "completion": f" He had {i}."} for i in range(16)]
MESSAGES = [{"messages": [{"role": "user", "content": f"How many balls? {i}"},
                          {"role": "assistant", "content": f"There are {i} balls."}]} for i in range(16)]


CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}Q: {{ m['content'] }}\n"
    "{% else %}A: {% generation %}{{ m['content'] }}{{ eos_token }}{% endgeneration %}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}A: {% endif %}"
)


@pytest.mark.parametrize("data,extra", [(TEXT, ()), (PROMPTS, ()), (MESSAGES, ("--assistant_only_loss",)),
                                        (TEXT, ("--packing",))],
                         ids=["text", "prompt-completion", "messages", "packing"])
def test_trl_sft_script_with_a_string_model_id(tmp_path, hub, data, extra):
    if data is MESSAGES:  # stories260K's tokenizer has no chat template: the script takes one as a file
        (tmp_path / "chat.jinja").write_text(CHAT_TEMPLATE)
        extra = (*extra, "--chat_template_path", str(tmp_path / "chat.jinja"))
    out = run_sft(tmp_path, data, "--push_to_hub", "--hub_model_id", "alice/sft", *extra)
    assert read_adapter(out).config.theta_d_length == 2048
    files = set(hub.repo_files("alice/sft"))
    assert {"unilora_config.json", "unilora_model.safetensors", "README.md"} <= files
    assert files <= {"unilora_config.json", "unilora_model.safetensors", "README.md", "training_loss.svg"}


def test_trl_sft_script_refuses_use_peft_and_quantization_it_cannot_honour(tmp_path):
    with pytest.raises(InvalidConfigError, match="--use_peft"):
        run_sft(tmp_path, TEXT, "--use_peft")
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        with pytest.raises(MissingDependencyError, match="bitsandbytes"):
            run_sft(tmp_path, TEXT, "--load_in_4bit")
