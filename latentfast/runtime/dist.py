"""Process-group set-up and model wrapping shared by the trainers.

``torchrun`` sets RANK/WORLD_SIZE/LOCAL_RANK; without them everything runs in one
process with no process group. Backend: nccl on CUDA, gloo on CPU.
"""
from __future__ import annotations

import gc
import os
from contextlib import contextmanager

import torch
import torch.distributed as dist


def setup(device: str | None = None) -> tuple[torch.device, int, int]:
    """Init the process group when launched by torchrun; returns (device, rank, world_size)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return dev, rank, world


def cleanup():
    """Tear the process group down once nothing refers to it: callers drop their DDP/FSDP
    modules first; otherwise gloo's threads can outlive it and abort the process at exit."""
    if dist.is_initialized():
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def all_mean(values: dict, device) -> dict:
    """Average scalar metrics over ranks (one all-reduce)."""
    if not dist.is_initialized() or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], device=device, dtype=torch.float64)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist()))


def wrap(model: torch.nn.Module, device: torch.device, fsdp: bool = False, layers=()) -> torch.nn.Module:
    """DDP (or, with ``fsdp``, PyTorch FSDP2: each of ``layers`` then the root) when
    distributed; the model itself otherwise. The root owns embeddings and lm_head, so
    a loss computed inside the root's forward sees the full, unsharded lm_head weight."""
    if not dist.is_initialized():
        return model
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for layer in layers:
            fully_shard(layer)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") and not _is_fsdp(model) else model


def _is_fsdp(model) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, FSDPModule)


@contextmanager
def gathered(model: torch.nn.Module):
    """Root parameters unsharded, for calls that bypass the root's forward (generation,
    reference log-probs); a no-op without FSDP."""
    if not _is_fsdp(model):
        yield
        return
    state = model._get_fsdp_state()  # private, but FSDP2 offers no public way to init before
    state._lazy_init()                 # a non-root forward (generation runs the layers first)
    model.unshard()
    try:
        yield
    finally:
        model.reshard()
