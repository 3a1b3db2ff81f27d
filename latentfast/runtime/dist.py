"""Process-group set-up and model wrapping shared by the trainers.

``torchrun`` sets RANK/WORLD_SIZE/LOCAL_RANK; without them everything runs in one
process with no process group. Backend: nccl on CUDA, gloo on CPU.

Faults: the process group gets ``--ddp_timeout`` seconds, so a hung rank ends the job
instead of stalling it for torch's default 30 minutes, and ``named(what)`` turns gloo's
bare "Timed out waiting 600000ms for recv" into an error naming the collective. Under
torchrun a worker also watches its agent (``watch_parent``): when the agent dies the
worker stops, instead of training on and writing checkpoints unsupervised.
"""
from __future__ import annotations

import datetime
import gc
import os
import signal
import threading
import time
from contextlib import contextmanager

import torch
import torch.distributed as dist


class CollectiveError(RuntimeError):
    """A collective timed out or lost a peer: another rank is hung or dead."""


_TIMEOUT_S: float | None = None
_DEAD_PEER = ("timed out", "timeout", "connection closed by peer", "connection reset", "broken pipe")


@contextmanager
def named(what: str):
    """Re-raise a collective's timeout / lost-peer error naming ``what`` (e.g. "the gradient
    all_reduce of step 5")."""
    try:
        yield
    except CollectiveError:
        raise
    except RuntimeError as e:
        if not dist.is_initialized() or not any(m in str(e).lower() for m in _DEAD_PEER):
            raise
        limit = f" after {_TIMEOUT_S:g} s (--ddp_timeout)" if _TIMEOUT_S else ""
        raise CollectiveError(f"rank {dist.get_rank()}: {what} failed{limit}: another rank is hung or has died "
                              f"({str(e).splitlines()[0]})") from None


def watch_parent(poll_s: float = 1.0, grace_s: float = 30.0) -> threading.Thread:
    """Stop this process (SIGTERM, then exit after ``grace_s``) once its parent is gone (it
    is re-parented): a torchrun worker whose agent was killed."""
    ppid = os.getppid()

    def watch():
        while os.getppid() == ppid:
            time.sleep(poll_s)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace_s)  # a SIGTERM handler that did not exit
        os._exit(143)

    t = threading.Thread(target=watch, name="latentfast-parent-watch", daemon=True)
    t.start()
    return t


_WATCHING = False


def setup(device: str | None = None, timeout_s: float | None = None) -> tuple[torch.device, int, int]:
    """Init the process group when launched by torchrun (collectives time out after
    ``timeout_s``; torch's default when None); returns (device, rank, world_size)."""
    global _TIMEOUT_S, _WATCHING
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if os.environ.get("TORCHELASTIC_RUN_ID") is not None and not _WATCHING:  # under torchrun
        watch_parent()
        _WATCHING = True
    if world > 1 and not dist.is_initialized():
        kw = {} if timeout_s is None else {"timeout": datetime.timedelta(seconds=timeout_s)}
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", **kw)
        _TIMEOUT_S = timeout_s
    return dev, rank, world


def cleanup():
    """Tear the process group down once nothing refers to it: callers drop their DDP/FSDP
    modules first; otherwise gloo's threads can outlive it and abort the process at exit."""
    if dist.is_initialized():
        gc.collect()
        with named("the closing barrier"):
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
    with named("the metrics all_reduce"):
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
