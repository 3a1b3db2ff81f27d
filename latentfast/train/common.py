"""Small helpers shared by the trainers (flags and presets live in ``config.py``).

``check_data_arg`` / ``check_resume_arg`` (path flags checked at parsing: ``checks.py``), ``SampleStream``
(resumable epoch-shuffled order), ``warmup_schedule`` (linear warm-up then
cosine/linear/constant), ``JsonlLogger`` (rank-0 metrics file) and the pieces of the loop's
step (``no_sync_unless``, ``optimizer_step``). Rows by name are ``latentfast.data.rows``,
model loading ``latentfast.models.local``, precision and memory ``latentfast.runtime.device``.
"""
from __future__ import annotations

import contextlib
import json
import math
import pathlib
import random

import torch

from latentfast.runtime.guard import NonFiniteGuard

from . import checks, entry

# torch-free, in entry.py / checks.py (the command lines use them before torch loads); importable from here too
console_entry = entry.console_entry
check_data_arg, check_resume_arg = checks.check_data_arg, checks.check_resume_arg


class SampleStream:
    """Item ``i`` of a deterministic stream over ``rows``, a fresh seeded shuffle each epoch
    (one shuffle for all ranks): item ``i`` depends only on ``i``, so a resumed run
    continues the stream."""

    def __init__(self, rows, seed):
        self.rows, self.seed, self._perm = rows, seed, {}

    def __getitem__(self, i):
        epoch, pos = divmod(i, len(self.rows))
        if epoch not in self._perm:
            self._perm = {epoch: random.Random(self.seed + epoch).sample(range(len(self.rows)), len(self.rows))}
        return self.rows[self._perm[epoch][pos]]


def warmup_schedule(opt, total: int, warmup_ratio: float, kind: str = "cosine"):
    """LambdaLR: linear warm-up over ``warmup_ratio * total`` steps, then ``kind``;
    ``"minimind"`` is MiniMind's ``lr * (0.1 + 0.45 * (1 + cos(pi * step / total)))``;
    ``"minimind_rl"`` its RL stages' cosine from lr to lr / 10. MiniMind has no warm-up (its
    stages default ``warmup_ratio`` to 0); a warm-up asked for scales these two linearly."""
    warm = max(1, int(warmup_ratio * total))

    def f(s):
        if kind in ("minimind", "minimind_rl"):
            ramp = min(1.0, (s + 1) / warm) if warmup_ratio > 0 else 1.0
            cos = 1 + math.cos(math.pi * min(s, total) / max(1, total))
            return ramp * (0.1 + 0.45 * cos if kind == "minimind" else 0.1 + 0.9 * 0.5 * cos)
        if s < warm:
            return (s + 1) / warm
        if kind == "constant":
            return 1.0
        t = min(1.0, (s - warm) / max(1, total - warm))
        return 0.5 * (1 + math.cos(math.pi * t)) if kind == "cosine" else 1 - t

    return torch.optim.lr_scheduler.LambdaLR(opt, f)


def no_sync_unless(wrapped, sync: bool):
    """DDP's ``no_sync()`` for a micro-batch whose gradients are not all-reduced yet;
    a no-op context on the syncing one or for an unwrapped / FSDP module."""
    return wrapped.no_sync() if (not sync and hasattr(wrapped, "no_sync")) else contextlib.nullcontext()


def optimizer_step(params, opt, sched, max_grad_norm: float, *, guard: NonFiniteGuard | None = None,
                   loss=None, step: int | None = None):
    """Clip the gradients of ``params``, step the optimizer and the schedule, clear the
    gradients; returns the total norm before clipping. With a ``guard``, a non-finite
    ``loss`` or gradient norm skips the optimizer and scheduler step (see ``guard.py``)."""
    params = list(params)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    if guard is None or guard.check(step, loss, grad_norm):
        opt.step()
        sched.step()
    opt.zero_grad(set_to_none=True)
    return grad_norm


class JsonlLogger:
    """Appends one JSON object per line to ``path`` on rank 0 (no-op elsewhere)."""

    def __init__(self, path, enabled: bool = True, mode: str = "a"):
        self.f = None
        if enabled:
            pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
            self.f = open(path, mode)

    def log(self, row: dict) -> None:
        if self.f is not None:
            self.f.write(json.dumps(row) + "\n")
            self.f.flush()

    def close(self) -> None:
        if self.f is not None:
            self.f.close()
            self.f = None
