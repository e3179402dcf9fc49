"""The adapter's trained tensors when FSDP shards them: gathering them whole, and loading whole ones back.

Under DDP every rank holds all of θ_d, so nothing here communicates. Under FSDP2 (``fully_shard``) θ_d and
the heads are DTensors sharded along dim 0; under FSDP1 with ``use_orig_params=True`` they are views of the
rank's slice of a FlatParameter outside forward. `gather_adapter_state` and `load_adapter_state` are then
collectives: **every rank must call them**, in the same order. ``model`` may be the user's model, a DDP or
FSDP1 wrapper around it, or an FSDP2-sharded model.
"""

from __future__ import annotations

import contextlib
import torch
import torch.nn as nn

from .model import THETA_NAME, get_adapter, is_dtensor, logical_name
from .serialization import AdapterState



def _fsdp1_units(model: nn.Module) -> list[nn.Module]:
    """The FSDP1 units of ``model`` whose own FlatParameter holds a trained parameter."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    except ImportError:
        return []
    units = []
    for unit in FSDP.fsdp_modules(model):
        flat = getattr(getattr(unit, "_handle", None), "flat_param", None)
        if flat is None or flat.requires_grad:
            units.append(unit)
    return units


@contextlib.contextmanager
def _fsdp1_whole(model: nn.Module, writeback: bool):
    """Inside: the FSDP1 units holding trained parameters show them whole (their own parameters only)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with contextlib.ExitStack() as stack:
        for unit in _fsdp1_units(model):
            stack.enter_context(FSDP.summon_full_params(unit, recurse=False, writeback=writeback))
        yield


def _trained(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    root = get_adapter(model).model
    return [(n, p) for n, p in root.named_parameters() if p.requires_grad]


def gather_adapter_state(model: nn.Module) -> AdapterState:
    """θ_d and the heads of ``model``'s adapter, whole, as CPU copies. A collective under FSDP."""
    adapter = get_adapter(model)
    with _fsdp1_whole(model, writeback=False) if _fsdp1_units(model) else contextlib.nullcontext():
        whole = {}
        for name, param in _trained(model):
            t = param.detach()
            t = t.full_tensor() if is_dtensor(t) else t
            whole[name] = t.cpu().clone()
    theta = whole.pop(THETA_NAME).float()
    if theta.shape != (adapter.config.theta_d_length,):
        raise RuntimeError(f"gathered θ_d has shape {tuple(theta.shape)}, expected ({adapter.config.theta_d_length},)")
    tensors = {logical_name(n): t for n, t in whole.items()}
    for name, buf in adapter.saved_state().items():  # the heads' buffers (not sharded: FSDP shards parameters)
        if name not in tensors:
            tensors[name] = buf.detach().cpu().clone()
    return AdapterState(theta, tensors)


def load_adapter_state(model: nn.Module, state: AdapterState) -> None:
    """Copy whole tensors into ``model``'s adapter in place, each rank keeping its own shard (the
    parameter objects, which an optimizer may hold, stay the same). A collective under FSDP1."""
    wanted = {THETA_NAME: state.theta_d, **state.tensors}
    with _fsdp1_whole(model, writeback=True) if _fsdp1_units(model) else contextlib.nullcontext():
        with torch.no_grad():
            for name, param in _trained(model):
                key = name if name == THETA_NAME else logical_name(name)
                if key not in wanted:
                    from .errors import AdapterFormatError

                    raise AdapterFormatError(f"the adapter state has no tensor for the trained parameter {key!r}")
                src = wanted[key].to(param.device, param.dtype)
                if is_dtensor(param):
                    from torch.distributed.tensor import distribute_tensor

                    # Every rank has the whole tensor: cut out its own shard, no communication.
                    src = distribute_tensor(src, param.device_mesh, param.placements, src_data_rank=None)
                param.copy_(src)
    # Under FSDP the copy lands in the shards, not in the whole θ_d a cached readout was keyed on.
    get_adapter(model)._drop_pass_cache()
