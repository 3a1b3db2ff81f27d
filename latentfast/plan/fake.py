"""Measuring one step on fake tensors with PyTorch's own tools.

``measure(step_fn)`` runs a step under ``FakeTensorMode`` (shapes, dtypes and strides are
real; no storage is allocated) inside ``torch.distributed._tools.mem_tracker.MemTracker``
(bytes live per category: parameters, buffers, gradients, activations, temporaries,
optimizer state), counting FLOPs per aten op with ``torch.utils.flop_counter``'s formulas.

Two things the aten-level trackers cannot see are added here, at the moment they happen:
- the fused lm_head ops (``latentfast::lm_head_*``) are opaque custom ops whose fake impls
  return only their outputs; inside they allocate an (R, V) logits chunk plus copies of the
  rows' hidden states (and the distillation op a teacher chunk). ``_Tracker`` adds that
  workspace to the live total while the op runs, under the category "lm_head chunk", with
  R as the op would choose it on the planned device type; their GEMM FLOPs are added too.
- ``MemTracker`` updates the peak of every module on every op (quadratic in practice:
  76 s instead of 8 s for a Qwen2.5-1.5B step here); ``_Tracker`` keeps the global peak only.

FakeTensorMode on ``device="cuda"``: with the CPU build of torch it fails ("not linked with
support for cuda devices"); with the CUDA build (2.14.1+cu130) and no GPU a fake forward
works but the backward fails in the autograd engine ("hasPrimaryContext expects a valid
device index"). So the step runs on fake CPU tensors and ``latentfast.plan.devices`` adds
what differs on a GPU (CUDA context, allocator rounding) explicitly.
"""
from __future__ import annotations

import contextlib
import weakref
import math
from copy import deepcopy

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.distributed._tools.mem_tracker import _TOTAL_KEY, MemTracker
from torch.utils.flop_counter import flop_registry as _FLOP_REGISTRY

CHUNK_KEY = "lm_head chunk"


def _elt(t) -> int:
    return t.element_size() if isinstance(t, torch.Tensor) else 0


def lm_head_workspace(func, args, device_type: str) -> tuple[int, float]:
    """(bytes, FLOPs) a fused lm_head op allocates / computes inside, from its arguments."""
    from latentfast.ops.lm_head_engine import chunk_rows_default

    name = str(func)
    dev = torch.device(device_type)
    if "lm_head_objective" in name:
        x, weight, mask, chunk_rows = args[0], args[1], args[4], args[10]
        need = sum(bool(a) for a in args[11:13])
        n = mask.numel()  # (fake: every row counts; padding is dropped in the real op)
        V, H = weight.shape
        rows = chunk_rows if chunk_rows > 0 else chunk_rows_default(dev, V, _elt(x))
        if args[9] > 0 and chunk_rows <= 0:  # softcap -> torch path, 1/8 of the rows
            rows = max(16, rows // 8)
        r = min(rows, n)
        work = r * V * _elt(x) + 2 * n * H * _elt(x) + 4 * n * 4
        if args[9] > 0:
            work += 8 * r * V * 4
        return work, 2.0 * n * H * V * (1 + need)
    if "lm_head_logp_entropy" in name:
        x, weight, chunk_rows = args[0], args[1], args[6]
        n = x.numel() // x.shape[-1]
        V, H = weight.shape
        rows = chunk_rows if chunk_rows > 0 else chunk_rows_default(dev, V, _elt(x))
        return min(rows, n) * V * _elt(x) + n * H * _elt(x), 2.0 * n * H * V
    if "lm_head_distill" in name:
        xs, ws, xt, wt, chunk_rows = args[0], args[1], args[3], args[4], args[9]
        n = xs.shape[0]
        V, Vt = ws.shape[0], wt.shape[0]
        rows = chunk_rows if chunk_rows > 0 else max(16, chunk_rows_default(dev, max(V, Vt), 4) // 16)
        r = min(rows, n)
        need = sum(bool(a) for a in args[10:12])
        work = r * (V * _elt(xs) + Vt * _elt(xt)) + 5 * r * V * 4 + n * (2 * xs.shape[1] * _elt(xs) +
                                                                       xt.shape[1] * _elt(xt))
        return work, 2.0 * n * (xs.shape[1] * V * (1 + need) + xt.shape[1] * Vt)
    return 0, 0.0


class _NoHookHandle:
    def remove(self):
        pass


_NoHook = _NoHookHandle()


class _Tracker(MemTracker):
    """MemTracker with a global peak only, per-phase peaks, and the lm_head ops' workspace."""

    def __init__(self, device_type: str = "cuda"):
        super().__init__()
        self.device_type = device_type
        self.phase = "step"
        self.phase_peaks: dict[str, dict] = {}
        self.flops: dict[str, float] = {}
        self._seen = weakref.WeakSet()

    def _consider(self, extra: int = 0):
        for dev, snap in self._curr_mem_snap.items():
            total = snap[_TOTAL_KEY] + extra
            best = self.phase_peaks.get(self.phase)
            if best is None or best[_TOTAL_KEY] < total:
                s = deepcopy(snap)
                s[CHUNK_KEY] = extra
                s[_TOTAL_KEY] = total
                self.phase_peaks[self.phase] = s

    def _update_peak_stats(self, peak_state) -> None:  # noqa: ARG002 (global peak only)
        self._consider()

    def _track_module_params_and_buffers(self, module, install_grad_hooks: bool = True):
        """MemTracker's, but no gradient hook on frozen parameters (LoRA bases, teachers):
        ``register_hook`` refuses a tensor that does not require grad."""
        frozen = [p for p in module.parameters() if not p.requires_grad
                  and self._param_to_grad_hook_handles.get(p) is None]
        for p in frozen:  # marked as hooked
            self._param_to_grad_hook_handles[p] = (_NoHook, _NoHook)
        return super()._track_module_params_and_buffers(module, install_grad_hooks)

    # Per-module statistics are not needed (and MemTracker refuses a module called twice in
    # one step, as a reference forward does): the hooks only register parameters once.
    def _pre_fw_hook(self, module, inputs) -> None:
        if module not in self._seen:
            self._seen.add(module)
            self._track_module_params_and_buffers(module, install_grad_hooks=True)

    def _post_fw_hook(self, module, inputs, outputs) -> None:
        pass

    def _pre_bw_hook(self, module, args) -> None:
        pass

    def _post_bw_hook(self, module, args) -> None:
        pass

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and isinstance(args[0], FakeTensor):
            # a value read on the host (the ops' token-id range checks: ``int(ids.min())``) is
            # unknowable on fake tensors: 1 (passes those checks; AdamW reads its step count)
            return False if args[0].dtype == torch.bool else 1
        work = 0
        if str(func).startswith("latentfast."):
            work, flops = lm_head_workspace(func, args, self.device_type)
            self._count(flops)
            if work:
                self._consider(work)  # the op's inputs are live while it runs
        out = super().__torch_dispatch__(func, types, args, kwargs)
        if work:
            self._consider(work)  # outputs and workspace together at the op's end
        counter = _FLOP_REGISTRY.get(func._overloadpacket)
        if counter is not None:
            self._count(counter(*args, **(kwargs or {}), out_val=out))
        return out

    def _count(self, flops: float) -> None:
        """FLOPs per phase with torch's own formulas (``torch.utils.flop_counter``'s registry);
        not ``FlopCounterMode`` itself: its module hooks keep activation-checkpointing's
        recomputed tensors alive through the backward (the planned peak rose, not fell)."""
        self.flops[self.phase] = self.flops.get(self.phase, 0.0) + flops

    @contextlib.contextmanager
    def in_phase(self, name: str):
        old, self.phase = self.phase, name
        try:
            yield
        finally:
            self.phase = old


@contextlib.contextmanager
def fake_mode():
    """FakeTensorMode, with ``module.to(dtype)`` overwriting parameters instead of swapping
    them (PEFT moves its adapters with ``.to``; swapping fake parameters fails)."""
    old = torch.__future__.get_overwrite_module_params_on_conversion()
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    try:
        with FakeTensorMode(allow_non_fake_inputs=False) as mode:
            yield mode
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(old)


def fakeify(module, mode, device: str = "cpu", memo: dict | None = None):
    """Replace a meta-device module's parameters and buffers by fake tensors of the same shapes,
    dtypes and sharing (tied weights stay one tensor). Building on the meta device first is
    fast and lets PEFT's ``.to`` calls run on ordinary meta tensors."""
    memo = {} if memo is None else memo
    dev = torch.device(device)
    conv = mode.fake_tensor_converter
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is None:
                continue
            if id(p) not in memo:
                t = conv.from_meta_and_device(mode, p.data if p.is_meta else p.data.to("meta"), dev)
                memo[id(p)] = nn.Parameter(t, requires_grad=p.requires_grad)
            sub._parameters[name] = memo[id(p)]
        for name, bf in list(sub._buffers.items()):
            if bf is None:
                continue
            if id(bf) not in memo:
                memo[id(bf)] = conv.from_meta_and_device(mode, bf if bf.is_meta else bf.to("meta"), dev)
            sub._buffers[name] = memo[id(bf)]
    return module


def categories(snap: dict) -> dict[str, int]:
    """MemTracker's snapshot of one device -> {category: bytes} (no zero rows)."""
    return {str(getattr(k, "value", k)): int(v) for k, v in snap.items() if v}


def gib(b: float) -> float:
    return b / (1 << 30)


def nbytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


__all__ = ["_Tracker", "fake_mode", "fakeify", "categories", "lm_head_workspace", "gib", "nbytes", "CHUNK_KEY",
           "math"]
