"""A catalog of tiny random models, one per architecture, for cross-architecture tests.

Every entry builds a small model in code (no download, no Hub id), seeded and in float32, that
runs a forward on CPU in a few milliseconds, and says how PEFT 0.21.2's UniLoRA tuner
(``peft.UniLoraConfig`` / ``peft.get_peft_model``) is applied to it: the task type, the
target modules (``None`` = PEFT's architecture default), a ``theta_d_length`` that is not larger
than the flattened LoRA parameter count ``D`` at ``r=4``, an extra Linear that can be added as a
target, the numbered layer list (for ``layers_to_transform``/``layers_pattern``) and the
classification head.

It covers 16 decoders (CAUSAL_LM), 3 encoder-decoders (t5, bart: SEQ_2_SEQ_LM; whisper: plain
PeftModel), 5 encoders (SEQ_CLS, 3 labels: bert, roberta, deberta, deberta-v2, and vit as an
image classifier) and PEFT's two custom test models (``MLP`` and ``EmbConv1D`` of PEFT's
``tests/test_custom_models.py``, rebuilt here exactly, seeded with 0 by default as there).

Usage (from a test module in tests/, which pytest puts on sys.path, as for ``models``)::

    import peft
    from arch_catalog import ARCHS, peft_config

    arch = ARCHS["llama"]
    base = arch.build()
    inputs = arch.inputs()
    ref = arch.output(base, inputs)
    peft_model = peft.get_peft_model(arch.build(), peft_config(arch))
    out = arch.output(peft_model, inputs)

This module only defines models and inputs; it holds no tests. Verified with transformers 5.24,
peft 0.21.2, torch 2.13 (CPU): for every entry, build + forward, ``get_peft_model`` + forward
(output differs from the base model's), and save_pretrained / ``PeftModel.from_pretrained``
round trip (identical output).

Note: with UniLoRA's default init (theta_d uniform in +-0.02) the adapted output differs from the
base output only slightly (max |diff| from about 1e-7 for the deberta models to 5e-3 for MLP), so
"the adapter changes the output" is best checked with ``not torch.equal`` or with
``init_weights=False`` (theta_d ~ N(0, 1)).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import transformers
from torch import nn
from transformers.pytorch_utils import Conv1D

__all__ = ["Arch", "ARCHS", "MLP", "EmbConv1D", "peft_config", "lora_param_count"]

# Sizes shared by the transformers models: small but not degenerate.
VOCAB = 100
HIDDEN = 32
LAYERS = 2
HEADS = 4
FFN = 64
MAX_POS = 64
SEQ_LEN = 8
NUM_LABELS = 3
# Special token ids, all inside the small vocabulary (the configs' defaults are not).
PAD, BOS, EOS = 0, 1, 2


# ---------------------------------------------------------------------------------------------
# PEFT's custom test models (peft/tests/test_custom_models.py), rebuilt exactly.
# ---------------------------------------------------------------------------------------------


class MLP(nn.Module):
    """PEFT's ``MLP`` test model: Linear(10, 20) -> ReLU -> Dropout(0.5) -> Linear(20, 2) -> LogSoftmax."""

    def __init__(self, bias: bool = True):
        super().__init__()
        self.lin0 = nn.Linear(10, 20, bias=bias)
        self.relu = nn.ReLU()
        self.drop = nn.Dropout(0.5)
        self.lin1 = nn.Linear(20, 2, bias=bias)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, X):
        X = X.float()
        X = self.lin0(X)
        X = self.relu(X)
        X = self.drop(X)
        X = self.lin1(X)
        X = self.sm(X)
        return X


class EmbConv1D(nn.Module):
    """PEFT's ``ModelEmbConv1D`` test model: Embedding(100, 5) -> transformers Conv1D(1, 5) -> Linear(10, 2)."""

    def __init__(self, emb_size: int = 100):
        super().__init__()
        self.emb = nn.Embedding(emb_size, 5)
        self.conv1d = Conv1D(1, 5)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin0 = nn.Linear(10, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, X):
        X = self.emb(X)
        X = self.conv1d(X)
        X = self.relu(X)
        X = self.flat(X)
        X = self.lin0(X)
        X = self.sm(X)
        return X


# ---------------------------------------------------------------------------------------------
# The catalog entry
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Arch:
    """One architecture of the catalog.

    name: the catalog key (e.g. "llama").
    family: "decoder", "encoder-decoder", "encoder" or "custom".
    model_type: ``config.model_type`` of the built model, or None for the custom models.
    task_type: the PEFT task type string ("CAUSAL_LM", "SEQ_2_SEQ_LM", "SEQ_CLS") or None
        (plain ``PeftModel``).
    targets: explicit ``target_modules`` for UniLoRA, or None where PEFT's default mapping
        (``TRANSFORMERS_MODELS_TO_UNILORA_TARGET_MODULES_MAPPING``, a copy of the LoRA one) has an
        entry for ``model_type`` that matches Linear/Conv1D modules of the tiny model.
    theta_d_length: a ``d`` with ``d <= D`` for ``r=4`` and these targets (``D`` = sum over the
        adapted layers of ``r * (in + out)``): 257 for the transformers models and 101 for MLP as
        in PEFT's tests, smaller where D is smaller (EmbConv1D: D = 24).
    D: that flattened LoRA parameter count at ``r=4`` with the targets above (for reference).
    tied_lm_head: whether the output embedding weight is the same Parameter as the input
        embedding weight after construction (with the config's default tie setting).
    extra_linear: suffix of a Linear (or Conv1D, for gpt2) module, not among the default
        targets, usable as an additional target; None if there is none.
    layer_list: the attribute name of the numbered layer list (``layers_pattern``), or None.
    head: the classification head module name for the SEQ_CLS models, else None.
    """

    name: str
    family: str
    model_type: str | None
    task_type: str | None
    targets: list[str] | None
    theta_d_length: int
    D: int
    tied_lm_head: bool
    extra_linear: str | None
    layer_list: str | None
    head: str | None
    _factory: Callable[[], nn.Module] = field(repr=False)
    _inputs: Callable[[int, int], dict] = field(repr=False)

    def build(self, seed: int = 0) -> nn.Module:
        """A fresh model in eval mode and float32; the same weights for the same seed."""
        torch.manual_seed(seed)
        model = self._factory()
        return model.float().eval()

    def inputs(self, batch: int = 2, seed: int = 1) -> dict:
        """Deterministic keyword inputs for a forward of the model (and of a PeftModel around it)."""
        return self._inputs(batch, seed)

    def output(self, model: nn.Module, inputs: dict) -> torch.Tensor:
        """The tensor to compare: logits for the transformers models, the return value for the custom ones."""
        with torch.no_grad():
            out = model(**inputs)
        return out if self.family == "custom" else out.logits


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


def _text_inputs(pad_id: int | None = PAD) -> Callable[[int, int], dict]:
    """input_ids in [3, VOCAB) and an attention mask with one padded position (last row, last
    token; right padding, so that no query row of a causal model is fully masked)."""

    def make(batch: int, seed: int) -> dict:
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(3, VOCAB, (batch, SEQ_LEN), generator=g)
        mask = torch.ones(batch, SEQ_LEN, dtype=torch.long)
        mask[-1, -1] = 0
        if pad_id is not None:
            ids[-1, -1] = pad_id
        return {"input_ids": ids, "attention_mask": mask}

    return make


def _seq2seq_inputs(start_id: int, pad_id: int = PAD) -> Callable[[int, int], dict]:
    """Text inputs plus decoder_input_ids that start with the decoder start token."""

    text = _text_inputs(pad_id)

    def make(batch: int, seed: int) -> dict:
        out = text(batch, seed)
        g = torch.Generator().manual_seed(seed + 1000)
        dec = torch.randint(3, VOCAB, (batch, SEQ_LEN - 2), generator=g)
        dec[:, 0] = start_id
        out["decoder_input_ids"] = dec
        return out

    return make


WHISPER_MELS = 8
WHISPER_SOURCE_POSITIONS = 16  # the encoder takes 2 * max_source_positions input frames


def _whisper_inputs(batch: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(batch, WHISPER_MELS, 2 * WHISPER_SOURCE_POSITIONS, generator=g)
    dec = torch.randint(3, VOCAB, (batch, SEQ_LEN - 2), generator=g)
    dec[:, 0] = BOS  # decoder_start_token_id
    return {"input_features": feats, "decoder_input_ids": dec}


VIT_IMAGE, VIT_PATCH = 16, 4


def _vit_inputs(batch: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"pixel_values": torch.randn(batch, 3, VIT_IMAGE, VIT_IMAGE, generator=g)}


def _custom_inputs(batch: int, seed: int) -> dict:
    # As in PEFT's custom-model tests: the same int64 X for both models (EmbConv1D uses it as
    # embedding indices, MLP casts it to float). Fixed: batch and seed do not apply.
    return {"X": torch.arange(90).view(9, 10)}


# ---------------------------------------------------------------------------------------------
# Model factories (called after torch.manual_seed by Arch.build)
# ---------------------------------------------------------------------------------------------

T = transformers
_tok = dict(pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
_llama_like = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
                   num_attention_heads=HEADS, num_key_value_heads=2, max_position_embeddings=MAX_POS, **_tok)
_bert_like = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                  intermediate_size=FFN, max_position_embeddings=MAX_POS, num_labels=NUM_LABELS)


def _gpt2():
    return T.GPT2LMHeadModel(T.GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS,
                                          n_positions=MAX_POS, **_tok))


def _opt():
    return T.OPTForCausalLM(T.OPTConfig(vocab_size=VOCAB, hidden_size=HIDDEN, word_embed_proj_dim=HIDDEN,
                                        ffn_dim=FFN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                        max_position_embeddings=MAX_POS, **_tok))


def _bloom():
    return T.BloomForCausalLM(T.BloomConfig(vocab_size=VOCAB, hidden_size=HIDDEN, n_layer=LAYERS, n_head=HEADS, **_tok))


def _gpt_neox():
    return T.GPTNeoXForCausalLM(T.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN,
                                                num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                                max_position_embeddings=MAX_POS, **_tok))


def _gptj():
    return T.GPTJForCausalLM(T.GPTJConfig(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS,
                                          n_inner=FFN, rotary_dim=4, n_positions=MAX_POS, **_tok))


def _gpt_neo():
    return T.GPTNeoForCausalLM(T.GPTNeoConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_layers=LAYERS,
                                              num_heads=HEADS, intermediate_size=FFN,
                                              attention_types=[[["global", "local"], 1]], window_size=4,
                                              max_position_embeddings=MAX_POS, **_tok))


def _llama():
    return T.LlamaForCausalLM(T.LlamaConfig(**_llama_like))


def _mistral():
    return T.MistralForCausalLM(T.MistralConfig(**_llama_like, sliding_window=None))


def _gemma():
    return T.GemmaForCausalLM(T.GemmaConfig(**_llama_like, head_dim=8))


def _gemma2():
    return T.Gemma2ForCausalLM(T.Gemma2Config(**_llama_like, head_dim=8, sliding_window=4,
                                              layer_types=["sliding_attention", "full_attention"]))


def _gemma3_text():
    return T.Gemma3ForCausalLM(T.Gemma3TextConfig(**_llama_like, head_dim=8, sliding_window=4,
                                                  layer_types=["sliding_attention", "full_attention"]))


def _qwen2():
    return T.Qwen2ForCausalLM(T.Qwen2Config(**_llama_like))


def _qwen3():
    return T.Qwen3ForCausalLM(T.Qwen3Config(**_llama_like, head_dim=8))


def _phi():
    return T.PhiForCausalLM(T.PhiConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN,
                                        num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                        max_position_embeddings=MAX_POS, **_tok))


def _phi3():
    return T.Phi3ForCausalLM(T.Phi3Config(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN,
                                          num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                          num_key_value_heads=2, max_position_embeddings=MAX_POS, **_tok))


def _falcon():
    return T.FalconForCausalLM(T.FalconConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                              num_attention_heads=HEADS, **_tok))


def _t5():
    return T.T5ForConditionalGeneration(T.T5Config(vocab_size=VOCAB, d_model=HIDDEN, d_kv=8, d_ff=FFN,
                                                   num_layers=LAYERS, num_heads=HEADS,
                                                   relative_attention_num_buckets=8, decoder_start_token_id=PAD,
                                                   pad_token_id=PAD, eos_token_id=EOS))


def _bart():
    return T.BartForConditionalGeneration(T.BartConfig(vocab_size=VOCAB, d_model=HIDDEN, encoder_layers=LAYERS,
                                                       decoder_layers=LAYERS, encoder_attention_heads=HEADS,
                                                       decoder_attention_heads=HEADS, encoder_ffn_dim=FFN,
                                                       decoder_ffn_dim=FFN, max_position_embeddings=MAX_POS,
                                                       decoder_start_token_id=EOS, forced_eos_token_id=EOS, **_tok))


def _whisper():
    return T.WhisperForConditionalGeneration(T.WhisperConfig(
        vocab_size=VOCAB, num_mel_bins=WHISPER_MELS, d_model=HIDDEN, encoder_layers=LAYERS, decoder_layers=LAYERS,
        encoder_attention_heads=HEADS, decoder_attention_heads=HEADS, encoder_ffn_dim=FFN, decoder_ffn_dim=FFN,
        max_source_positions=WHISPER_SOURCE_POSITIONS, max_target_positions=MAX_POS, decoder_start_token_id=BOS,
        suppress_tokens=[], begin_suppress_tokens=[], **_tok))


def _bert():
    return T.BertForSequenceClassification(T.BertConfig(**_bert_like, pad_token_id=PAD))


def _roberta():
    # RoBERTa's position ids start after padding_idx (= pad_token_id = 1), so MAX_POS covers SEQ_LEN + 2.
    return T.RobertaForSequenceClassification(T.RobertaConfig(**_bert_like, pad_token_id=1, bos_token_id=0,
                                                              eos_token_id=2))


def _deberta():
    return T.DebertaForSequenceClassification(T.DebertaConfig(**_bert_like, pad_token_id=PAD))


def _deberta_v2():
    return T.DebertaV2ForSequenceClassification(T.DebertaV2Config(**_bert_like, pad_token_id=PAD))


def _vit():
    return T.ViTForImageClassification(T.ViTConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                                   num_attention_heads=HEADS, intermediate_size=FFN,
                                                   image_size=VIT_IMAGE, patch_size=VIT_PATCH, num_channels=3,
                                                   num_labels=NUM_LABELS))


# ---------------------------------------------------------------------------------------------
# The catalog
# ---------------------------------------------------------------------------------------------

_TEXT = _text_inputs()


def _entry(name, family, model_type, factory, inputs, *, task_type, targets, D, tied, extra, layers, head=None,
           theta_d_length=None):
    default_d = 101 if family == "custom" else 257
    d = theta_d_length if theta_d_length is not None else default_d
    assert d <= D, (name, d, D)
    return Arch(name=name, family=family, model_type=model_type, task_type=task_type, targets=targets,
                theta_d_length=d, D=D, tied_lm_head=tied, extra_linear=extra, layer_list=layers, head=head,
                _factory=factory, _inputs=inputs)


# D values are for r=4 with the targets given (checked by counting the UniLoRA index buffers).
_ENTRIES = [
    # ----- decoders (CAUSAL_LM) -----
    # gpt2: c_attn is a transformers Conv1D (fan_in_fan_out is switched on by PEFT, with a warning);
    # the model has no nn.Linear but lm_head, so the extra target is the MLP's Conv1D c_fc.
    _entry("gpt2", "decoder", "gpt2", _gpt2, _TEXT, task_type="CAUSAL_LM", targets=None, D=1024, tied=True,
           extra="c_fc", layers="h"),
    _entry("opt", "decoder", "opt", _opt, _TEXT, task_type="CAUSAL_LM", targets=None, D=1024, tied=True,
           extra="fc1", layers="layers"),
    _entry("bloom", "decoder", "bloom", _bloom, _TEXT, task_type="CAUSAL_LM", targets=None, D=1024, tied=True,
           extra="dense_h_to_4h", layers="h"),
    _entry("gpt_neox", "decoder", "gpt_neox", _gpt_neox, _TEXT, task_type="CAUSAL_LM", targets=None, D=1024,
           tied=False, extra="dense_h_to_4h", layers="layers"),
    _entry("gptj", "decoder", "gptj", _gptj, _TEXT, task_type="CAUSAL_LM", targets=None, D=1024, tied=False,
           extra="fc_in", layers="h"),
    _entry("gpt_neo", "decoder", "gpt_neo", _gpt_neo, _TEXT, task_type="CAUSAL_LM", targets=None, D=1024,
           tied=True, extra="c_fc", layers="h"),
    _entry("llama", "decoder", "llama", _llama, _TEXT, task_type="CAUSAL_LM", targets=None, D=896, tied=False,
           extra="down_proj", layers="layers"),
    _entry("mistral", "decoder", "mistral", _mistral, _TEXT, task_type="CAUSAL_LM", targets=None, D=896,
           tied=False, extra="down_proj", layers="layers"),
    _entry("gemma", "decoder", "gemma", _gemma, _TEXT, task_type="CAUSAL_LM", targets=None, D=896, tied=True,
           extra="down_proj", layers="layers"),
    _entry("gemma2", "decoder", "gemma2", _gemma2, _TEXT, task_type="CAUSAL_LM", targets=None, D=896, tied=True,
           extra="down_proj", layers="layers"),
    _entry("gemma3_text", "decoder", "gemma3_text", _gemma3_text, _TEXT, task_type="CAUSAL_LM", targets=None,
           D=896, tied=True, extra="down_proj", layers="layers"),
    _entry("qwen2", "decoder", "qwen2", _qwen2, _TEXT, task_type="CAUSAL_LM", targets=None, D=896, tied=False,
           extra="down_proj", layers="layers"),
    _entry("qwen3", "decoder", "qwen3", _qwen3, _TEXT, task_type="CAUSAL_LM", targets=None, D=896, tied=False,
           extra="down_proj", layers="layers"),
    # phi: PEFT's default is q_proj, v_proj, fc1, fc2; the attention output projection is "dense".
    _entry("phi", "decoder", "phi", _phi, _TEXT, task_type="CAUSAL_LM", targets=None, D=2560, tied=False,
           extra="dense", layers="layers"),
    # phi3: no PEFT default; the fused query/key/value projection is qkv_proj.
    _entry("phi3", "decoder", "phi3", _phi3, _TEXT, task_type="CAUSAL_LM", targets=["qkv_proj"], D=768,
           tied=False, extra="o_proj", layers="layers"),
    # falcon: query_key_value is a FalconLinear (an nn.Linear subclass); multi_query (the default) makes it
    # hidden -> hidden + 2 * head_dim.
    _entry("falcon", "decoder", "falcon", _falcon, _TEXT, task_type="CAUSAL_LM", targets=None, D=640, tied=True,
           extra="dense_h_to_4h", layers="h"),
    # ----- encoder-decoders (SEQ_2_SEQ_LM) -----
    # t5: "block" is the layer list of both the encoder and the decoder stack.
    _entry("t5", "encoder-decoder", "t5", _t5, _seq2seq_inputs(PAD), task_type="SEQ_2_SEQ_LM", targets=None,
           D=3072, tied=True, extra="wo", layers="block"),
    _entry("bart", "encoder-decoder", "bart", _bart, _seq2seq_inputs(EOS), task_type="SEQ_2_SEQ_LM",
           targets=None, D=3072, tied=True, extra="fc1", layers="layers"),
    # whisper: no PEFT default targets. task_type None (plain PeftModel): with "SEQ_2_SEQ_LM",
    # PeftModelForSeq2SeqLM.forward passes input_ids=None explicitly, WhisperForConditionalGeneration
    # takes it in **kwargs and hands it on to WhisperDecoder next to input_ids=decoder_input_ids:
    # "TypeError: WhisperDecoder(...) got multiple values for keyword argument 'input_ids'" (peft 0.21.2,
    # transformers 5.24).
    _entry("whisper", "encoder-decoder", "whisper", _whisper, _whisper_inputs, task_type=None,
           targets=["q_proj", "v_proj"], D=3072, tied=True, extra="fc1", layers="layers"),
    # ----- encoders (SEQ_CLS, num_labels=3) -----
    _entry("bert", "encoder", "bert", _bert, _TEXT, task_type="SEQ_CLS", targets=None, D=1024, tied=False,
           extra="key", layers="layer", head="classifier"),
    # roberta: "classifier" is a RobertaClassificationHead (dense + out_proj), not a plain Linear.
    _entry("roberta", "encoder", "roberta", _roberta, _text_inputs(pad_id=1), task_type="SEQ_CLS", targets=None,
           D=1024, tied=False, extra="key", layers="layer", head="classifier"),
    # deberta (v1): the default "in_proj" exists in transformers 5.24 (DisentangledSelfAttention.in_proj, an
    # nn.Linear(hidden, 3 * hidden), the fused query/key/value projection). There is no separate key/query Linear;
    # "dense" matches attention.output.dense, intermediate.dense, output.dense and pooler.dense.
    _entry("deberta", "encoder", "deberta", _deberta, _TEXT, task_type="SEQ_CLS", targets=None, D=1024,
           tied=False, extra="dense", layers="layer", head="classifier"),
    _entry("deberta-v2", "encoder", "deberta-v2", _deberta_v2, _TEXT, task_type="SEQ_CLS", targets=None, D=1024,
           tied=False, extra="key_proj", layers="layer", head="classifier"),
    # vit: no PEFT default. In transformers 5.24 ViT's attention is q_proj/k_proj/v_proj/o_proj and the layer
    # list is vit.layers (older versions: attention.attention.query/value and vit.encoder.layer).
    # task_type "SEQ_CLS" works: PeftModelForSequenceClassification passes input_ids=None etc., which
    # ViTForImageClassification.forward takes in **kwargs, and pixel_values goes through **kwargs. As for
    # the other SEQ_CLS models, PEFT then wraps "classifier" in modules_to_save (and saves it).
    _entry("vit", "encoder", "vit", _vit, _vit_inputs, task_type="SEQ_CLS", targets=["q_proj", "v_proj"], D=1024,
           tied=False, extra="fc1", layers="layers", head="classifier"),
    # ----- PEFT's custom test models -----
    _entry("MLP", "custom", None, MLP, _custom_inputs, task_type=None, targets=["lin0", "lin1"], D=208,
           tied=False, extra=None, layers=None),
    # EmbConv1D: conv1d is Conv1D(nf=1, nx=5), so D = 4 * (5 + 1) = 24 < 101: a smaller d (13: D/d is not
    # an integer, so theta_d entries are shared unevenly, once or twice).
    _entry("EmbConv1D", "custom", None, EmbConv1D, _custom_inputs, task_type=None, targets=["conv1d"], D=24,
           tied=False, extra="lin0", layers=None, theta_d_length=13),
]

ARCHS: dict[str, Arch] = {a.name: a for a in _ENTRIES}


def peft_config(arch: Arch, **overrides):
    """``peft.UniLoraConfig`` for ``arch``: r=4, the arch's theta_d_length, task type and targets.

    Keyword overrides replace any of those or add other UniLoraConfig fields. A fresh config on every
    call: ``get_peft_model`` mutates the config it is given (PEFT sets ``fan_in_fan_out=True`` on it,
    with a warning, when a target is a transformers Conv1D: gpt2, EmbConv1D).
    """
    import peft

    targets = list(arch.targets) if arch.targets is not None else None
    kwargs = dict(r=4, theta_d_length=arch.theta_d_length, task_type=arch.task_type, target_modules=targets)
    kwargs.update(overrides)
    return peft.UniLoraConfig(**kwargs)


def lora_param_count(model: nn.Module, adapter_name: str = "default") -> int:
    """D of a PEFT UniLoRA model: the number of flattened LoRA parameters (sum of r * (in + out))."""
    from peft.tuners.unilora.layer import UniLoraLayer

    return sum(m.r[adapter_name] * (m.in_features + m.out_features) for m in model.modules()
               if isinstance(m, UniLoraLayer) and adapter_name in m.r)
