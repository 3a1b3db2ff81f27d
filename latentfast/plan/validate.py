"""Checking the planner against a real step: on this CPU (small shapes), and on a lent GPU.

``measured_peak(w)`` runs the same step (``latentfast.plan.steps``) on real CPU tensors under
``torch.profiler`` with ``profile_memory=True``: every allocation and free of the CPU
allocator is an event; their running sum from the (second) step's start, plus the bytes alive before
it (weights, optimizer state), is the measured tensor-allocation peak. ``predicted_peak(w)``
is the fake step's (chunk sizes chosen as on CPU, so both run the same way).

On a GPU (``run_trainer_step(w, "cuda")``, ``bench/plan_validation.py --device cuda``) the same
trainer step runs on real CUDA tensors and is measured with torch.cuda's own counters:
``max_memory_allocated`` after ``reset_peak_memory_stats`` (the caching allocator's tensor peak,
weights and optimizer state included) and the wall time of a few steps between
``torch.cuda.synchronize()`` calls; ``predicted_on_card`` is the planner's answer for the same
workload planned for CUDA (``planner.plan``: its allocator peak before the assumed rounding and
context, and its roofline step time for the card).
"""
from __future__ import annotations

import shutil
import tempfile
import time

import torch

from . import harness as H
from .fake import allocation_peak
from . import devices as D
from .planner import measure, plan
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
    return run_trainer_step(w, "cpu", seed)["peak_bytes"]


def run_trainer_step(w: Workload, device_type: str = "cpu", seed: int = 0, steps: int = 3) -> dict:
    """The trainer's own step (``harness``) on real tensors of ``device_type``: built as the
    planner builds it (random weights from the config, the planner's data file), one warm-up
    step (one-time allocations: kernel caches, a compiled decode step's pool, cuBLAS
    workspaces stay out), then measured. Returns ``{"peak_bytes", "step_s", "steps"}``.

    - ``cpu``: one step under ``torch.profiler`` (the CPU allocator's events) plus the bytes
      alive before it; ``step_s`` is None (a profiled CPU step's time says nothing of a GPU's).
    - ``cuda``: ``torch.cuda.reset_peak_memory_stats()``, ``steps`` steps, then
      ``torch.cuda.max_memory_allocated()`` (everything the caching allocator handed out,
      weights and optimizer state included: no base to add); ``step_s``: their wall time
      between ``torch.cuda.synchronize()`` calls, per step."""
    if device_type not in ("cpu", "cuda"):
        raise ValueError(f"device_type: expected 'cpu' or 'cuda', got {device_type!r}")
    workdir = tempfile.mkdtemp(prefix="latentfast-plan-")
    try:
        torch.manual_seed(seed)
        loader = H.PlanLoader(None, H.response_tokens(w))
        with H.substituted(loader):
            trainer, bf16 = trainer_for(w, workdir, device_type)
        H.prepare(trainer, loader, bf16, workdir, device_type)
        H.init_optimizer_state([trainer.optimizer, *H.extra_optimizers(trainer)])
        H.run_step(trainer)  # warm-up: one-time allocations stay out
        if device_type == "cpu":
            base = H.live_bytes(trainer)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
                H.run_step(trainer)
            return {"peak_bytes": base + allocation_peak(prof), "step_s": None, "steps": 1}
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for _ in range(steps):
            H.run_step(trainer)
        torch.cuda.synchronize()
        step_s = (time.perf_counter() - t0) / steps
        return {"peak_bytes": int(torch.cuda.max_memory_allocated()), "step_s": step_s, "steps": steps}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def card_for_current_gpu(card: str | None = None) -> D.Device:
    """The planner's figures for the lent GPU: ``card`` (a ``devices.DEVICES`` name) when given,
    else the one ``torch.cuda.get_device_name()`` names."""
    if card is not None:
        return D.get_device(card)
    name = torch.cuda.get_device_name()
    key = D.card_of(name, torch.cuda.get_device_properties(0).total_memory)
    if key is None:
        raise ValueError(f"--card: the GPU {name!r} is not one of the planner's cards; name the closest of "
                         f"{sorted(D.DEVICES)} with --card")
    return D.get_device(key)


def predicted_on_card(w: Workload, dev: D.Device) -> dict:
    """The planner's answer for ``w`` on ``dev`` (planned for CUDA, as ``latentfast-plan``):
    ``peak_bytes`` = its allocator peak (tensors; the rollout pool included), before the
    assumed allocator reserve and CUDA context; ``step_s`` = its roofline step time."""
    p = plan(w, dev, options=False)
    return {"peak_bytes": p.peak_bytes, "needed_bytes": p.needed_bytes, "step_s": p.step_s}


def predicted_peak(w: Workload) -> int:
    tracker = measure(w, "cpu", fake=True)[0]
    return max(int(s["Total"]) for s in tracker.phase_peaks.values())


def predicted_flops(w: Workload) -> dict:
    return measure(w, "cpu", fake=True)[2]
