"""Fused lm_head + GRPO loss (fwd+bwd): time and peak extra memory.

impls: eager (TRL-style: full logits, fp32 log_softmax + entropy; latentfast.reference),
torch_compile of eager, liger (LigerFusedLinearGRPOLoss, if installed), latentfast,
on CPU latentfast_native (the per-chunk kernels from latentfast/kernels/csrc, when the library is
built; ``latentfast`` is then the torch-ops path, LATENTFAST_NATIVE=0), and
three_matmuls: the forward GEMM plus the two backward GEMMs alone, the floor any fused
lm_head loss pays. ``vs_three_matmuls`` = impl ms / floor ms (target <= 1.2).
"""
from __future__ import annotations

import os

import torch

from measure import compare, needs

from latentfast.nn import FusedLinearGRPOLoss
from latentfast.ops import _native
from latentfast.reference.grpo_loss import grpo_loss as eager_loss

KW = dict(beta=0.04, epsilon_low=0.2, epsilon_high=0.28, loss_type="dapo", temperature=1.0)


def _inputs(B, T, H, V, dtype, device, fill):
    g = torch.Generator(device="cpu").manual_seed(0)
    x = (torch.randn(B, T, H, generator=g) * 0.5).to(device, dtype).requires_grad_(True)
    W = (torch.randn(V, H, generator=g) * H**-0.5).to(device, dtype).requires_grad_(True)
    ids = torch.randint(0, V, (B, T), generator=g).to(device)
    lengths = (torch.rand(B, generator=g) * (1 - fill) * T + fill * T).long().clamp(1, T) if fill < 1 else torch.full((B,), T)
    mask = (torch.arange(T)[None] < lengths[:, None]).long().to(device)
    adv = torch.randn(B, generator=g).to(device)
    with torch.no_grad():  # old/ref close to the policy, like a real step
        ref = torch.full((B, T), -8.0).to(device) + 0.1 * torch.randn(B, T, generator=g).to(device)
    return x, W, ids, mask, adv, ref


def _step(fn, x, W, *args):
    def step():
        loss, _ = fn(x, W, *args)
        loss.backward()
        x.grad = W.grad = None
    return step


def _with_native(step, on: bool):
    """Run ``step`` with the native CPU kernels switched on or off (LATENTFAST_NATIVE)."""
    def run():
        old = os.environ.get(_native.ENV_SWITCH)
        os.environ[_native.ENV_SWITCH] = "1" if on else "0"
        try:
            return step()
        finally:
            if old is None:
                del os.environ[_native.ENV_SWITCH]
            else:
                os.environ[_native.ENV_SWITCH] = old
    return run


def _three_matmuls(x, W):
    x2 = x.detach().reshape(-1, x.shape[-1])
    Wd = W.detach()

    def step():
        logits = x2 @ Wd.t()
        gx = logits @ Wd
        gW = logits.t() @ x2
        return gx, gW
    return step


def run(device: torch.device, quick: bool) -> list[dict]:
    if quick:
        cases_spec, dtype = [(4, 256, 128, 16384, 1.0), (4, 256, 128, 16384, 0.3)], torch.float32
    else:  # Qwen2.5-1.5B lm_head; then the same with ~half the tokens padding
        cases_spec, dtype = [(8, 1024, 1536, 151936, 1.0), (8, 1024, 1536, 151936, 0.3)], torch.bfloat16
    # CPU: one sequence per chunk so the small case still shows the memory saving
    fused = FusedLinearGRPOLoss(**KW, chunk_size=1 if quick else None)
    compiled = torch.compile(eager_loss)
    native = device.type == "cpu" and _native.available()
    cases = []
    for B, T, H, V, fill in cases_spec:
        x, W, ids, mask, adv, ref = _inputs(B, T, H, V, dtype, device, fill)
        args = (ids, mask, adv, None, ref, None)
        impls = {
            "eager": _step(lambda *a: eager_loss(*a, **KW), x, W, *args),
            "torch_compile": _step(lambda *a: compiled(*a, **KW), x, W, *args),
            "liger": _liger_step(x, W, args),
            "latentfast": _with_native(_step(fused, x, W, *args), on=False),
            **({"latentfast_native": _with_native(_step(fused, x, W, *args), on=True)} if native else {}),
            "three_matmuls": _three_matmuls(x, W),
        }
        if fill < 1:  # the padded case: compile and the floor add nothing new
            impls.pop("torch_compile")
        rows = compare(impls, device, baseline="eager")
        floor = rows.get("three_matmuls", {}).get("ms")
        for name, r in rows.items():
            if floor and "ms" in r:
                r["vs_three_matmuls"] = round(r["ms"] / floor, 3)
            if r.get("peak_extra_mb") is not None and rows.get("liger", {}).get("peak_extra_mb"):
                r["memory_vs_liger"] = round(r["peak_extra_mb"] / rows["liger"]["peak_extra_mb"], 3)
        cases.append({"op": "lm_head + GRPO loss fwd+bwd", "shape": {"B": B, "T": T, "H": H, "V": V},
                      "completion_fill": fill, "dtype": str(dtype).replace("torch.", ""),
                      "backend": "triton" if device.type == "cuda" else
                      "torch (no Triton on CPU)" + ("; latentfast_native: latentfast/kernels/csrc" if native else ""),
                      "impls": rows})
        del x, W, impls
    return cases


def _liger_step(x, W, args):
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
    except ImportError:
        return needs("liger-kernel not installed (pip install -e '.[bench]')")
    if x.device.type != "cuda":
        return needs("needs CUDA (Liger's kernels are Triton-only)")
    liger = LigerFusedLinearGRPOLoss(**KW, use_ref_model=True)
    return _step(liger, x, W, *args)
