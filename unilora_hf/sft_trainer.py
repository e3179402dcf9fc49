"""`UniLoraSFTTrainer`: trl's ``SFTTrainer`` training only θ_d (and the heads), one line changed.

``UniLoraSFTTrainer(model, args, train_dataset=..., unilora_config=UniLoraConfig(...))`` takes everything
``trl.SFTTrainer`` takes. trl 1.16 has no hook for an adapter that is not PEFT's, so `UniLoraSFTMixin`
does the model part itself before ``SFTTrainer.__init__`` runs: it loads a model given by id or folder
(with ``args.model_init_kwargs``, as SFTTrainer would), attaches the adapter in place (the model stays a
``PreTrainedModel``), repeats what SFTTrainer does for PEFT models that still applies (input gradients for
activation checkpointing; fp32 trainable parameters under mixed precision), then calls
``SFTTrainer.__init__`` with the ready model and ``peft_config=None``. Data preparation, completion-only
and assistant-only loss, packing, padding-free batches and the fused LM head stay trl's. Optimizer groups,
kilobyte checkpoints, resuming and ``push_to_hub`` come from `UniLoraTrainerMixin`.

trl is optional: importing this module without it raises ImportError with the install command.
"""

from __future__ import annotations

import inspect
import os

from transformers import set_seed

from .config import UniLoraConfig
from .errors import InvalidConfigError, MissingDependencyError
from .layer import UniLoraLinear
from .trainer import (
    TrainableParametersCallback, UniLoraTrainerMixin, attach, broadcast_theta_from_rank0, quant_method_of_config,
    quantized_base_accepted, refuse_reentrant_under_ddp, upcast_trainable,
)

try:
    from trl import SFTConfig, SFTTrainer
    from trl.trainer.utils import create_model_from_path
except ImportError as exc:  # trl missing or broken
    raise MissingDependencyError(
        f"UniLoraSFTTrainer needs trl (>= 1.16), which could not be imported ({exc}). Install it with "
        '`pip install "unilora_hf[trl]"`.'
    ) from exc


def _is_bnb_config(config) -> bool:
    """True for no quantization config or a bitsandbytes one (a BitsAndBytesConfig or its dict)."""
    return config is None or quant_method_of_config(config) == "bitsandbytes"


class UniLoraSFTMixin(UniLoraTrainerMixin):
    """Uni-LoRA for ``trl.SFTTrainer`` and its subclasses: put it first in the bases,
    ``class MyTrainer(UniLoraSFTMixin, SFTTrainer)``.

    Args (besides the SFTTrainer ones, all passed through):
        model: a model id or folder (loaded with ``args.model_init_kwargs``; ``dtype`` defaults to float32,
            as in trl), or a ``PreTrainedModel``, with or without a Uni-LoRA adapter attached.
        unilora_config: the adapter to attach; None when ``model`` already carries one.
        unilora_learning_rate: θ_d's learning rate (default: ``args.learning_rate``; the paper uses
            2e-3 for math and 8e-4 for instruction tuning of 7B models); heads use ``args.learning_rate``.
        unilora_weight_decay: θ_d's weight decay (default 0).
        save_processing_class: save the tokenizer with the adapter in the output folders (default True, as
            SFTTrainer does); it is never pushed.
        hub_endpoint: the Hub URL for ``push_to_hub`` (default: huggingface_hub's, i.e. ``HF_ENDPOINT``).

    Raises:
        ValueError: ``peft_config`` is given (this trainer trains a Uni-LoRA adapter, not a PEFT one), a
            quantized base is asked for, the adapter targets the output head (trl's fused LM head reads
            ``lm_head.weight`` directly, so the adapter there would never train), or ``chat_template_path``
            would add tokens whose embeddings could not train.
        AdapterStateError: the model already carries a PEFT adapter.
    """

    def __init__(self, model, args=None, *pos, unilora_config: UniLoraConfig | None = None,
                 unilora_learning_rate: float | None = None, unilora_weight_decay: float = 0.0,
                 save_processing_class: bool = True, hub_endpoint: str | None = None,
                 base_model_name_or_path: str | None = None, export_lora_beside: bool = True, **kwargs):
        # Name every argument as SFTTrainer does, also under a subclass whose __init__ takes (*args, **kwargs);
        # keywords that only such a subclass knows pass through untouched.
        signature = inspect.signature(super().__init__)
        if "peft_config" not in signature.parameters:
            signature = inspect.signature(SFTTrainer)
        extras = {k: kwargs.pop(k) for k in list(kwargs) if k not in signature.parameters}
        bound = signature.bind(model, args, *pos, **kwargs)
        given = bound.arguments
        if given.get("peft_config") is not None:
            both = " together with unilora_config" if unilora_config is not None else ""
            raise InvalidConfigError(
                f"{type(self).__name__} got peft_config{both} (trl's --use_peft makes one): it trains a Uni-LoRA "
                "adapter, configured by unilora_config=UniLoraConfig(...). Drop peft_config (run without --use_peft), "
                "or use trl.SFTTrainer for a PEFT adapter."
            )
        if not _is_bnb_config(given.get("quantization_config")):
            raise InvalidConfigError(
                "quantization_config was given, but unilora_hf trains Uni-LoRA on bitsandbytes 4-bit/8-bit and "
                "unquantized bases only: pass a BitsAndBytesConfig in args.model_init_kwargs, or set "
                "args.model_init_kwargs={'dtype': 'bfloat16'}."
            )
        args = given.get("args")
        if args is None:  # SFTTrainer's own default, made here because the model is loaded here
            name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "") or "model"
            args = given["args"] = SFTConfig(f"{os.path.basename(str(name).rstrip('/'))}-SFT")
        chat_template_path = getattr(args, "chat_template_path", None)
        if chat_template_path is not None and not (
            os.path.isfile(chat_template_path) and chat_template_path.endswith((".jinja", ".j2"))
        ):
            raise InvalidConfigError(
                f"chat_template_path={chat_template_path!r} copies another tokenizer's template and adds its special "
                "tokens, whose new embeddings could not train (the base is frozen). Give a .jinja file, or set "
                "processing_class.chat_template before creating the trainer."
            )

        self._init_unilora(unilora_learning_rate, unilora_weight_decay, save_processing_class, hub_endpoint,
                           base_model_name_or_path, export_lora_beside)
        # As SFTTrainer does: seed before the adapter is created, so θ_d's initial values are reproducible.
        set_seed(args.seed)
        # model_init_kwargs serve the load below; hidden from SFTTrainer, which would warn that they go unused.
        model_init_kwargs = getattr(args, "model_init_kwargs", None) if isinstance(model, str) else None
        if isinstance(model, str):
            model = given["model"] = self._load_model(model, args, given)
        elif given.get("quantization_config") is not None:
            raise InvalidConfigError(
                "quantization_config applies when the trainer loads the model from its id; this model is already "
                "loaded. Load it with quantization_config=BitsAndBytesConfig(...) yourself, or pass the model id."
            )
        given.pop("quantization_config", None)  # used by the load above: SFTTrainer would warn it is ignored
        attach(model, unilora_config)
        out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if isinstance(out, UniLoraLinear):
            raise InvalidConfigError(
                "unilora_config adapts the output head, but trl computes the log-probabilities from "
                "lm_head.weight directly, so that adapter would never train. Remove the head from target_modules "
                "(or list it in modules_to_save to train it in full)."
            )
        upcast_trainable(model, args)
        if getattr(args, "activation_checkpointing", False) or getattr(args, "gradient_checkpointing", False):
            # What SFTTrainer does for PEFT models: with frozen embeddings, reentrant checkpointing would
            # otherwise see inputs that need no gradient and drop θ_d's.
            model.enable_input_require_grads()

        if model_init_kwargs is not None:
            args.model_init_kwargs = None
        try:
            with quantized_base_accepted(model):
                super().__init__(*bound.args, **bound.kwargs, **extras)
        finally:
            if model_init_kwargs is not None:
                args.model_init_kwargs = model_init_kwargs
                if getattr(self, "args", args) is not args:  # SFTTrainer made an SFTConfig of a TrainingArguments
                    self.args.model_init_kwargs = model_init_kwargs
        self.add_callback(TrainableParametersCallback)
        refuse_reentrant_under_ddp(self)
        broadcast_theta_from_rank0(self)

    @staticmethod
    def _load_model(model_id: str, args, given: dict):
        """The model (and, when none was given, the processing class) from an id or folder, as SFTTrainer
        loads them: ``args.model_init_kwargs``, ``dtype`` float32 unless set, ``device_map`` None on CPU and
        in distributed runs, ``trust_remote_code`` from ``args``."""
        init_kwargs = dict(getattr(args, "model_init_kwargs", None) or {})
        quantization = given.get("quantization_config")
        if quantization is not None:  # trl's sft.py passes --load_in_4bit / --load_in_8bit this way
            if "quantization_config" in init_kwargs:
                raise InvalidConfigError(
                    "quantization_config was given both as a trainer argument and in args.model_init_kwargs; set it "
                    "in one place"
                )
            init_kwargs["quantization_config"] = quantization
        if init_kwargs.get("quantization_config") is not None:
            import importlib.util

            if importlib.util.find_spec("bitsandbytes") is None:
                raise MissingDependencyError(
                    "a 4-bit/8-bit base (--load_in_4bit / --load_in_8bit, a BitsAndBytesConfig) needs bitsandbytes, "
                    "which is not installed: `pip install bitsandbytes` (on a machine with a CUDA GPU), or drop the "
                    "quantization to train on a bf16/fp32 base"
                )
        if not _is_bnb_config(init_kwargs.get("quantization_config")):
            raise InvalidConfigError(
                "args.model_init_kwargs holds a quantization_config other than bitsandbytes; unilora_hf trains "
                "Uni-LoRA on bitsandbytes 4-bit/8-bit and unquantized bases only: use a BitsAndBytesConfig or "
                "set dtype='bfloat16' instead."
            )
        if args.distributed_state.distributed_type in ["MULTI_GPU", "DEEPSPEED"]:
            init_kwargs["device_map"] = None
        init_kwargs.setdefault("trust_remote_code", getattr(args, "trust_remote_code", False))
        model = create_model_from_path(model_id, **init_kwargs)
        if given.get("processing_class") is None:
            from transformers import AutoProcessor

            given["processing_class"] = AutoProcessor.from_pretrained(
                model_id, revision=init_kwargs.get("revision"), trust_remote_code=init_kwargs["trust_remote_code"]
            )
        return model


class UniLoraSFTTrainer(UniLoraSFTMixin, SFTTrainer):
    """``trl.SFTTrainer`` for Uni-LoRA: the same arguments plus ``unilora_config``,
    ``unilora_learning_rate``, ``unilora_weight_decay``, ``save_processing_class``, ``hub_endpoint``,
    ``base_model_name_or_path`` and ``export_lora_beside``
    (see `UniLoraSFTMixin`)."""
