"""Data parallelism with PyTorch's own engine, applied from outside the model (as torchtitan does).

The model file knows nothing of processes. This module:

- `init()` joins the process group whenever `torchrun` launched the process, one process included: NCCL
  on GPUs, gloo on CPU. A plain `python`/`glm` run touches no process group, unless it asks for `ddp` or
  `fsdp` explicitly: then it makes a one-process group of its own, so the wrapping asked for really runs
  (a one-rank device mesh for FSDP2) instead of being dropped in silence.
- `parallelize(model, mode)` wraps for data parallelism: `ddp` (DistributedDataParallel, the default under
  torchrun) or `fsdp` (FSDP2, `torch.distributed.fsdp.fully_shard`, one unit per Transformer block, then
  the root; parameters become DTensors), plus activation checkpointing and `torch.compile`, applied per
  block in place so parameter names (and therefore checkpoints) stay those of the bare model.
- `full_model_state` / `full_optimizer_state` gather world-size independent states (full tensors on the
  CPU, optimizer state keyed by parameter name), and `load_*` scatter them back, so a checkpoint written
  by N processes resumes on M.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

MODES = ("none", "ddp", "fsdp")


@dataclass(kw_only=True, slots=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False
    """True when `init()` created the process group (and `shutdown()` should destroy it)."""
    in_group: bool = False
    """A process group exists (torchrun, one process or more, or one made for an explicit ddp/fsdp)."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def launched_by_torchrun() -> bool:
    """torchrun (and any env:// launcher) sets these for every process it starts, one included."""
    return all(name in os.environ for name in TORCHRUN_VARS)


def init(device: str = "auto", parallel: str = "auto") -> DistInfo:
    """Join the torchrun process group if there is one (or make a one-process group when `parallel` asks
    for ddp/fsdp without torchrun); pick this rank's device."""
    dev = pick_device(device)
    launched = launched_by_torchrun()
    if not launched and not dist.is_initialized() and parallel not in ("ddp", "fsdp"):
        return DistInfo(device=dev)
    local_rank = int(os.environ.get("LOCAL_RANK", "0")) if launched else 0
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    owns = False
    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if launched:
            dist.init_process_group(backend=backend)
        else:  # no launcher, no peers: an in-memory rendezvous of one
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
        owns = True
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
                    device=dev, owns_group=owns, in_group=True)


def shutdown(info: DistInfo) -> None:
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if active():
        dist.barrier()


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (sum or max) across ranks; a no-op in a single process."""
    if active():
        dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
    return tensor


def broadcast_object(obj, src: int = 0):
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


# ----------------------------------------------------------------------------------- wrapping


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated Transformer blocks: the units for FSDP, activation checkpointing and compile."""
    from glm_cli.core.model.transformer import Block

    return [m for m in model.modules() if isinstance(m, Block)]


def apply_activation_checkpointing(model: nn.Module) -> int:
    """Recompute each block's activations in the backward pass; returns how many modules were set."""
    count = 0
    for m in model.modules():
        if hasattr(m, "gradient_checkpointing"):
            m.gradient_checkpointing = True
            count += 1
    return count


def apply_compile(model: nn.Module) -> None:
    """torch.compile each block in place (names unchanged); the whole model if it has no blocks."""
    blocks = _blocks(model)
    for block in blocks:
        block.compile()
    if not blocks:
        model.compile()


def parallelize(model: nn.Module, mode: str, info: DistInfo) -> nn.Module:
    """Wrap `model` (already on its device) for data parallelism; returns the module to call."""
    if mode not in MODES:
        raise ValueError(f"unknown parallel mode {mode!r}")
    if mode == "none":
        return model
    if not info.in_group:
        raise ValueError(f"parallel mode {mode!r} needs a process group; init(parallel={mode!r}) makes one")
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [info.device.index] if info.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(info.device.type, (info.world_size,))
    for block in _blocks(model):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The bare module behind DDP (FSDP2 and per-block compile keep the module itself)."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def reshard(model: nn.Module) -> None:
    """Free FSDP2's unsharded parameters after a forward that had no backward (evaluation, generation).

    The root module keeps its parameters gathered after forward for the backward to come; without one
    the next training step would accumulate into those and lose gradients.
    """
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool):
    """Skip the gradient all-reduce on all but the last micro-step of an accumulation."""
    if enabled:
        yield
        return
    if hasattr(model, "no_sync"):  # DDP
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


# ------------------------------------------------------------------------------ full states

def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True, **kw)


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The complete state dict on the CPU under the bare model's names (collective under FSDP)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(unwrap_for_state(model), options=_options())


def load_model_state(model: nn.Module, state: dict[str, torch.Tensor], strict: bool = True) -> None:
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(unwrap_for_state(model), state, options=_options(strict=strict))


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Optimizer state keyed by parameter name, full tensors on the CPU: {"state", "param_groups"}."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(unwrap_for_state(model), optimizer, options=_options())


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(unwrap_for_state(model), optimizer, state, options=_options())


def unwrap_for_state(model: nn.Module) -> nn.Module:
    # DDP's `.module` is what the optimizer's parameters belong to; FSDP2 modules are used as they are.
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model
