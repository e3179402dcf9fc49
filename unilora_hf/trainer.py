"""`UniLoraTrainer`: transformers' ``Trainer`` training only θ_d (and the heads), one line changed.

``UniLoraTrainer(model, args, ..., unilora_config=UniLoraConfig(...))`` attaches the adapter to
``model`` in place before ``Trainer.__init__`` (the model stays a ``PreTrainedModel``), or accepts a model
that already has one, or wraps ``model_init`` so every trial gets a fresh adapter. θ_d gets its own
optimizer group, found by identity, with ``unilora_learning_rate`` (default: ``args.learning_rate``) and
no weight decay; heads keep ``args.learning_rate``. Checkpoints hold the adapter files plus the
optimizer, scheduler and RNG state that resuming needs; ``push_to_hub`` uploads the adapter repo.

Under ``torchrun`` / ``accelerate launch`` it runs with DDP, FSDP2 and FSDP1 (``use_orig_params=True``):
rank 0's θ_d is broadcast at construction; under FSDP, ``save_model`` gathers θ_d and the heads on every
rank and writes them from rank 0, and checkpoints leave the base model out. Reentrant activation
checkpointing under DDP is refused unless ``ddp_static_graph=True`` (see `refuse_reentrant_under_ddp`).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import Trainer, TrainerCallback, set_seed
from transformers.utils import logging
from transformers.trainer_pt_utils import get_parameter_names

from .config import UniLoraConfig
from .distributed import gather_adapter_state, load_adapter_state
from .errors import AdapterFormatError, AdapterStateError, InvalidConfigError, LayoutMismatchError
from .model import UniLoraAdapter, get_adapter, has_adapter, inject_adapter, unwrap
from .serialization import AdapterState, read_adapter


logger = logging.get_logger(__name__)


def quant_method_of_config(config) -> str | None:
    """The ``quant_method`` of a transformers quantization config (object or dict), as a plain string."""
    if config is None:
        return None
    method = config.get("quant_method") if isinstance(config, dict) else getattr(config, "quant_method", None)
    return None if method is None else str(getattr(method, "value", method))


def _quant_method(model) -> str | None:
    """The quantization method of a transformers model (``"bitsandbytes"``, ...), or None."""
    if not (getattr(model, "is_quantized", False) or getattr(model, "hf_quantizer", None) is not None):
        return None
    config = getattr(getattr(model, "hf_quantizer", None), "quantization_config", None)
    return quant_method_of_config(config) or "unknown method"


def _refuse_quantized(model) -> None:
    method = _quant_method(model)
    if method is not None and method != "bitsandbytes":
        raise InvalidConfigError(
            f"the base model is quantized with {method!r}; unilora_hf trains Uni-LoRA on bitsandbytes 4-bit/8-bit "
            "bases and on unquantized ones (bf16/fp16/fp32) only. Load the base with "
            "BitsAndBytesConfig(load_in_4bit=True) or dtype=torch.bfloat16."
        )


@contextlib.contextmanager
def quantized_base_accepted(model):
    """Inside the block, transformers' ``validate_quantization_for_training`` (run by ``Trainer.__init__``)
    sees the bitsandbytes base as carrying a trainable adapter, which it does: θ_d (float32) is trained, the
    quantized weights stay frozen. It otherwise refuses every quantized model that is not a PEFT model."""
    flag = "_hf_peft_config_loaded"
    patch = _quant_method(model) == "bitsandbytes" and not getattr(model, flag, False)
    if patch:
        setattr(model, flag, True)
    try:
        yield
    finally:
        if patch:
            setattr(model, flag, False)


def attach(model, unilora_config: UniLoraConfig | None) -> UniLoraAdapter:
    """Attach ``unilora_config`` to ``model`` in place, or return the adapter it already has."""
    if model is None:
        raise InvalidConfigError("UniLoraTrainer needs a model (or model_init)")
    _refuse_quantized(model)
    if has_adapter(model):
        if unilora_config is not None and get_adapter(model).config != unilora_config:
            raise InvalidConfigError("the model already has a Uni-LoRA adapter with another config; pass unilora_config=None")
        return get_adapter(model)
    if unilora_config is None:
        raise InvalidConfigError(
            "UniLoraTrainer got a model without a Uni-LoRA adapter and no unilora_config: pass "
            "unilora_config=UniLoraConfig(...) or a model prepared with unilora_hf.inject_adapter"
        )
    return inject_adapter(model, unilora_config)


def upcast_trainable(model, args) -> None:
    """Under mixed precision (``args.bf16`` or ``args.fp16``), keep every trainable parameter in float32, as
    PEFT does for its adapters: AdamW updates applied to bf16/fp16 weights round away, and fp16 gradient
    scaling refuses fp16 parameters. θ_d is float32 already; this concerns heads copied from a bf16/fp16
    base. Autocast runs their forward in the low precision. Without mixed precision nothing changes."""
    if args is None or not (getattr(args, "bf16", False) or getattr(args, "fp16", False)):
        return
    for param in model.parameters():
        if param.requires_grad and param.dtype in (torch.bfloat16, torch.float16):
            param.data = param.data.float()


def load_adapter_weights(model, folder: str | os.PathLike) -> None:
    """Copy θ_d and the heads saved in ``folder`` into the adapter on ``model`` (in place, keeping the
    parameters the optimizer holds). Refuses a folder from another adapter layout."""
    adapter = get_adapter(model)
    files = read_adapter(folder)
    layout = files.layout or {}
    if layout.get("fingerprint") != adapter.fingerprint or files.config.theta_d_length != adapter.config.theta_d_length:
        raise LayoutMismatchError(
            f"checkpoint {folder} was saved from another adapter layout (fingerprint {layout.get('fingerprint')}, "
            f"d = {files.config.theta_d_length}); this run's adapter has {adapter.fingerprint}, "
            f"d = {adapter.config.theta_d_length}. Resume from a checkpoint of this run's configuration."
        )
    if files.config.projection != adapter.config.projection or files.config.proj_seed != adapter.config.proj_seed:
        raise LayoutMismatchError(
            f"checkpoint {folder} uses projection {files.config.projection}/seed {files.config.proj_seed}; "
            f"this run uses {adapter.config.projection}/seed {adapter.config.proj_seed}"
        )
    live = adapter.saved_state()
    if set(live) != set(files.tensors):
        raise AdapterFormatError(f"checkpoint {folder} holds heads {sorted(files.tensors)}, this run trains {sorted(live)}")
    load_adapter_state(model, AdapterState(files.theta_d, files.tensors))


def _uses_reentrant_checkpointing(model, args) -> bool:
    """Whether training will run reentrant activation checkpointing: asked for through ``args`` (transformers
    defaults to non-reentrant; torch's ``checkpoint`` to reentrant when kwargs omit ``use_reentrant``), or
    already switched on in ``model``."""
    if getattr(args, "activation_checkpointing", False):
        kwargs = dict(args.activation_checkpointing_kwargs or {})
        kwargs.pop("every_n_layers", None)
        kwargs.pop("offload", None)
        return bool(kwargs) and kwargs.get("use_reentrant", True) is not False
    for module in unwrap(model).modules():
        func = module.__dict__.get("_gradient_checkpointing_func")
        if func is not None and getattr(module, "gradient_checkpointing", False):
            if getattr(func, "keywords", {}).get("use_reentrant", True) is not False:
                return True
    return False


def refuse_reentrant_under_ddp(trainer) -> None:
    """Reentrant checkpointing under DDP trains θ_d on a wrong gradient, silently: every checkpointed layer
    adds to θ_d's gradient in its own nested backward, and DDP all-reduces θ_d at the first of them. With
    ``ddp_static_graph=True`` DDP waits for all of them (tests/test_distributed.py checks both)."""
    args = trainer.args
    ddp = (args.world_size > 1 and not getattr(trainer, "is_fsdp_enabled", False)
           and not getattr(trainer, "is_deepspeed_enabled", False))
    if ddp and not args.ddp_static_graph and _uses_reentrant_checkpointing(trainer.model, args):
        raise InvalidConfigError(
            "reentrant activation checkpointing under DDP gives θ_d a wrong gradient: θ_d is shared by every "
            "checkpointed layer, each adds to its gradient in a separate backward pass, and DDP all-reduces it "
            "after the first one. Use non-reentrant checkpointing (activation_checkpointing_kwargs="
            "{'use_reentrant': False}, transformers' default), or keep it reentrant and set ddp_static_graph=True."
        )


def broadcast_theta_from_rank0(trainer) -> None:
    """Make every rank start from rank 0's θ_d. It is drawn from each process's own torch RNG at injection;
    DDP broadcasts parameters when it wraps the model, but FSDP2 shards each rank's local copy, so ranks
    whose RNG states differ would start from a mix of their draws."""
    import torch.distributed as dist

    if trainer.args.world_size <= 1 or not (dist.is_available() and dist.is_initialized()):
        return
    theta = get_adapter(trainer.model).theta_d
    buffer = theta.detach().to(trainer.args.device)  # NCCL needs it on the GPU; the model may still be on CPU
    dist.broadcast(buffer, src=0)
    with torch.no_grad():
        theta.copy_(buffer.to(theta.device))


class UniLoraTrainerMixin:
    """The Uni-LoRA behaviour shared by `UniLoraTrainer` and `UniLoraSFTTrainer`."""

    unilora_learning_rate: float | None
    unilora_weight_decay: float

    def _init_unilora(self, unilora_learning_rate, unilora_weight_decay, save_processing_class,
                      hub_endpoint=None, base_model_name_or_path=None, export_lora_beside=True) -> None:
        self.hub_endpoint = hub_endpoint
        self.unilora_learning_rate = unilora_learning_rate
        self.unilora_weight_decay = unilora_weight_decay
        self.save_processing_class = save_processing_class
        self.base_model_name_or_path = base_model_name_or_path
        self.export_lora_beside = export_lora_beside
        self.evaluation_only = False
        self._card_data: dict[str, Any] = {}

    @staticmethod
    def _wrap_model_init(model_init: Callable, unilora_config: UniLoraConfig | None) -> Callable:
        def model_init_with_adapter(*args):
            model = model_init(*args)
            attach(model, unilora_config)
            return model

        return model_init_with_adapter

    @property
    def unilora_adapter(self) -> UniLoraAdapter:
        return get_adapter(self.model)

    def create_optimizer(self, model=None):
        """θ_d alone in a group with its own lr (picked by identity); heads split by weight decay as Trainer does."""
        if self.optimizer is not None:
            return self.optimizer
        opt_model = unwrap(self.model if model is None else model)
        theta = get_adapter(opt_model).theta_d
        decay_names = set(get_parameter_names(opt_model, [torch.nn.LayerNorm], ["bias", "layernorm", "rmsnorm"]))
        others = [(n, p) for n, p in opt_model.named_parameters() if p.requires_grad and p is not theta]
        groups = [{"params": [theta], "weight_decay": self.unilora_weight_decay,
                   "lr": self.unilora_learning_rate if self.unilora_learning_rate is not None else self.args.learning_rate}]
        decay = [p for n, p in others if n in decay_names]
        no_decay = [p for n, p in others if n not in decay_names]
        if decay:
            groups.append({"params": decay, "weight_decay": self.args.weight_decay})
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Under FSDP: gather θ_d and the heads on every rank (never the frozen base model), write them from
        rank 0. Otherwise as ``Trainer.save_model``, whose ``_save`` writes the adapter."""
        self._refuse_in_evaluation_only("save_model")
        if not getattr(self, "is_fsdp_enabled", False):
            return super().save_model(output_dir, _internal_call=_internal_call)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        state = gather_adapter_state(self.model)
        self._save(output_dir, adapter_state=state)
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None,
              adapter_state: AdapterState | None = None) -> None:
        """Write the adapter files (kilobytes) instead of the full model, on the process that saves, with the
        tokenizer (as Trainer saves it) and ``training_args.bin``, which stay local: pushes carry the adapter and
        its card only. In the final output folder (``args.output_dir``), a native adapter also gets its LoRA export
        beside it (``export_lora_beside``), so ``AutoModelFor....from_pretrained(output_dir)`` loads there too."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        adapter = get_adapter(self.model)
        adapter.save_adapter(output_dir, state=adapter_state, base_model_name_or_path=self.base_model_name_or_path)
        final = os.path.abspath(output_dir) == os.path.abspath(self.args.output_dir)
        if final and self.export_lora_beside and adapter.config.projection == "native" and adapter_state is None:
            from .peft_export import export_lora

            export_lora(adapter, output_dir, companion=True)
        if self.save_processing_class and self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        """Under FSDP, Trainer would also write the whole base model next to the optimizer; keep the
        checkpoint to the adapter (saved by ``save_model``), the optimizer and the scheduler."""
        if not getattr(self, "is_fsdp_enabled", False):
            return super()._save_optimizer_and_scheduler(output_dir)
        from accelerate.utils import save_fsdp_optimizer
        from transformers.trainer import SCHEDULER_NAME

        save_fsdp_optimizer(self.accelerator.state.fsdp_plugin, self.accelerator, self.optimizer, self.model,
                            output_dir)
        if self.args.should_save:
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        load_adapter_weights(self.model if model is None else model, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        logger.info(f"Loading best model from {self.state.best_model_checkpoint} (score: {self.state.best_metric}).")
        load_adapter_weights(self.model, self.state.best_model_checkpoint)

    # -- the Hub -----------------------------------------------------------------------------------
    def init_hf_repo(self, token: str | None = None, private: bool | None = None) -> None:
        """Resolve the repo id (a bare ``hub_model_id`` or the output folder's name goes to the token owner's
        namespace) and check the token, before training; the repo itself is created by the first push, which
        deletes it again if that push fails."""
        if not self.is_world_process_zero():
            return
        from huggingface_hub import HfApi

        from .push import resolve_repo_id

        token = token if token is not None else self.args.hub_token
        name = self.args.hub_model_id or Path(self.args.output_dir).absolute().name
        self.hub_model_id = resolve_repo_id(HfApi(endpoint=self.hub_endpoint, token=token), name, token)
        self.push_in_progress = None

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """Push at a save, as ``hub_strategy`` asks: ``every_save`` the checkpoint's adapter (and card) to the
        repo root; ``checkpoint`` also the checkpoint folder as ``last-checkpoint/`` (to resume from the Hub);
        ``all_checkpoints`` each as ``checkpoint-N/``; ``end`` nothing until ``push_to_hub``. One commit each;
        ``training_args.bin``, the tokenizer and the LoRA export never travel."""
        strategy = str(getattr(self.args.hub_strategy, "value", self.args.hub_strategy))
        if not self.is_world_process_zero() or strategy == "end":
            return
        if self.args.save_strategy in ("steps", getattr(type(self.args.save_strategy), "STEPS", "steps")):
            message = f"Training in progress, step {self.state.global_step}"
        else:
            message = f"Training in progress, epoch {int(self.state.epoch or 0)}"
        extra = None
        if strategy in ("checkpoint", "all_checkpoints"):
            extra = {"last-checkpoint" if strategy == "checkpoint" else Path(checkpoint_folder).name: checkpoint_folder}
        self._push_adapter_folder(checkpoint_folder, message, extra_folders=extra)

    def push_to_hub(self, commit_message: str | None = "End of training", blocking: bool = True,
                    token: str | None = None, revision: str | None = None, private: bool | None = None,
                    **kwargs) -> str | None:
        """Save, then upload the adapter repo (config, safetensors, model card) in one commit; returns the commit
        URL. Takes every keyword of ``Trainer.push_to_hub`` and trl's (``model_name``, ``language``, ``license``,
        ``tags``, ``finetuned_from``, ``tasks``, ``dataset_tags``, ``dataset``, ``dataset_args``,
        ``dataset_name``): they go into the card's metadata. With ``load_best_model_at_end`` the best adapter is
        the one saved and pushed."""
        self._refuse_in_evaluation_only("push_to_hub")
        if self.hub_model_id is None:
            self.init_hf_repo(token=token, private=private)
        self.save_model(self.args.output_dir, _internal_call=True)
        if not self.is_world_process_zero():
            return None
        self.create_model_card(**kwargs)
        return self._push_adapter_folder(self.args.output_dir, commit_message, token=token, revision=revision,
                                         private=private, card_data=kwargs)

    def _push_adapter_folder(self, folder: str, commit_message: str | None, token: str | None = None,
                             revision: str | None = None, private: bool | None = None,
                             card_data: dict | None = None, extra_folders: dict | None = None) -> str:
        from .push import push_adapter

        if self.hub_model_id is None:
            self.init_hf_repo(token=token, private=private)
        return push_adapter(
            folder, self.hub_model_id, token=token if token is not None else self.args.hub_token,
            private=private if private is not None else self.args.hub_private_repo,
            revision=revision or self.args.hub_revision, commit_message=commit_message,
            training_summary=self.training_summary(), model=self.model, endpoint=self.hub_endpoint,
            card_data={**self._card_data, **(card_data or {})}, extra_folders=extra_folders,
            base_model_name_or_path=self.base_model_name_or_path,
        )

    def create_model_card(self, model_name: str | None = None, **card_data) -> None:
        """Write the adapter's model card (our template: it loads the repo with ``UniLoraAutoModel``, not as a
        full model) to ``args.output_dir/README.md``. Takes the keywords of Trainer's and trl's versions
        (``language``, ``license``, ``tags``, ``finetuned_from``, ``tasks``, ``dataset_tags``, ``dataset``,
        ``dataset_args``, ``dataset_name``); they go into the card's metadata and are kept for later pushes."""
        if not self.is_world_process_zero():
            return
        import tempfile

        from .push import render_card

        self._card_data.update({k: v for k, v in card_data.items() if v is not None})
        model = unwrap(self.model)
        with tempfile.TemporaryDirectory() as tmp:
            get_adapter(model).save_adapter(tmp, base_model_name_or_path=self.base_model_name_or_path)
            files = read_adapter(tmp)
        base_params = sum(p.numel() for n, p in model.named_parameters()
                          if p is not get_adapter(model).theta_d and ".modules_to_save." not in n)
        repo_id = self.hub_model_id or self.args.hub_model_id or model_name or Path(self.args.output_dir).absolute().name
        card = render_card(files, repo_id, self.training_summary(), base_params, card_data=self._card_data,
                           model_name=model_name)
        os.makedirs(self.args.output_dir, exist_ok=True)
        with open(os.path.join(self.args.output_dir, "README.md"), "w", encoding="utf-8") as f:
            f.write(card)

    # -- evaluation of a model loaded by transformers from an output folder -----------------------
    def _refuse_in_evaluation_only(self, operation: str) -> None:
        if getattr(self, "evaluation_only", False):
            raise AdapterStateError(
                f"{operation}(): this model was loaded by transformers with a LoRA adapter (the LoRA export that "
                "unilora_hf writes beside a Uni-LoRA adapter in an output folder), which evaluates and predicts "
                "as the adapter does but does not train as one. To go on training, pass the base model "
                "(--model_name_or_path BASE) with resume_from_checkpoint=OUTPUT_DIR/checkpoint-N, or load "
                "UniLoraAutoModel.from_pretrained(OUTPUT_DIR) and pass unilora_config=None"
            )

    def train(self, *args, **kwargs):
        self._refuse_in_evaluation_only("train")
        return super().train(*args, **kwargs)

    def training_summary(self) -> dict[str, Any]:
        """Hyperparameters, final metrics and the loss history, for the model card."""
        args = self.args
        history = list(getattr(self.state, "log_history", []) or [])
        losses = [(h["step"], h["loss"]) for h in history if "loss" in h and "step" in h]
        evals = {k: v for h in history for k, v in h.items() if k.startswith("eval_")}
        hyper: dict[str, Any] = {
            "unilora_learning_rate": self.unilora_learning_rate if self.unilora_learning_rate is not None
            else args.learning_rate,
        }
        if get_adapter(self.model).trainable_state():
            hyper["learning_rate (heads)"] = args.learning_rate
        hyper.update({
            "per_device_train_batch_size": args.per_device_train_batch_size,
            "gradient_accumulation_steps": args.gradient_accumulation_steps,
        })
        if args.max_steps > 0:  # Trainer ignores num_train_epochs then
            hyper["max_steps"] = args.max_steps
        else:
            hyper["num_train_epochs"] = args.num_train_epochs
        hyper.update({
            "lr_scheduler_type": str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)),
            "warmup_steps": args.warmup_steps,
            "seed": args.seed,
            "bf16": args.bf16,
        })
        return {
            "hyperparameters": hyper,
            "metrics": evals,
            "loss_history": losses,
            "global_step": self.state.global_step,
        }


def loaded_lora_export(model) -> bool:
    """Whether transformers loaded ``model`` from a folder holding a PEFT LoRA adapter (``AutoModelFor....
    from_pretrained(output_dir)`` on a trainer's output folder loads the LoRA export written there)."""
    configs = getattr(model, "peft_config", None)
    return (not has_adapter(model) and bool(getattr(model, "_hf_peft_config_loaded", False))
            and isinstance(configs, dict) and bool(configs)
            and all(str(getattr(c.peft_type, "value", c.peft_type)) == "LORA" for c in configs.values()))


class TrainableParametersCallback(TrainerCallback):
    """Prints PEFT's line (``trainable params: … || all params: … || trainable%: …``) when training starts."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if state.is_world_process_zero and model is not None and has_adapter(model):
            from .peft_api import trainable_line

            print(f"Uni-LoRA: {trainable_line(unwrap(model))}")


class UniLoraTrainer(UniLoraTrainerMixin, Trainer):
    """``transformers.Trainer`` for Uni-LoRA: the same arguments plus

    Args:
        unilora_config: the adapter to attach to ``model`` (or to every ``model_init`` result); None when
            the model already carries one.
        unilora_learning_rate: θ_d's learning rate (paper: 5e-3 for GLUE, 2e-3 for LLMs); the heads use
            ``args.learning_rate``.
        unilora_weight_decay: θ_d's weight decay (default 0).
        save_processing_class: save the tokenizer with the adapter in the output folders (default True, as
            Trainer does); it is never pushed.
        hub_endpoint: the Hub URL for ``push_to_hub`` (default: huggingface_hub's, i.e. ``HF_ENDPOINT``).
        base_model_name_or_path: the base model's Hub id to record, when the base was loaded from a local
            folder (a local path is never published).
        export_lora_beside: write the adapter's LoRA export beside it in ``args.output_dir`` (native projection),
            so that ``AutoModelFor....from_pretrained(output_dir)`` loads the trained model (default True).

    A model that transformers loaded from such an output folder (base + the LoRA export) evaluates and
    predicts here as the adapter does; training it is refused with what to run instead.
    """

    def __init__(self, model=None, args=None, *pos, unilora_config: UniLoraConfig | None = None,
                 unilora_learning_rate: float | None = None, unilora_weight_decay: float = 0.0,
                 save_processing_class: bool = True, hub_endpoint: str | None = None,
                 base_model_name_or_path: str | None = None, export_lora_beside: bool = True, **kwargs):
        self._init_unilora(unilora_learning_rate, unilora_weight_decay, save_processing_class, hub_endpoint,
                           base_model_name_or_path, export_lora_beside)
        if kwargs.get("model_init") is not None:
            kwargs["model_init"] = self._wrap_model_init(kwargs["model_init"], unilora_config)
        if model is not None and loaded_lora_export(model):
            self.evaluation_only = True
        elif model is not None:
            if args is not None and unilora_config is not None and not has_adapter(model):
                set_seed(args.seed)  # as Trainer does before model_init: θ_d's initial draw follows args.seed
            attach(model, unilora_config)
            upcast_trainable(model, args)
        with quantized_base_accepted(model):
            super().__init__(model, args, *pos, **kwargs)
        self.add_callback(TrainableParametersCallback)
        if not self.evaluation_only:
            refuse_reentrant_under_ddp(self)
            broadcast_theta_from_rank0(self)
