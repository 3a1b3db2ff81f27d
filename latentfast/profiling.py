"""Activation-memory accounting that does not depend on the device or allocator.

``saved_activation_bytes`` counts what autograd keeps alive for backward: every
distinct storage a ``save_for_backward`` (or a built-in op's saved variable) holds,
minus the storages of the inputs and outputs, which the caller holds anyway. That is
the "activation memory" of an op, exactly, on CPU as on GPU.
"""
from __future__ import annotations

import torch
from torch.utils._pytree import tree_leaves


def _storage_key(t: torch.Tensor) -> tuple:
    st = t.untyped_storage()
    return (t.device, st.data_ptr())


def saved_activation_bytes(fn, inputs=()) -> tuple[object, int]:
    """Run ``fn()``; return ``(its result, bytes saved for backward)`` excluding the
    storages of ``inputs`` (and of anything sharing them, e.g. ``W.t()``) and of the result."""
    saved: dict[tuple, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[_storage_key(t)] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    held = {_storage_key(t) for t in tree_leaves((tuple(inputs), out)) if isinstance(t, torch.Tensor)}
    return out, sum(n for key, n in saved.items() if key not in held)


__all__ = ["saved_activation_bytes"]
