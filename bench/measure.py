"""Timing and peak-memory measurement shared by the benchmarks.

GPU: CUDA events around the call, peak from the caching allocator.
CPU: wall clock; peak tensor memory replayed from the profiler's allocation events.
Peak memory is always reported as *extra* bytes over what was live before the call
(inputs, weights), i.e. the activation/workspace cost.
"""
from __future__ import annotations

import contextlib
import gc
import os
import statistics
import sys
import threading
import time

import torch


class Skipped(Exception):
    """A peer that cannot run here (e.g. Liger's Triton-only kernels on a CPU): reported as
    "skipped: <why>", not as an error."""


def needs(reason: str):
    """A stand-in callable for an implementation that cannot run on this device."""
    def skipped():
        raise Skipped(reason)
    return skipped


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory(fn, device: torch.device) -> int:
    """Extra bytes at the peak of one call of ``fn`` (result freed afterwards)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        out = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        del out
        return int(peak)
    return _cpu_peak_profiled(fn)


@contextlib.contextmanager
def _quiet_stderr():
    """Kineto prints start/stop lines on fd 2 from C++: mute the fd while profiling."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _cpu_peak_profiled(fn) -> int:
    """PyTorch keeps no CPU allocator statistics, but its profiler records every CPU
    tensor allocation and free: replay them in time order and take the highest running
    total. Exact and deterministic (tensor bytes, as the CUDA number), unlike RSS."""
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
        del out
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type().name == "CPU")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def _time_once(fn, device: torch.device) -> float:
    if device.type == "cuda":
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize(device)
        return s.elapsed_time(e)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def time_round_robin(impls: dict, device: torch.device, *, warmup: int = 2, reps: int = 5,
                     max_seconds: float = 60.0) -> dict:
    """Median milliseconds of each callable, timed in turns (rep 1 of every impl, then
    rep 2, ...) so that drift on a noisy machine (clock, neighbours) hits all alike.
    An impl that raises is left out of the result (its exception is stored instead)."""
    times: dict = {name: [] for name in impls}
    for name, fn in impls.items():
        try:
            for _ in range(warmup):
                fn()
        except Exception as exc:  # a baseline missing (e.g. liger not installed) is recorded, not fatal
            times[name] = exc
    _sync(device)
    live = [n for n in impls if isinstance(times[n], list)]
    start = time.perf_counter()
    for _ in range(reps):
        for name in live:
            times[name].append(_time_once(impls[name], device))
        if time.perf_counter() - start > max_seconds:
            break
    return {n: (statistics.median(t) if isinstance(t, list) else t) for n, t in times.items()}


def compare(impls: dict, device: torch.device, baseline: str, **timing_kw) -> dict:
    """Time (round robin) and measure every callable in ``impls``; ratios are
    baseline/impl for speed (>1 = faster than baseline) and impl/baseline for memory."""
    rows = {}
    for name, ms in time_round_robin(impls, device, **timing_kw).items():
        if isinstance(ms, Skipped):
            rows[name] = {"skipped": str(ms)}
            continue
        if isinstance(ms, Exception):
            rows[name] = {"error": f"{type(ms).__name__}: {str(ms)[:200]}"}
            continue
        try:
            mem = peak_memory(impls[name], device)  # -1: could not be measured
            rows[name] = {"ms": round(ms, 4), "peak_extra_mb": round(mem / 2**20, 2) if mem >= 0 else None}
        except Exception as exc:
            rows[name] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    base = rows.get(baseline, {})
    for name, r in rows.items():
        if "ms" in r and "ms" in base:
            r["speedup_vs_" + baseline] = round(base["ms"] / r["ms"], 3)
            if base["peak_extra_mb"] and r["peak_extra_mb"] is not None:
                r["memory_vs_" + baseline] = round(r["peak_extra_mb"] / base["peak_extra_mb"], 3)
    return {name: rows[name] for name in impls}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


class PeakRSS:
    """Peak resident memory of this process while active, above the RSS at start (MB): a 5 ms
    psutil poll, for whole-step comparisons run each side in its own process."""

    def __init__(self):
        import psutil

        self.proc, self.peak, self.base, self._on = psutil.Process(), 0, 0, False

    def __enter__(self):
        self.base = self.peak = self.proc.memory_info().rss
        self._on = True
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while self._on:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.005)

    def __exit__(self, *exc):
        self._on = False
        self._t.join()

    @property
    def mb(self) -> float:
        return (self.peak - self.base) / 2 ** 20


def record_time(obj, name: str, into: list) -> None:
    """Wrap the method ``obj.<name>`` so that each call's wall seconds are appended to ``into``
    (a peer's phase, e.g. TRL's rollout, timed without changing its code)."""
    inner = getattr(obj, name)

    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        out = inner(*args, **kwargs)
        into.append(time.perf_counter() - t0)
        return out

    setattr(obj, name, timed)
