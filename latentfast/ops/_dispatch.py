"""Backend selection and argument checks shared by every fused op.

Dispatch rule (same for all ops):
  * CUDA tensors                      -> Triton kernel.
  * CPU tensors + ``TRITON_INTERPRET=1`` -> the same Triton kernel, run by Triton's
    interpreter (this is how CI exercises the real kernel code).
  * CPU tensors otherwise             -> the plain PyTorch reference; for the GRPO loss's
    per-chunk kernels and the thinking residual's epilogues, the optional native C++
    kernels instead when the library is built (``latentfast/kernels/csrc/`` via ``CMakeLists.txt``,
    loaded by ``latentfast.ops._native``) and ``LATENTFAST_NATIVE`` is not ``0``.
"""
from __future__ import annotations

import importlib.util
import os

import torch


# Found, not imported: importing triton here would fix TRITON_INTERPRET before the caller
# sets it, and a plain constant keeps torch.compile from tracing a cache wrapper.
TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    return TRITON_AVAILABLE


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(t: torch.Tensor) -> bool:
    """True when the fused Triton kernel should run for tensors living like ``t``.
    float64 always takes the reference: the kernels accumulate in fp32, and a user
    asking for fp64 (gradcheck, numerics studies) must get fp64."""
    if not triton_available() or t.dtype == torch.float64:
        return False
    if t.device.type == "cuda":
        return True
    return t.device.type == "cpu" and interpreter_enabled()


# --------------------------------------------------------------------------- checks
# Errors name the argument and the expected shape/dtype so a user never meets a
# Triton crash or, worse, a silently wrong answer.

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_tensor(name: str, t, *, ndim: int | None = None, float_=False, dtype=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if float_ and t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (fp32/fp16/bf16), got {t.dtype}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, got {t.dtype}")


def check_shape(name: str, t: torch.Tensor, expected: tuple, what: str = ""):
    """``expected`` may hold None for dimensions that are free."""
    ok = t.dim() == len(expected) and all(e is None or s == e for s, e in zip(t.shape, expected))
    if not ok:
        dims = ["*" if e is None else str(e) for e in expected]
        exp = "(" + ", ".join(dims) + ("," if len(dims) == 1 else "") + ")"
        hint = f" ({what})" if what else ""
        raise ValueError(f"{name} must have shape {exp}{hint}, got {tuple(t.shape)}")


def check_same_device(**tensors):
    devices = {n: t.device for n, t in tensors.items() if isinstance(t, torch.Tensor)}
    if len(set(devices.values())) > 1:
        desc = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"all tensors must be on one device, got {desc}")
