"""The GLUE quality anchor: examples/glue.py's `unilora --projection peft` and `peft-unilora` (PEFT 0.21.2's
own tuner under a plain Trainer with the same two lr groups) are the same run, on the real all-MiniLM-L6-v2.

Same seed: equal θ_d and head at init, identical logits, then the same losses, gradient norms and
trained weights over the first optimizer steps (dropout on, warm-up, both lrs in play)."""

import importlib.util
import zlib

import pytest
import torch
from models import REPO, minilm_path
from transformers import DataCollatorWithPadding

from unilora_hf import get_adapter

spec = importlib.util.spec_from_file_location("glue_example", REPO / "examples" / "glue.py")
glue = importlib.util.module_from_spec(spec)
spec.loader.exec_module(glue)

STEPS = 4


@pytest.fixture(scope="module")
def data():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    sst2 = REPO / "examples" / "data" / "sst2"
    train = glue.Encoded(tokenizer, *glue.read_tsv(sst2 / "train.tsv", "sst2", 16), 48)
    dev = glue.Encoded(tokenizer, *glue.read_tsv(sst2 / "dev.tsv", "sst2", 8), 48)
    return tokenizer, train, dev


def trainer_for(method, tmp_path, data):
    tokenizer, train, dev = data
    a = glue.parse_args(["--method", method, "--projection", "peft", "--seed", "3", "--batch-size", "4",
                         "--max-steps", str(STEPS), "--logging-steps", "1", "--measure-only",
                         "--output-dir", str(tmp_path / method)])
    trainer = glue.build_trainer(a, str(minilm_path()), tokenizer, train, dev)
    trainer.args.use_cpu = True
    return trainer


def logits(model, batch):
    model.eval()
    with torch.no_grad():
        out = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    model.train()
    return out


def test_unilora_peft_projection_matches_peft_tuner_at_init_and_over_the_first_steps(tmp_path, data):
    tokenizer, _, dev = data
    batch = DataCollatorWithPadding(tokenizer)([dev[i] for i in range(len(dev))])
    # Each run is built and trained before the next is built, as in separate processes: training draws
    # dropout masks from the global RNG that Trainer seeds in __init__.
    ours = trainer_for("unilora", tmp_path, data)
    theta_ours = get_adapter(ours.model).theta_d
    theta_init = theta_ours.detach().clone()
    head_init = [p.detach().clone() for p in glue.head_parameters(ours.model)]
    init = logits(ours.model, batch)
    ours.train()

    theirs = trainer_for("peft-unilora", tmp_path, data)
    theta_peft = theirs.model.base_model.unilora_theta_d["default"]
    assert theta_init.shape == (23_040,) and torch.equal(theta_init, theta_peft)
    head_peft = glue.head_parameters(theirs.model)
    assert len(head_init) == len(head_peft) == 2
    assert all(torch.equal(x, y) for x, y in zip(head_init, head_peft))
    assert torch.equal(init, logits(theirs.model, batch))
    theirs.train()

    lrs = sorted(g["lr"] for g in theirs.optimizer.param_groups)
    assert lrs[0] == 0.0 and {g["initial_lr"] for g in theirs.optimizer.param_groups} == {5e-3, 2e-3}
    assert {g["initial_lr"] for g in ours.optimizer.param_groups} == {5e-3, 2e-3}
    log_ours = [h for h in ours.state.log_history if "loss" in h]
    log_peft = [h for h in theirs.state.log_history if "loss" in h]
    assert len(log_ours) == len(log_peft) == STEPS
    for step_ours, step_peft in zip(log_ours, log_peft):
        assert step_ours["loss"] == pytest.approx(step_peft["loss"], rel=1e-5)
        assert step_ours["grad_norm"] == pytest.approx(step_peft["grad_norm"], rel=1e-4)
    # Both lrs really moved θ_d and the head, and both runs moved them alike.
    assert (theta_ours - theta_init).abs().max() > 1e-3
    torch.testing.assert_close(theta_ours, theta_peft, rtol=0, atol=1e-6)
    for mine, peft_head, start in zip(glue.head_parameters(ours.model), head_peft, head_init):
        assert (mine - start).abs().max() > 1e-3
        torch.testing.assert_close(mine, peft_head, rtol=0, atol=1e-6)
    trained = logits(ours.model, batch)
    assert (trained - init).abs().max() > 1e-3
    torch.testing.assert_close(trained, logits(theirs.model, batch), rtol=1e-5, atol=1e-5)


def test_packed_model_is_exact_on_kept_tokens_and_zero_elsewhere(tmp_path):
    """benchmarks/glue_quality.py carries MiniLM as its used embedding rows plus every other tensor."""
    from models import tiny_bert

    spec = importlib.util.spec_from_file_location("glue_quality", REPO / "benchmarks" / "glue_quality.py")
    quality = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quality)
    model = tiny_bert(num_labels=2)
    model.save_pretrained(tmp_path / "base")
    keep = set(range(0, 80, 3))
    meta = quality.pack_model(tmp_path / "base", tmp_path / "pack", keep)
    assert meta["files"] == ["config.json"] and len(meta["rows"]) == len(keep)
    rebuilt = type(model).from_pretrained(quality.unpack_model(tmp_path / "pack", tmp_path / "out")).eval()
    emb, emb_rebuilt = model.bert.embeddings.word_embeddings.weight, rebuilt.bert.embeddings.word_embeddings.weight
    rows = sorted(keep)
    assert torch.equal(emb_rebuilt[rows], emb[rows])
    assert not emb_rebuilt[[i for i in range(80) if i not in keep]].any()
    kept_ids = torch.tensor([rows[1:9], rows[9:17]])
    with torch.no_grad():
        assert torch.equal(rebuilt(input_ids=kept_ids).logits, model(input_ids=kept_ids).logits)
        other = kept_ids + 1
        assert not torch.equal(rebuilt(input_ids=other).logits, model(input_ids=other).logits)
    plane = bytearray(zlib.decompress((tmp_path / "pack" / "plane2.z").read_bytes()))
    plane[5] ^= 1
    (tmp_path / "pack" / "plane2.z").write_bytes(zlib.compress(bytes(plane)))
    with pytest.raises(ValueError, match="sha256"):
        quality.unpack_model(tmp_path / "pack", tmp_path / "bad")
