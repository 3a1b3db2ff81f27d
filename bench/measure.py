"""Timing and peak-memory measurement shared by the benchmarks.

GPU: CUDA events around the call, peak from the caching allocator.
CPU: wall clock; peak resident memory from /proc (VmHWM reset through
/proc/self/clear_refs) of one call run in a forked child, since PyTorch does not
track CPU allocations. Peak memory is always reported as *extra* bytes over what was
live before the call (inputs, weights), i.e. the activation/workspace cost.
"""
from __future__ import annotations

import gc
import statistics
import time

import torch


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_cpu_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


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
    return _cpu_peak_in_child(fn)


_CHILD_TIMEOUT_S = 60.0


def _cpu_peak_in_child(fn) -> int:
    """Run ``fn`` once in a forked child whose glibc serves every tensor-sized block
    by mmap (fixed 64 KiB threshold), so peak RSS tracks peak live bytes; the parent's
    allocator, and so its timings, stay untouched."""
    import ctypes
    import os
    import select
    import signal
    import struct

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        peak = -1
        try:
            os.close(r)
            # libgomp is not fork-safe: a parallel region in the child waits forever for
            # the parent's worker threads. One thread keeps ATen's loops inline.
            torch.set_num_threads(1)
            libc = ctypes.CDLL("libc.so.6")
            libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD
            del_out = fn()  # warm-up: lazy initialisation and copy-on-write faults
            del del_out
            gc.collect()
            libc.malloc_trim(0)  # return free heap pages, so reusing them shows up in RSS again
            if _reset_cpu_peak():
                base = _rss_kib("VmRSS")
                out = fn()
                peak = (_rss_kib("VmHWM") - base) * 1024
                del out
        finally:
            os.write(w, struct.pack("q", int(peak)))
            os._exit(0)
    os.close(w)
    # A forked child can still deadlock on a lock some other parent thread held at fork
    # time (compile workers, allocator): give up after a while rather than hang the run.
    ready, _, _ = select.select([r], [], [], _CHILD_TIMEOUT_S)
    data = os.read(r, 8) if ready else b""
    os.close(r)
    if not ready:
        os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return max(struct.unpack("q", data)[0], 0) if len(data) == 8 else -1


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


def time_ms(fn, device: torch.device, *, warmup: int = 2, reps: int = 5, max_seconds: float = 20.0) -> float:
    """Median milliseconds of ``fn()``."""
    return time_round_robin({"fn": fn}, device, warmup=warmup, reps=reps, max_seconds=max_seconds)["fn"]


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
