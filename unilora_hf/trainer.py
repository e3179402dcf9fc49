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
from typing import Any, Callable

import torch
from transformers import Trainer, set_seed
from transformers.trainer_pt_utils import get_parameter_names

from .config import UniLoraConfig
from .distributed import gather_adapter_state, load_adapter_state
from .errors import AdapterFormatError, InvalidConfigError, LayoutMismatchError
from .model import UniLoraAdapter, get_adapter, has_adapter, inject_adapter, unwrap
from .serialization import AdapterState, read_adapter


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
                      hub_endpoint=None) -> None:
        self.hub_endpoint = hub_endpoint
        self.unilora_learning_rate = unilora_learning_rate
        self.unilora_weight_decay = unilora_weight_decay
        self.save_processing_class = save_processing_class

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
        if not getattr(self, "is_fsdp_enabled", False):
            return super().save_model(output_dir, _internal_call=_internal_call)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        state = gather_adapter_state(self.model)
        self._save(output_dir, adapter_state=state)
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None,
              adapter_state: AdapterState | None = None) -> None:
        """Write the adapter files (kilobytes) instead of the full model, on the process that saves."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        get_adapter(self.model).save_adapter(output_dir, state=adapter_state)
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
        load_adapter_weights(self.model, self.state.best_model_checkpoint)

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        if not self.is_world_process_zero() or self.args.hub_strategy == "end":
            return
        step = self.state.global_step
        self._push_adapter_folder(checkpoint_folder, f"Training in progress, step {step}")

    def push_to_hub(self, commit_message: str | None = "End of training", blocking: bool = True,
                    token: str | None = None, revision: str | None = None, private: bool | None = None,
                    **card_kwargs) -> str | None:
        """Upload the adapter repo (config, safetensors, model card) in one commit; returns the commit URL."""
        self.save_model(self.args.output_dir, _internal_call=True)
        if not self.is_world_process_zero():
            return None
        return self._push_adapter_folder(self.args.output_dir, commit_message, token=token, revision=revision,
                                         private=private, **card_kwargs)

    def _push_adapter_folder(self, folder: str, commit_message: str | None, token: str | None = None,
                             revision: str | None = None, private: bool | None = None, **card_kwargs) -> str:
        from .push import push_adapter

        repo_id = self.args.hub_model_id or os.path.basename(os.path.abspath(self.args.output_dir))
        return push_adapter(
            folder, repo_id, token=token if token is not None else self.args.hub_token,
            private=private if private is not None else self.args.hub_private_repo,
            revision=revision or self.args.hub_revision, commit_message=commit_message,
            training_summary=self.training_summary(), model=self.model, endpoint=self.hub_endpoint, **card_kwargs,
        )

    def create_model_card(self, model_name: str | None = None, license: str | None = None,
                          dataset: str | list[str] | None = None, dataset_name: str | None = None,
                          **ignored) -> None:
        """Write the adapter's model card (our template: it loads the repo with ``UniLoraAutoModel``, not as a
        full model) to ``args.output_dir/README.md``. Takes the keywords of Trainer's and trl's versions;
        ``license`` and ``dataset``/``dataset_name`` go into the card, the other ones have no place in it."""
        if not self.is_world_process_zero():
            return
        import tempfile

        from .push import render_card

        datasets = [dataset] if isinstance(dataset, str) else list(dataset or [])
        datasets += [dataset_name] if dataset_name else []
        model = unwrap(self.model)
        with tempfile.TemporaryDirectory() as tmp:
            get_adapter(model).save_adapter(tmp)
            files = read_adapter(tmp)
        base_params = sum(p.numel() for n, p in model.named_parameters()
                          if p is not get_adapter(model).theta_d and ".modules_to_save." not in n)
        repo_id = self.args.hub_model_id or model_name or os.path.basename(os.path.abspath(self.args.output_dir))
        card = render_card(files, repo_id, self.training_summary(), base_params, license, datasets or None)
        os.makedirs(self.args.output_dir, exist_ok=True)
        with open(os.path.join(self.args.output_dir, "README.md"), "w", encoding="utf-8") as f:
            f.write(card)

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


class UniLoraTrainer(UniLoraTrainerMixin, Trainer):
    """``transformers.Trainer`` for Uni-LoRA: the same arguments plus

    Args:
        unilora_config: the adapter to attach to ``model`` (or to every ``model_init`` result); None when
            the model already carries one.
        unilora_learning_rate: θ_d's learning rate (paper: 5e-3 for GLUE, 2e-3 for LLMs); the heads use
            ``args.learning_rate``.
        unilora_weight_decay: θ_d's weight decay (default 0).
        save_processing_class: also save the tokenizer and ``training_args.bin`` with the adapter.
        hub_endpoint: the Hub URL for ``push_to_hub`` (default: huggingface_hub's, i.e. ``HF_ENDPOINT``).
    """

    def __init__(self, model=None, args=None, *pos, unilora_config: UniLoraConfig | None = None,
                 unilora_learning_rate: float | None = None, unilora_weight_decay: float = 0.0,
                 save_processing_class: bool = False, hub_endpoint: str | None = None, **kwargs):
        self._init_unilora(unilora_learning_rate, unilora_weight_decay, save_processing_class, hub_endpoint)
        if kwargs.get("model_init") is not None:
            kwargs["model_init"] = self._wrap_model_init(kwargs["model_init"], unilora_config)
        if model is not None:
            if args is not None and unilora_config is not None and not has_adapter(model):
                set_seed(args.seed)  # as Trainer does before model_init: θ_d's initial draw follows args.seed
            attach(model, unilora_config)
            upcast_trainable(model, args)
        with quantized_base_accepted(model):
            super().__init__(model, args, *pos, **kwargs)
        refuse_reentrant_under_ddp(self)
        broadcast_theta_from_rank0(self)
