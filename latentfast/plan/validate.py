"""Checking the planner against a real step on this CPU (small shapes).

``measured_peak(w)`` runs the same step (``latentfast.plan.steps``) on real CPU tensors under
``torch.profiler`` with ``profile_memory=True``: every allocation and free of the CPU
allocator is an event; their running sum from the (second) step's start, plus the bytes alive before
it (weights, optimizer state), is the measured tensor-allocation peak. ``predicted_peak(w)``
is the fake step's (chunk sizes chosen as on CPU, so both run the same way).
"""
from __future__ import annotations

import shutil
import tempfile

import torch

from . import harness as H
from .fake import allocation_peak
from .planner import measure
from .steps import StepRunner, Workload, build, init_optimizer_state
from .trainers import has_trainer, trainer_for


def _live_bytes(b) -> int:
    mods = [b.model] + ([b.extra] if b.extra is not None else []) + b.frozen
    tensors = [t for m in mods for t in list(m.parameters()) + list(m.buffers())]
    tensors += [v for o in b.optimizers for st in o.state.values() for v in st.values() if torch.is_tensor(v)]
    return H.storage_bytes(tensors)


def measured_peak(w: Workload, seed: int = 0) -> int:
    if has_trainer(w):
        return measured_trainer_peak(w, seed)
    torch.manual_seed(seed)
    b = build(w)
    init_optimizer_state(b)
    StepRunner(w, b, device_type="cpu").run()  # warm-up: one-time allocations (kernel caches) stay out
    base = _live_bytes(b)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        StepRunner(w, b, device_type="cpu").run()
    return base + allocation_peak(prof)


def measured_trainer_peak(w: Workload, seed: int = 0) -> int:
    """The trainer's own step (``harness``) on real CPU tensors, measured as above."""
    workdir = tempfile.mkdtemp(prefix="latentfast-plan-")
    try:
        torch.manual_seed(seed)
        loader = H.PlanLoader(None, H.response_tokens(w))
        with H.substituted(loader):
            trainer, bf16 = trainer_for(w, workdir, "cpu")
        H.prepare(trainer, loader, bf16, workdir)
        H.init_optimizer_state([trainer.optimizer, *H.extra_optimizers(trainer)])
        H.run_step(trainer)  # warm-up: one-time allocations (kernel caches) stay out
        base = H.live_bytes(trainer)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            H.run_step(trainer)
        return base + allocation_peak(prof)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def predicted_peak(w: Workload) -> int:
    tracker = measure(w, "cpu", fake=True)[0]
    return max(int(s["Total"]) for s in tracker.phase_peaks.values())


def predicted_flops(w: Workload) -> dict:
    return measure(w, "cpu", fake=True)[2]
