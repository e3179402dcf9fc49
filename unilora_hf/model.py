"""Attaching a Uni-LoRA adapter to a model instance, and the handle that merges, unloads and saves it.

``inject_adapter(model, config)`` works in place: each target module is replaced on its parent by a
`UniLoraLinear` holding it as ``base_layer``; heads named in ``modules_to_save`` become trainable copies;
θ_d becomes ONE ``nn.Parameter`` registered on the root as ``unilora_theta_d``; everything else is
frozen. The model keeps its class (a ``PreTrainedModel`` stays one). The returned `UniLoraAdapter` is
also reachable as ``model.unilora_adapter`` and through `get_adapter`.

Everything that can be refused is decided first, by `plan_injection`, which reads the model and changes
nothing; the changes then run as one transaction that is undone if anything fails half way. Unloading
gives the base back exactly: its modules, its biases (trained biases are kept apart from the base's
values), its ``requires_grad`` flags, and weights shared with another module (tied embeddings) are
never written by a merge.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.nn as nn

from . import swiglu
from .config import SHARED_BY_RESIDENT_ADAPTERS, UniLoraConfig
from .errors import AdapterIntegrityError, AdapterStateError, InvalidArgumentError, InvalidConfigError
from .layer import ModulesToSave, UniLoraLinear, layer_constants, logical_name
from .layout import (LayerSpec, build_layout, check_sizes, compact, effective_heads, fingerprint, lora_views,
                     resolve_targets)
from .projection import PEFT, Projection
from .siblings import find_groups, link

THETA_NAME = "unilora_theta_d"
DEFAULT_NAME = "default"
BASE_NAME = "__base__"


def unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside DDP / torch.compile / accelerate wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def get_adapter(model: nn.Module) -> "UniLoraAdapter":
    """The adapter attached to ``model``; raises AdapterStateError when it has none."""
    adapter = unwrap(model).__dict__.get("unilora_adapter")
    if adapter is None:
        raise AdapterStateError(
            f"{type(unwrap(model)).__name__} has no Uni-LoRA adapter: attach one with "
            "unilora_hf.inject_adapter(model, UniLoraConfig(...)) or load one with UniLoraAutoModel.from_pretrained"
        )
    return adapter


def has_adapter(model: nn.Module) -> bool:
    return "unilora_adapter" in unwrap(model).__dict__


def _has_peft_adapter(model: nn.Module) -> bool:
    return any(type(m).__module__.startswith("peft.") for m in model.modules())


def is_dtensor(t: torch.Tensor) -> bool:
    """Whether ``t`` is a DTensor (an FSDP2-sharded parameter)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed support
        return False
    return isinstance(t, DTensor)


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def refuse_adapted(model: nn.Module) -> None:
    """AdapterStateError when ``model`` already carries a Uni-LoRA or PEFT adapter."""
    if has_adapter(model) or hasattr(model, THETA_NAME):
        raise AdapterStateError(
            "this model already has a Uni-LoRA adapter; injecting or loading another would stack two θ_d. Use the "
            "existing one (unilora_hf.get_adapter(model)), call .unload() first, or start from a fresh base model."
        )
    if _has_peft_adapter(model):
        raise AdapterStateError(
            "this model already carries a PEFT adapter; Uni-LoRA goes on a plain base model. "
            "Call model.unload() / merge_and_unload() on the PEFT model first, or start from the base model."
        )


@dataclass
class InjectionPlan:
    """What `inject_adapter` will do to a model, decided without changing it.

    ``state``: every tensor the adapter trains besides θ_d, by its logical name (the base model's own
    parameter or buffer name), mapped to the live tensor it starts from: the heads' parameters and
    persistent buffers, and the trained biases."""

    config: UniLoraConfig
    targets: list[tuple[str, nn.Module]]
    layers: list[LayerSpec]
    D: int
    heads: list[str]
    biases: list[str]
    state: dict[str, torch.Tensor] = field(default_factory=dict)


def plan_injection(model: nn.Module, config: UniLoraConfig) -> InjectionPlan:
    """Resolve ``config`` against ``model`` and check every size, reading the model only. Raises
    InvalidConfigError (targets, sizes, modules_to_save) or AdapterStateError (an adapter is attached)."""
    if not isinstance(config, UniLoraConfig):
        raise InvalidArgumentError(f"config must be a UniLoraConfig, got {type(config).__name__}")
    model = unwrap(model)
    refuse_adapted(model)
    targets = resolve_targets(model, config)
    layers = build_layout(targets, config.r)
    D = check_sizes(layers, config)
    heads = effective_heads(model, config, [name for name, _ in targets])
    inside_head = tuple(h + "." for h in heads)
    state: dict[str, torch.Tensor] = {}
    for head in heads:
        for key, tensor in model.get_submodule(head).state_dict(keep_vars=True).items():
            state[f"{head}.{key}"] = tensor
    biases: list[str] = []
    if config.bias == "all":
        biases = [n for n, _ in model.named_parameters() if (n == "bias" or n.endswith(".bias"))
                  and not n.startswith(inside_head) and n not in heads]
    elif config.bias == "unilora_only":
        biases = [f"{name}.bias" for name, module in targets if getattr(module, "bias", None) is not None]
    params = dict(model.named_parameters())
    for name in biases:
        state[name] = params[name]
    return InjectionPlan(config, targets, layers, D, heads, biases, state)


class MixedBatch:
    """The state of one mixed batch: which adapter each row runs, and the stacked readout of those present."""

    def __init__(self, adapter: "UniLoraAdapter", present: list[str], thetas: torch.Tensor, slots: torch.Tensor,
                 heads: dict[str, dict[str, torch.Tensor]]):
        self.adapter = adapter
        self.present = present
        self.thetas = thetas
        self.slots = slots
        self.heads = heads
        self._stacked: dict[tuple, torch.Tensor] = {}
        self._pairs: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._token_slots: dict[tuple, torch.Tensor] = {}

    @property
    def batch(self) -> int:
        return self.slots.numel()

    def stacked(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """θ_D of every adapter present, P×D in ``dtype`` on ``device`` (read out once per batch block)."""
        key = (device, dtype)
        out = self._stacked.get(key)
        if out is None:
            from .kernels import readout

            out = torch.empty((len(self.present), self.adapter.D), device=device, dtype=dtype)
            with torch.no_grad():
                for p in range(len(self.present)):
                    out[p].copy_(readout(self.thetas[p], self.adapter.projection))
            self._stacked[key] = out
        return out

    def layer_pair(self, spec: LayerSpec, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) of the layer for every adapter present: P×r×in and P×out×r views of `stacked` (made once per
        layer, device and dtype in the batch block: this runs at every layer call of every decoding step)."""
        key = (spec.offset, device, dtype)
        pair = self._pairs.get(key)
        if pair is None:
            flat = self.stacked(device, dtype)
            a, b = spec.split_sizes
            P = flat.shape[0]
            A = flat[:, spec.offset : spec.offset + a].view(P, spec.r, spec.in_features)
            B = flat[:, spec.offset + a : spec.offset + a + b].view(P, spec.out_features, spec.r)
            pair = self._pairs[key] = (A, B)
        return pair

    def token_slots(self, x: torch.Tensor) -> torch.Tensor:
        """The adapter slot of each row of ``x`` flattened to (batch·tokens, features): rows are batch-major."""
        if x.dim() < 2 or x.shape[0] != self.batch:
            raise AdapterStateError(
                f"a mixed batch of {self.batch} rows met a layer input of shape {tuple(x.shape)}: adapter_names needs "
                "one name per row of the batch the model is called with"
            )
        tokens = x.numel() // (x.shape[0] * x.shape[-1])
        key = (x.device, tokens)
        out = self._token_slots.get(key)
        if out is None:
            out = self._token_slots[key] = self.slots.to(x.device).repeat_interleave(tokens)
        return out


class UniLoraAdapter:
    """The adapter on one model: its config, layout, projection and the operations on it."""

    def __init__(self, model: nn.Module, config: UniLoraConfig, layers: list[LayerSpec], projection: Projection,
                 heads: list[str] | None = None):
        self.model = model
        self.config = config
        self.layers = layers
        self._projection = projection
        self.head_names = list(heads or [])
        self.enabled = True
        self.detached = False
        self.base_model_revision = None
        # How θ_D splits into the layers' (A, B): sizes, then each layer's (r, in, out). One tuple of constants, so
        # that a compiled readout guards on it once, not on every size and every spec's fields.
        self._split_plan = (tuple(n for spec in layers for n in spec.split_sizes),
                            tuple((s.r, s.in_features, s.out_features) for s in layers))
        self._bias_originals: dict[str, torch.Tensor] = {}
        self._layer_modules: list | None = None
        self._requires_grad_before: list[tuple[nn.Parameter, bool]] = []
        self._tie_configs: list[tuple[object, str]] = []
        self._first_layer: UniLoraLinear | None = None
        self._groups: list = []  # siblings.SiblingGroup of the wrapped layers
        self._mlps: list[nn.Module] = []  # SwiGLU blocks whose forward runs fused (swiglu.install)
        self._hooks: list = []
        self._forward_depth = 0
        self._training_pass = False
        self._readout_pending = False  # a compiled training pass: the forward's frame reads out (`forward_pass`)
        self._checkpointed: list[nn.Module] = []  # modules with transformers' ``gradient_checkpointing`` switch
        self._theta_D: torch.Tensor | None = None
        self._views: dict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self._refreshed: dict[tuple, bool] = {}  # the kept θ_D refreshed in this (compiled) pass, per key
        self._static: dict[tuple, "ReadoutCache"] = {}  # inference θ_D per (device, dtype)
        # Several adapters of one projection (`add`, `set_adapter`, `mixed_batch`): the active one lives in the
        # model (θ_d parameter, heads, biases); the others are kept here, θ_d (d values) and their tensors each.
        self.active_adapter = DEFAULT_NAME
        self._names: list[str] = [DEFAULT_NAME]
        self._bank: dict[str, tuple[torch.Tensor, dict[str, torch.Tensor]]] = {}  # name -> (θ_d, tensors)
        self._mixed: MixedBatch | None = None

    # -- θ_D for one forward pass ------------------------------------------------------------------
    # The root's forward pre-hook opens a pass; the first adapted layer to run reads θ_D = P θ_d out
    # once (one kernel on CUDA), in the activation dtype, split into every layer's (A, B) views; the
    # post-hook closes the pass. With autograd recording a differentiable θ_d, θ_D is a fresh tensor of
    # the pass (the θ_D gradient flows back through one split and one Pᵀ g), and nothing of size D is
    # kept after it. Otherwise (inference) θ_D lives in a ReadoutCache per (device, dtype), refreshed at
    # every pass: read out again only when θ_d's bits differ from a snapshot (compared on the device), so
    # any change of θ_d, in place or through .data, is seen by the next pass, and a captured CUDA graph
    # replays the comparison (kernels.readout_cache). Layers called outside a root pass, or re-run by
    # activation checkpointing inside backward, read their own slice instead.
    #
    # Compiled, each root hook is a frame of its own (Dynamo traces the model's forward apart from them). A readout
    # in the pre-hook's frame would leave its graph as θ_D and one output per layer view, which AOT autograd and
    # CUDA graph trees rebuild at every step (host time the GPU waits for when each step is synchronised). So in a
    # compiled training pass the pre-hook only marks the readout pending, and `forward_pass`, which the root's
    # ``forward`` runs (``peft_api``), reads out inside the forward's graph and drops the views before that frame
    # ends. A layer reached otherwise reads out when it first asks (`lora_pair`). Under transformers' activation
    # checkpointing the pre-hook still reads out: there the model's forward breaks the graph before its first layer
    # (a logged warning on ``use_cache``), so the readout would be a graph of its own either way.
    def _open_pass(self, module, args):
        if self._forward_depth == 0:
            self._training_pass = torch.is_grad_enabled() and self.theta_d.requires_grad
            self._theta_D = None
            self._views = {}
            self._refreshed = {}
            self._readout_pending = False
            if self._training_pass:
                self._static = {}
        self._forward_depth += 1
        if self._forward_depth == 1 and self.enabled:
            if self._training_pass and torch.compiler.is_compiling() and not self._checkpointing():
                self._readout_pending = True
                return
            self._read_out_for_pass()

    def forward_pass(self, method, args, kwargs):
        """``method(*args, **kwargs)``, the root's forward inside a compiled frame. With a readout pending
        (`_open_pass`) θ_D is read out here first, outside any activation-checkpointed block, into a dict made in
        this frame, and the views are dropped before the frame ends, so that no tensor of the pass leaves the
        forward's graph through this object. Otherwise (inference, activation checkpointing) the plain call."""
        if not self._readout_pending:
            return method(*args, **kwargs)
        self._readout_pending = False
        self._views = {}  # a dict from before this frame, filled here, would be a graph output
        self._read_out_for_pass()
        output = method(*args, **kwargs)
        self._theta_D = None
        self._views = {}
        return output

    def _checkpointing(self) -> bool:
        return any(m.gradient_checkpointing is True for m in self._checkpointed)

    def _read_out_for_pass(self) -> None:
        """At the start of a root pass: read θ_D out now (training), or make the kept θ_D (inference, eager)."""
        layer = self._first_adapted_layer()
        if layer is None or layer.merged:
            return
        weight = layer.base_layer.weight
        device = weight.device
        if torch.is_autocast_enabled(device.type):  # the dtype the layers will ask for
            dtype = torch.get_autocast_dtype(device.type)
        elif weight.is_floating_point():
            dtype = weight.dtype
        else:  # a quantized base reads out lazily, in its compute dtype
            return
        if self._training_pass:  # read out now, outside any activation-checkpointed block
            self.lora_pair(layer_constants(layer), device, dtype)
        elif not torch.compiler.is_compiling():
            # made here, so that a compiled forward whose root hooks run outside it finds the kept θ_D
            self._kept_theta_D(device, dtype)

    def _close_pass(self, module, args, output):
        self._forward_depth = max(0, self._forward_depth - 1)
        if self._forward_depth == 0:
            self._theta_D = None
            self._views = {}
            self._refreshed = {}
            for group in self._groups:
                group.clear()

    def _drop_pass_cache(self) -> None:
        """Forget every readout (and free the inference buffers)."""
        self._theta_D = None
        self._views = {}
        self._refreshed = {}
        self._static = {}
        for group in self._groups:
            group.clear()

    def _find_layers(self) -> None:
        """Found once after injection, not lazily in the first pass: a compiled pass guards on these."""
        self._layer_modules = [m for _, m in self.wrapped_layers()]
        self._first_layer = self._layer_modules[0] if self._layer_modules else None
        # transformers' models set the switch in __init__ (their layers inherit it from a class): the model whose
        # forward reads it before its first layer. One module to guard on, not one per decoder layer.
        self._checkpointed = [m for m in self.model.modules() if "gradient_checkpointing" in m.__dict__]
        self._group_siblings(True)
        self._fuse_swiglu(True)

    def _group_siblings(self, enabled: bool, eager: bool = False) -> None:
        """Whether layers that read the same input (q/k/v, gate/up) share one launch while decoding under
        ``torch.compile`` (``eager``: outside it too; ``siblings``); on by default, off for an A/B measurement. Takes
        effect at the next trace when compiled."""
        self._groups = find_groups(self.model, UniLoraLinear, eager) if enabled else []
        link(self._groups, self._layer_modules)

    def _fuse_swiglu(self, enabled: bool) -> None:
        """Whether SwiGLU MLP blocks whose three projections are adapted run as one op under ``torch.compile``
        (``swiglu``); on by default, off for an A/B measurement. Takes effect at the next trace when compiled."""
        swiglu.uninstall(self._mlps)
        self._mlps = swiglu.find_mlps(self.model, UniLoraLinear) if enabled else []
        swiglu.install(self._mlps)

    def _install_hooks(self) -> None:
        if self._hooks:
            return
        self._hooks = [
            self.model.register_forward_pre_hook(self._open_pass),
            self.model.register_forward_hook(self._close_pass, always_call=True),
        ]

    def _remove_hooks(self) -> None:
        """Take the root's pass hooks off (a merged adapter reads nothing per pass: under ``torch.compile`` the hooks
        would still cost a frame of their own and its guards at every decoded token)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        self._forward_depth = 0
        self._drop_pass_cache()

    def _any_merged(self) -> bool:
        if self._layer_modules is None:  # the wrapped layers are fixed from injection to unload
            self._layer_modules = [m for _, m in self.wrapped_layers()]
        return any(m.merged for m in self._layer_modules)

    def _first_adapted_layer(self) -> UniLoraLinear | None:
        if self._first_layer is None:
            self._first_layer = next((m for _, m in self.wrapped_layers()), None)
        return self._first_layer

    def _split(self, flat: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        sizes, shapes = self._split_plan
        parts = torch.split(flat, sizes)
        return [(parts[2 * i].view(r, n_in), parts[2 * i + 1].view(n_out, r))
                for i, (r, n_in, n_out) in enumerate(shapes)]

    def lora_pair(
        self, constants: tuple, device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(A, B) of the layer with ``constants`` (`layer.layer_constants`) for the current root pass, in ``dtype``
        on ``device`` (read out in float32, rounded once), or None outside a root pass or inside backward."""
        if self._forward_depth == 0:
            return None
        # inside backward (activation checkpointing re-running a layer): the layer reads its own slice; a
        # compiled graph needs no such check (AOT autograd replays the forward's readout)
        if not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1:
            return None
        key = (device, dtype)
        theta = self.theta_d
        differentiable = torch.is_grad_enabled() and theta.requires_grad
        cache = None if differentiable else self._static.get(key)
        # Training, or compiled inference before any kept θ_D exists: θ_D read out for this pass (in the graph
        # when compiled, as a custom op). Otherwise the θ_D kept per (device, dtype), refreshed once per pass
        # (read out again only if θ_d's bits changed); a ReadoutCache is made outside compilation only.
        if differentiable or (cache is None and torch.compiler.is_compiling()):
            views = self._views.get(key)
            if views is None:
                if self._theta_D is None:
                    from .kernels import project_theta

                    self._theta_D = project_theta(theta if differentiable else theta.detach(), self.projection)
                views = self._views[key] = self._split(self._theta_D.to(device=device, dtype=dtype))
            return views[constants[0]]
        if torch.compiler.is_compiling():
            # One refresh op per pass; each layer views its slice of the static buffer. Nothing but a flag is
            # kept in Python state: tensors stored there would leave the graph as outputs, which AOT autograd
            # rebuilds (view by view) on every call when they alias an input.
            if key not in self._refreshed:
                cache.refresh(theta)
                self._refreshed[key] = True
            _, offset, r, n_in, n_out, _ = constants
            return lora_views(cache.theta_D[offset : offset + r * (n_in + n_out)], r, n_in, n_out)
        views = self._views.get(key)
        if views is None:
            cache = self._kept_theta_D(device, dtype)
            cache.refresh(theta)
            if cache.views is None:  # split once: the buffer is refreshed in place
                with torch.inference_mode(False):
                    cache.views = self._split(cache.theta_D)
            views = self._views[key] = cache.views
        return views[constants[0]]

    def _kept_theta_D(self, device: torch.device, dtype: torch.dtype) -> "ReadoutCache":
        """The inference θ_D kept for (device, dtype), made (not yet read out) when missing; never while compiling."""
        cache = self._static.get((device, dtype))
        if cache is None:
            from .kernels.readout_cache import ReadoutCache

            cache = self._static[device, dtype] = ReadoutCache(self.projection, self.theta_d, device, dtype)
        return cache

    def _theta_D_now(self) -> torch.Tensor:
        """θ_D in float32, not differentiable (for merging)."""
        from .kernels import readout

        return readout(self.theta_d.detach(), self.projection)

    def _layer_pair(self, theta_D: torch.Tensor, layer: UniLoraLinear, device) -> tuple[torch.Tensor, torch.Tensor]:
        s = layer.spec
        return s.lora_views(theta_D[s.offset : s.offset + s.size].to(device))

    # -- what it holds -------------------------------------------------------------------------
    @property
    def theta_d(self) -> nn.Parameter:
        return getattr(self.model, THETA_NAME)

    @property
    def projection(self) -> Projection:
        """The projection as the layers apply it: for the ``peft`` kind on a bf16/fp16 base, with PEFT's
        scales rounded to that dtype (`Projection.with_scale_dtype`)."""
        if self._projection.kind != PEFT:
            return self._projection
        layer = self._first_adapted_layer()
        weight = None if layer is None else layer.base_layer.weight
        return self._projection.with_scale_dtype(None if weight is None else weight.dtype)

    @property
    def D(self) -> int:
        return self._projection.D

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.layers)

    @property
    def compact_layout(self) -> list[dict]:
        return compact(self.layers)

    def wrapped_layers(self) -> Iterator[tuple[str, UniLoraLinear]]:
        for name, module in self.model.named_modules():
            if isinstance(module, UniLoraLinear):
                yield name, module

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Everything the adapter trains besides θ_d, under the base model's own parameter names
        (heads in ``modules_to_save``, biases per ``config.bias``)."""
        out = {}
        for name, param in self.model.named_parameters():
            if param.requires_grad and name != THETA_NAME:
                out[logical_name(name)] = param
        return out

    def saved_state(self) -> dict[str, torch.Tensor]:
        """What an adapter file holds besides θ_d: `trainable_state` plus the heads' persistent buffers."""
        out = self.trainable_state()
        for head in self.head_names:
            module = self.model.get_submodule(head)
            copy = module.modules_to_save if isinstance(module, ModulesToSave) else module
            for key, buf in copy.state_dict(keep_vars=True).items():
                out.setdefault(f"{head}.{key}", buf)
        return out

    def live_state(self):
        """θ_d and `saved_state` as an `AdapterState` (the whole tensors: refuses FSDP-sharded ones)."""
        from .serialization import AdapterState

        theta = self.theta_d
        if is_dtensor(theta) or theta.numel() != self.config.theta_d_length:
            raise AdapterStateError(
                f"θ_d is sharded by FSDP (this rank holds {theta.numel() if not is_dtensor(theta) else 'a DTensor'} "
                f"of its {self.config.theta_d_length} values). Call state = unilora_hf.gather_adapter_state(model) on "
                "every rank, then save_adapter(..., state=state) on rank 0 (UniLoraTrainer.save_model does this)."
            )
        return AdapterState(theta, self.saved_state())

    def num_trainable(self) -> int:
        return self.config.theta_d_length + sum(p.numel() for p in self.trainable_state().values())

    # -- switching the adapter on and off ------------------------------------------------------------
    def _swap_biases(self) -> None:
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, original in self._bias_originals.items():
                live = params[_live_name(self.model, name)]
                kept = live.detach().clone()
                live.copy_(original)
                original.copy_(kept)

    @contextlib.contextmanager
    def disabled(self):
        """Run the base model alone inside this context: no LoRA product, the original heads, the base's own
        biases (an unmerged adapter only)."""
        self._require_attached("disabled")
        if self._any_merged():
            raise AdapterStateError("the adapter is merged into the weights; unmerge() before disabling it")
        if not self.enabled:
            yield
            return
        self.enabled = False
        self._swap_biases()
        try:
            yield
        finally:
            self._swap_biases()
            self.enabled = True

    def _shared_weights(self) -> dict[int, list[str]]:
        users: dict[int, list[str]] = {}
        for name, param in self.model.named_parameters(remove_duplicate=False):
            users.setdefault(id(param), []).append(name)
        return users

    def merge(self, safe_merge: bool = True) -> None:
        """Add ΔW = B A into every adapted base weight (computed in float32, rounded once to the weight's
        dtype). Refuses a θ_d with NaN/inf before touching any weight. A weight that another module shares
        (an output head tied to the input embeddings) is not written: the layer gets its own merged copy,
        and `unmerge` gives the shared one back."""
        self._require_attached("merge")
        if not torch.isfinite(self.theta_d.detach()).all():
            bad = (~torch.isfinite(self.theta_d.detach())).sum().item()
            raise AdapterIntegrityError(
                f"θ_d holds {bad} NaN/inf value(s): merging would break the weights. Nothing was changed; "
                "load a healthy adapter (or checkpoint) and merge again."
            )
        from .kernels import merge_delta_

        for name, layer in self.wrapped_layers():
            if not layer.base_layer.weight.is_floating_point():
                raise AdapterStateError(
                    f"{name!r} has a quantized weight ({type(layer.base_layer).__name__}); ΔW cannot be merged into "
                    "it. Run the adapter unmerged, or load the base in bf16/fp16 to merge."
                )
        theta_D = self._theta_D_now()
        shared = self._shared_weights()
        merged_now: list[UniLoraLinear] = []
        with torch.no_grad():
            for name, layer in self.wrapped_layers():
                if layer.merged:
                    continue
                weight = layer.base_layer.weight
                A, B = self._layer_pair(theta_D, layer, weight.device)
                fifo = layer.spec.fan_in_fan_out
                tied = len(shared.get(id(weight), ())) > 1
                if safe_merge or tied:
                    merged = merge_delta_(weight, A, B, fan_in_fan_out=fifo, out=torch.empty_like(weight))
                    if not torch.isfinite(merged).all():
                        for done in merged_now:
                            self._unmerge_layer(theta_D, done)
                        raise AdapterIntegrityError(f"merging into {name!r} gives NaN/inf weights; nothing was changed")
                    if tied:
                        layer.__dict__["_shared_weight"] = weight
                        layer.base_layer.weight = nn.Parameter(merged, requires_grad=weight.requires_grad)
                    else:
                        weight.data.copy_(merged)
                else:
                    merge_delta_(weight.data, A, B, fan_in_fan_out=fifo)
                layer.merged = True
                merged_now.append(layer)
        self._remove_hooks()  # every layer is merged now

    def _unmerge_layer(self, theta_D: torch.Tensor, layer: UniLoraLinear) -> None:
        from .kernels import merge_delta_

        shared = layer.__dict__.pop("_shared_weight", None)
        if shared is not None:
            layer.base_layer.weight = shared
        else:
            weight = layer.base_layer.weight
            A, B = self._layer_pair(theta_D, layer, weight.device)
            merge_delta_(weight.data, A, B, sign=-1.0, fan_in_fan_out=layer.spec.fan_in_fan_out)
        layer.merged = False

    def unmerge(self) -> None:
        """Subtract ΔW again (exact up to the rounding of the weight's dtype; a shared weight comes back
        exactly, as it was never written)."""
        self._require_attached("unmerge")
        if not self._any_merged():
            return
        theta_D = self._theta_D_now()
        for _, layer in self.wrapped_layers():
            if layer.merged:
                self._unmerge_layer(theta_D, layer)
        self._install_hooks()

    def unload(self, merge: bool = False) -> nn.Module:
        """Remove the adapter and return the model. Without ``merge``: the original modules, biases and
        ``requires_grad`` flags come back exactly. With ``merge``: ΔW stays in the weights, the trained heads
        and biases stay in place (a weight that was tied to another module stays untied, and the config no
        longer asks to tie them)."""
        self._require_attached("unload")
        if not self.enabled:
            raise AdapterStateError("unload() inside the disabled() block: leave the block first")
        if merge:
            self.merge()
        else:
            self.unmerge()
        model = self.model
        untied = []
        for name, module in list(model.named_modules()):
            if isinstance(module, UniLoraLinear):
                if module.__dict__.pop("_shared_weight", None) is not None:
                    untied.append(name)
                _set_submodule(model, name, module.base_layer)
            elif isinstance(module, ModulesToSave):
                kept = module.modules_to_save if merge else module.original_module
                _set_submodule(model, name, kept)
        if not merge:
            params = dict(model.named_parameters())
            with torch.no_grad():
                for bias_name, original in self._bias_originals.items():
                    params[bias_name].copy_(original)
        self._detach(restore_flags=True)
        if untied:
            _untie_config(model)
        return model

    def _detach(self, restore_flags: bool) -> None:
        from . import peft_api

        self._remove_hooks()
        self._fuse_swiglu(False)
        if THETA_NAME in self.model._parameters:
            delattr(self.model, THETA_NAME)
        self.model.__dict__.pop("unilora_adapter", None)
        peft_api.uninstall(self.model)
        self.detached = True
        if restore_flags:
            for param, flag in self._requires_grad_before:
                param.requires_grad_(flag)

    def _require_attached(self, operation: str) -> None:
        if self.detached:
            raise AdapterStateError(
                f"{operation}() on an adapter that was unloaded: the model no longer carries it. Load it again "
                "(unilora_hf.load_adapter(model, folder)) or keep the adapter attached until you are done"
            )

    def merge_and_unload(self) -> nn.Module:
        return self.unload(merge=True)

    # -- several adapters on one base -------------------------------------------------------------
    @property
    def adapter_names(self) -> list[str]:
        """The resident adapters, in the order they were added (the first is ``"default"`` unless named)."""
        return list(self._names)

    def check_compatible(self, name: str, config: UniLoraConfig, D: int | None, fingerprint: str | None,
                         tensors: dict[str, torch.Tensor]) -> None:
        """InvalidConfigError / LayoutMismatchError unless an adapter with ``config`` shares this adapter's projection,
        layout and trained tensors (so it differs only in θ_d and their values)."""
        from .errors import LayoutMismatchError

        if not isinstance(name, str) or not name or name == BASE_NAME or len(name) > 200:
            raise InvalidArgumentError(f"adapter_name {name!r} is not a usable name (non-empty, not {BASE_NAME!r})")
        if name in self._names:
            raise AdapterStateError(f"an adapter named {name!r} is already loaded; delete_adapter({name!r}) first or "
                                    "pick another name")
        mine, theirs = self.config.to_dict(), config.to_dict()
        differs = [k for k in SHARED_BY_RESIDENT_ADAPTERS if mine[k] != theirs[k]]
        if differs:
            shown = ", ".join(f"{k} {theirs[k]!r} (resident: {mine[k]!r})" for k in differs)
            raise LayoutMismatchError(
                f"adapter {name!r} does not share the resident adapters' projection and layout: {shown}. Adapters on "
                "one base must differ only in θ_d and their heads; load this one onto its own copy of the base model"
            )
        if (D is not None and D != self.D) or (fingerprint is not None and fingerprint != self.fingerprint):
            raise LayoutMismatchError(
                f"adapter {name!r} was trained on another layout (D = {D}, fingerprint {fingerprint}; resident: "
                f"D = {self.D}, {self.fingerprint}); load it onto the base model it was trained for"
            )
        live = self.saved_state()
        if set(live) != set(tensors) or any(tuple(live[k].shape) != tuple(t.shape) for k, t in tensors.items()):
            raise LayoutMismatchError(
                f"adapter {name!r} trains other tensors than the resident adapters ({sorted(tensors)} vs {sorted(live)}"
                "); load it onto its own copy of the base model"
            )

    def rename_default(self, name: str) -> None:
        """Name the first (only) adapter ``name`` instead of ``"default"``."""
        if len(self._names) != 1 or not isinstance(name, str) or not name or name == BASE_NAME:
            raise InvalidArgumentError(f"cannot name the adapter {name!r}")
        self._names = [name]
        self.active_adapter = name

    def add(self, name: str, theta_d: torch.Tensor, tensors: dict[str, torch.Tensor] | None = None) -> None:
        """Keep another adapter of this projection and layout under ``name`` (not active): its θ_d (d values) and
        trained tensors are copied to the live ones' devices and dtypes; nothing of size D is built."""
        self._require_attached("add")
        tensors = dict(tensors or {})
        self.check_compatible(name, self.config, None, None, tensors)
        if tuple(theta_d.shape) != (self.config.theta_d_length,):
            raise InvalidArgumentError(f"θ_d of {name!r} has shape {tuple(theta_d.shape)}, expected "
                                       f"({self.config.theta_d_length},)")
        live_theta, live = self.theta_d, self.saved_state()
        state = (theta_d.detach().to(device=live_theta.device, dtype=torch.float32).clone(),
                 {k: t.detach().to(device=live[k].device, dtype=live[k].dtype).clone() for k, t in tensors.items()})
        self._bank[name] = state
        self._names.append(name)

    def _banked(self, name: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The kept (θ_d, tensors) of ``name`` on the live tensors' devices: ``model.to(...)`` moves the live
        parameters only, so a kept adapter follows on its first use after a move."""
        theta, tensors = self._bank[name]
        live_theta = self.theta_d
        live = self.saved_state() if tensors else {}
        if theta.device != live_theta.device or any((t.device, t.dtype) != (live[k].device, live[k].dtype)
                                                    for k, t in tensors.items()):
            theta = theta.to(live_theta.device)
            tensors = {k: t.to(device=live[k].device, dtype=live[k].dtype) for k, t in tensors.items()}
            self._bank[name] = (theta, tensors)
        return theta, tensors

    def set_adapter(self, name: str) -> None:
        """Make ``name`` the adapter the model runs (and trains). Costs one copy of θ_d (d values) and of the
        heads; the next forward reads the new θ_D out, nothing of size D is built here."""
        self._require_attached("set_adapter")
        if name == self.active_adapter:
            return
        if name not in self._bank:
            raise AdapterStateError(f"no adapter named {name!r} is loaded; loaded: {self._names}")
        if self._any_merged():
            raise AdapterStateError("the active adapter is merged into the weights: unmerge() before switching")
        if not self.enabled or self._mixed is not None:
            raise AdapterStateError("set_adapter() inside disabled() or a mixed batch: leave that block first")
        theta, tensors = self._banked(name)
        # adapters are θ_d plus heads and biases: without those there is nothing else to keep per adapter
        keeps_more = bool(tensors or self.head_names or self._bias_originals or self.config.bias != "none")
        live_theta, live = self.theta_d, (self.saved_state() if keeps_more else {})
        with torch.no_grad():
            self._bank[self.active_adapter] = (live_theta.detach().clone(),
                                               {k: t.detach().clone() for k, t in live.items()})
            del self._bank[name]
            live_theta.copy_(theta)
            for key, tensor in tensors.items():
                live[key].copy_(tensor)
        self.active_adapter = name

    def delete_adapter(self, name: str) -> None:
        """Forget the adapter ``name``; deleting the active one makes the first remaining one active."""
        self._require_attached("delete_adapter")
        if name not in self._names:
            raise AdapterStateError(f"no adapter named {name!r} is loaded; loaded: {self._names}")
        if len(self._names) == 1:
            raise AdapterStateError(f"{name!r} is the only adapter: unload() removes it from the model")
        if name == self.active_adapter:
            self.set_adapter(next(n for n in self._names if n != name))
        self._bank.pop(name)
        self._names.remove(name)

    @contextlib.contextmanager
    def mixed_batch(self, names: list[str]):
        """Inside, batch row i runs adapter ``names[i]`` (``"__base__"``: the base alone), as PEFT's mixed LoRA
        batches (``adapter_names=``). Each adapter present is read out once for the whole block (a ``generate``
        call): its θ_D is stacked with the others' in the activation dtype. Refused for a merged adapter and for
        adapters that train biases (a bias cannot differ per row); heads in ``modules_to_save`` run per row."""
        self._require_attached("mixed_batch")
        if not isinstance(names, (list, tuple)) or not names or not all(isinstance(n, str) for n in names):
            raise InvalidArgumentError("adapter_names must be a list of adapter names, one per batch row")
        unknown = sorted(set(names) - set(self._names) - {BASE_NAME})
        if unknown:
            raise AdapterStateError(f"adapter_names holds {unknown}, which are not loaded; loaded: {self._names} "
                                    f"(and {BASE_NAME!r} for the base alone)")
        if self._any_merged():
            raise AdapterStateError("the adapter is merged into the weights: unmerge() before mixed batches")
        if self._bias_originals:
            raise AdapterStateError("these adapters train biases, which cannot differ from row to row; run them one at "
                                    "a time (set_adapter) instead of in a mixed batch")
        if self._mixed is not None:
            raise AdapterStateError("mixed batches do not nest")
        present = list(dict.fromkeys(n for n in names if n != BASE_NAME))
        live_theta = self.theta_d.detach()
        thetas = torch.stack([live_theta if n == self.active_adapter else self._banked(n)[0].to(live_theta.dtype)
                              for n in present]) \
            if present else live_theta.new_zeros((0, live_theta.numel()))
        heads = {n: (self.saved_state() if n == self.active_adapter else self._banked(n)[1]) for n in present}
        slots = torch.tensor([present.index(n) if n != BASE_NAME else -1 for n in names], dtype=torch.int32)
        self._mixed = MixedBatch(self, present, thetas, slots, heads)
        try:
            yield self._mixed
        finally:
            self._mixed = None

    # -- files ----------------------------------------------------------------------------------
    def save_adapter(self, save_directory: str | os.PathLike, **kwargs) -> list[str]:
        """Write the adapter files (config JSON + one safetensors file); returns the paths written."""
        from .serialization import save_adapter

        self._require_attached("save_adapter")
        return save_adapter(self, save_directory, **kwargs)

    def lora_weights(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Materialised (A, B) in float32 for every adapted layer, by module name."""
        with torch.no_grad():
            return {name: tuple(t.detach() for t in layer.lora_matrices()) for name, layer in self.wrapped_layers()}


def _untie_config(model: nn.Module) -> None:
    """After a merge gave a tied output head its own weight: the config must not tie them again on save/load."""
    config = getattr(model, "config", None)
    for cfg in (config, getattr(config, "get_text_config", lambda: None)()):
        if cfg is not None and getattr(cfg, "tie_word_embeddings", False):
            cfg.tie_word_embeddings = False


def _live_name(model: nn.Module, logical: str) -> str:
    """The live parameter name of a trained bias given by its logical name (inside a wrapper or not)."""
    module_name, _, leaf = logical.rpartition(".")
    if module_name:
        module = model.get_submodule(module_name)
        if isinstance(module, UniLoraLinear):
            return f"{module_name}.base_layer.{leaf}"
    return logical


class _Undo:
    """Undo steps of a half-done injection, run in reverse order."""

    def __init__(self):
        self.steps: list[Callable[[], None]] = []

    def add(self, step: Callable[[], None]) -> None:
        self.steps.append(step)

    def run(self) -> None:
        for step in reversed(self.steps):
            with contextlib.suppress(Exception):
                step()


def inject_adapter(model: nn.Module, config: UniLoraConfig, theta_d: torch.Tensor | None = None, *,
                   plan: InjectionPlan | None = None) -> UniLoraAdapter:
    """Attach a Uni-LoRA adapter to ``model`` in place and return its handle.

    θ_d starts uniform in [-init_theta_d_bound, init_theta_d_bound] (drawn from torch's global RNG, as
    PEFT does), or is ``theta_d`` when given. Everything is checked before the model is changed
    (`plan_injection`: InvalidConfigError for targets that match nothing or sizes out of bounds,
    AdapterStateError for a model that already carries an adapter); if anything fails while the model
    is being changed, every change is undone.
    """
    if not isinstance(config, UniLoraConfig):
        raise InvalidArgumentError(f"config must be a UniLoraConfig, got {type(config).__name__}")
    model = unwrap(model)
    plan = plan if plan is not None else plan_injection(model, config)
    if theta_d is None:
        theta_d = torch.empty(config.theta_d_length, dtype=torch.float32)
        torch.nn.init.uniform_(theta_d, -config.init_theta_d_bound, config.init_theta_d_bound)
    elif tuple(theta_d.shape) != (config.theta_d_length,):
        raise InvalidConfigError(f"theta_d has shape {tuple(theta_d.shape)}; expected ({config.theta_d_length},)")
    projection = Projection.build(config.projection, config.proj_seed, plan.D, config.theta_d_length)
    first_weight = plan.targets[0][1].weight
    device = first_weight.device if first_weight.device.type != "meta" else torch.device("cpu")

    undo = _Undo()
    flags = []
    seen: set[int] = set()
    for param in model.parameters():
        if id(param) not in seen:
            seen.add(id(param))
            flags.append((param, param.requires_grad))
    try:
        undo.add(lambda: [p.requires_grad_(f) for p, f in flags])
        model.requires_grad_(False)
        model.register_parameter(THETA_NAME, nn.Parameter(theta_d.detach().to(device, torch.float32).clone()))
        undo.add(lambda: delattr(model, THETA_NAME))
        adapter = UniLoraAdapter(model, config, plan.layers, projection, plan.heads)
        adapter._requires_grad_before = flags
        model.__dict__["unilora_adapter"] = adapter
        undo.add(lambda: model.__dict__.pop("unilora_adapter", None))
        adapter._install_hooks()
        undo.add(lambda: [h.remove() for h in adapter._hooks])
        for slot, ((name, module), spec) in enumerate(zip(plan.targets, plan.layers)):
            _set_submodule(model, name, UniLoraLinear(module, spec, model, config.unilora_dropout, slot))
            undo.add(lambda name=name, module=module: _set_submodule(model, name, module))
        for name in plan.heads:
            original = model.get_submodule(name)
            _set_submodule(model, name, ModulesToSave(original, model))
            undo.add(lambda name=name, original=original: _set_submodule(model, name, original))
        undo.add(lambda: adapter._fuse_swiglu(False))
        adapter._find_layers()
        params = dict(model.named_parameters())
        for name in plan.biases:
            param = params[_live_name(model, name)]
            adapter._bias_originals[name] = param.detach().clone()
            param.requires_grad_(True)
        getattr(model, THETA_NAME).requires_grad_(True)
        from . import peft_api

        peft_api.install(model)
    except BaseException:
        undo.run()
        from . import peft_api

        peft_api.uninstall(model)
        raise
    return adapter
