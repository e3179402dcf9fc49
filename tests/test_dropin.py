"""PEFT habits and package hygiene: the names PEFT users type work on the adapted model itself; importing the
package and asking the CLI for help load nothing heavy."""

import json
import subprocess
import sys

import pytest
import torch
from models import REPO, output, tiny_bert, tiny_llama, tokens
from transformers import LlamaForCausalLM

from unilora_hf import AdapterStateError, InvalidArgumentError, UniLoraConfig, inject_adapter, read_adapter

HEAVY = ("torch", "transformers", "transformers.trainer", "trl", "datasets", "peft", "numpy")


def modules_after(code: str) -> list[str]:
    script = f"import sys\n{code}\nprint(__import__('json').dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=120,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.splitlines()[-1])


def test_importing_the_package_loads_nothing_heavy():
    assert modules_after("import unilora_hf") == []
    assert modules_after("from unilora_hf import UniLoraConfig") == ["torch", "numpy"]
    loaded = modules_after("from unilora_hf import load_adapter")
    assert "transformers.trainer" not in loaded and "trl" not in loaded and "datasets" not in loaded


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["frobnicate"], ["push", "--help"], []])
def test_the_cli_answers_help_version_and_usage_errors_without_torch(argv):
    code = ("from unilora_hf import cli\ntry:\n    cli.main(%r)\nexcept SystemExit:\n    pass" % argv)
    assert modules_after(code) == []


def test_peft_names_work_on_the_adapted_model(tmp_path, capsys):
    model = tiny_llama()
    ids = tokens(model)
    base = output(model, ids)
    adapter = inject_adapter(model, UniLoraConfig(r=2, theta_d_length=120, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        adapter.theta_d.normal_()
    adapted = output(model, ids)
    assert type(model) is LlamaForCausalLM  # composition: the class is transformers' own
    model.print_trainable_parameters()
    trainable, total = model.get_nb_trainable_parameters()
    assert capsys.readouterr().out.strip() == (
        f"trainable params: 120 || all params: {total:,d} || trainable%: {100 * 120 / total:.4f}")
    assert trainable == 120 and total == sum(p.numel() for p in model.parameters())
    with model.disable_adapter():
        assert torch.equal(output(model, ids), base)
    model.save_pretrained(tmp_path / "adapter")  # the adapter, as PEFT's model writes its adapter
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["unilora_config.json",
                                                                        "unilora_model.safetensors"]
    assert torch.equal(read_adapter(tmp_path / "adapter").theta_d, adapter.theta_d.detach())
    model.save_pretrained(tmp_path / "merged", merged=True)  # or a complete checkpoint, merged out of place
    assert torch.equal(output(model, ids), adapted)
    full = LlamaForCausalLM.from_pretrained(tmp_path / "merged")
    assert (output(full, ids) - adapted).abs().max() < 1e-5
    with pytest.raises(InvalidArgumentError, match="merged=True"):
        model.save_pretrained(tmp_path / "x", max_shard_size="1GB", safe_serialization=True, push_to_hub=False,
                              weird_option=1)
    with pytest.raises(InvalidArgumentError, match="pickle"):
        model.save_pretrained(tmp_path / "y", safe_serialization=False)
    model.merge_adapter()
    assert (output(model, ids) - adapted).abs().max() < 1e-5
    model.unmerge_adapter()
    plain = model.merge_and_unload()
    assert plain is model and "save_pretrained" not in model.__dict__  # transformers' own methods are back
    assert (output(plain, ids) - adapted).abs().max() < 1e-5
    with pytest.raises(AdapterStateError, match="unloaded"):
        adapter.merge()


def test_an_adapted_model_pickles_with_its_peft_names_and_signature():
    """``torch.save(model)`` of a whole adapted model (pickle) loads back computing the same outputs, with PEFT's
    names bound to the loaded copy; ``forward``'s signature stays the model's own (Trainer keeps columns by it)."""
    import copy
    import inspect
    import io

    model = tiny_llama()
    ids = tokens(model)
    adapter = inject_adapter(model, UniLoraConfig(r=2, theta_d_length=120, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        adapter.theta_d.normal_()
    adapted = output(model, ids)
    assert {"input_ids", "labels", "attention_mask"} <= set(inspect.signature(model.forward).parameters)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    loaded = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
    for twin in (loaded, copy.deepcopy(model)):
        assert torch.equal(output(twin, ids), adapted)
        assert twin.forward.model is twin and twin.save_pretrained.args == (twin,)
        with twin.disable_adapter():
            assert not torch.equal(output(twin, ids), adapted)
        assert twin.merge_and_unload() is twin and "forward" not in twin.__dict__
    assert torch.equal(output(model, ids), adapted)  # the original is untouched


def test_a_plain_trainer_saves_the_adapter_through_save_pretrained(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = tiny_bert()
    inject_adapter(model, UniLoraConfig(r=2, theta_d_length=60, target_modules=["query"], modules_to_save=["classifier"]))
    trainer = Trainer(model, TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True))
    trainer.save_model(str(tmp_path / "saved"))
    names = {p.name for p in (tmp_path / "saved").iterdir()}
    assert {"unilora_config.json", "unilora_model.safetensors"} <= names and "model.safetensors" not in names


def test_config_from_pretrained_reads_either_format(tmp_path):
    from unilora_hf import UniLoraConfig

    for projection in ("native", "peft"):
        config = UniLoraConfig(r=2, theta_d_length=100, projection=projection, target_modules=["q_proj"])
        inject_adapter(tiny_llama(), config).save_adapter(tmp_path / projection)
        assert UniLoraConfig.from_pretrained(tmp_path / projection) == config


def test_a_reload_does_not_warn_that_the_trained_head_is_newly_initialized(tmp_path):
    import logging

    from models import minilm_path
    from transformers import AutoModelForSequenceClassification

    from unilora_hf import UniLoraAutoModel

    model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
    inject_adapter(model, UniLoraConfig(r=2, theta_d_length=500, target_modules=["query"],
                                        modules_to_save=["classifier"])).save_adapter(tmp_path)
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("transformers.modeling_utils")
    logger.addHandler(handler)
    try:
        AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)  # the user's own load warns
        assert any("MISSING" in r.getMessage() or "newly initialized" in r.getMessage() for r in records)
        records.clear()
        UniLoraAutoModel.from_pretrained(tmp_path)  # the adapter supplies the head: no such warning
    finally:
        logger.removeHandler(handler)
    assert not any("MISSING" in r.getMessage() or "newly initialized" in r.getMessage() for r in records)


def test_a_base_from_the_hub_cache_is_recorded_by_its_id_and_revision(tmp_path):
    snapshot = tmp_path / "hub" / "models--org--tiny-llama" / "snapshots" / ("a" * 40)
    tiny_llama().save_pretrained(snapshot)
    model = LlamaForCausalLM.from_pretrained(snapshot)
    inject_adapter(model, UniLoraConfig(r=2, theta_d_length=100, target_modules=["q_proj"])).save_adapter(tmp_path / "a")
    base = read_adapter(tmp_path / "a").base
    assert (base.name_or_path, base.revision) == ("org/tiny-llama", "a" * 40)


def test_the_trainer_logs_the_best_model_it_loads(tmp_path, caplog):
    from transformers import TrainingArguments
    from transformers.utils import logging as hf_logging

    from unilora_hf import UniLoraTrainer

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            return {"input_ids": torch.arange(3, 11) + i, "labels": torch.tensor(i % 2)}

    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, report_to=[],
                             use_cpu=True, eval_strategy="steps", eval_steps=2, save_steps=2,
                             load_best_model_at_end=True, disable_tqdm=True)
    trainer = UniLoraTrainer(tiny_bert(num_labels=2), args, train_dataset=Data(), eval_dataset=Data(),
                             unilora_config=UniLoraConfig(r=2, theta_d_length=100, target_modules=["query"],
                                                          modules_to_save=["classifier"]))
    hf_logging.set_verbosity_info()
    hf_logging.enable_propagation()
    try:
        with caplog.at_level("INFO"):
            trainer.train()
    finally:
        hf_logging.set_verbosity_warning()
        hf_logging.disable_propagation()
    assert any("Loading best model from" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("example", ["glue", "sft", "load_and_generate", "render_card"])
def test_examples_parse_their_arguments_before_importing_anything_heavy(example):
    code = ("import runpy, sys\nsys.argv = ['x', '--help']\ntry:\n    runpy.run_path(%r, run_name='__main__')\n"
            "except SystemExit:\n    pass" % str(REPO / "examples" / f"{example}.py"))
    assert modules_after(code) == []
