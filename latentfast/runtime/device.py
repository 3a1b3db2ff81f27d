"""Per-device run settings: autocast precision and peak-memory accounting."""
from __future__ import annotations

import contextlib
import resource

import torch


def amp_context(device: torch.device, bf16: bool | None):
    """bf16 autocast when asked (default: on for CUDA); a no-op context otherwise."""
    on = bf16 if bf16 is not None else device.type == "cuda"
    if on:
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def reset_peak_mem(device: torch.device) -> None:
    """Start a new CUDA peak-memory window (``peak_mem_mb`` then reports this step's peak)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_mem_mb(device: torch.device) -> float:
    """Peak CUDA memory since the last reset, or this process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
