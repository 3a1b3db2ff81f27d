"""The non-finite-step guard: no optimizer ever steps on a NaN/Inf loss or gradient.

A step whose loss or gradient norm is not finite is skipped (no optimizer step, no
scheduler step, gradients cleared), counted in ``skipped_nonfinite`` and warned about;
after ``max_consecutive`` skips in a row the run stops with an error naming the step
and the likely causes. Under torch.distributed the decision is collective (one rank's
NaN skips the step on every rank), so replicas never diverge.
"""
from __future__ import annotations

import math
import warnings

import torch
import torch.distributed as dist

from latentfast.files import nonfinite

LIKELY_CAUSES = ("a learning rate too high for this model, fp16 overflow (use --bf16 or fp32), "
                 "a data row that tokenises to nothing, or a reward/advantage normalisation that divides by zero")


class NonFiniteTrainingError(RuntimeError):
    """Raised after too many consecutive steps with a non-finite loss or gradient norm."""


def all_finite(*values) -> bool:
    """True when every value (tensor or number; None ignored) is finite, agreed by all ranks."""
    ok = True
    for v in values:
        if v is None:
            continue
        if torch.is_tensor(v):
            v = v.detach()
            if hasattr(v, "full_tensor"):  # FSDP2 DTensor norm
                v = v.full_tensor()
            ok = ok and bool(torch.isfinite(v).all())
        else:
            ok = ok and math.isfinite(float(v))
    if dist.is_available() and dist.is_initialized():
        flag = torch.tensor([1.0 if ok else 0.0],
                            device="cuda" if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        ok = bool(flag.item() > 0)
    return ok


class NonFiniteGuard:
    """Counts skipped steps; ``check(step, loss, grad_norm)`` says whether to step."""

    def __init__(self, max_consecutive: int = 10, name: str = "training"):
        if max_consecutive < 1:
            raise ValueError(f"max_consecutive must be >= 1, got {max_consecutive}")
        self.max_consecutive, self.name = max_consecutive, name
        self.skipped = 0  # total over the run (the ``skipped_nonfinite`` metric)
        self.consecutive = 0

    def check(self, step: int | None, loss=None, grad_norm=None) -> bool:
        if all_finite(loss, grad_norm):
            self.consecutive = 0
            return True
        self.skipped += 1
        self.consecutive += 1
        where = f"step {step}" if step is not None else "a step"

        def show(v):
            if torch.is_tensor(v):
                v = (v.full_tensor() if hasattr(v, "full_tensor") else v).detach()
            return "n/a" if v is None else f"{float(v):.4g}"
        msg = (f"{self.name}: {where} has a non-finite loss ({show(loss)}) or gradient norm "
               f"({show(grad_norm)}); skipped it (no optimizer or scheduler step)")
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteTrainingError(
                f"{msg}. {self.consecutive} consecutive steps were non-finite, so the run stops here. "
                f"Likely causes: {LIKELY_CAUSES}.")
        warnings.warn(f"{msg} [{self.consecutive} in a row, {self.skipped} in all; the run stops after "
                      f"{self.max_consecutive} in a row]", RuntimeWarning, stacklevel=2)
        return False

    def state_dict(self) -> dict:
        return {"skipped": self.skipped, "consecutive": self.consecutive}

    def load_state_dict(self, state: dict) -> None:
        self.skipped = int(state.get("skipped", 0))
        self.consecutive = int(state.get("consecutive", 0))


def assert_finite_weights(named_tensors, where: str) -> None:
    """Refuse to write a checkpoint that holds a non-finite weight (names tensor and dtype)."""
    bad = nonfinite(named_tensors)
    if bad:
        few = ", ".join(f"{k} ({str(d).removeprefix('torch.')})" for k, d, _ in bad[:5])
        few += f" ... ({len(bad)} in all)" if len(bad) > 5 else ""
        raise NonFiniteTrainingError(f"refusing to save {where}: non-finite values in {few}")


__all__ = ["NonFiniteGuard", "NonFiniteTrainingError", "all_finite", "assert_finite_weights"]
