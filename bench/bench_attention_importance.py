"""Token importance: the recipe's eager ``output_attentions`` mean vs the fused kernel.

eager            HF eager attention as the recipe runs it (repeat_kv, scores in the
                 input dtype, fp32 softmax cast back, (B, H, T, T) probabilities) + mean.
latentfast       fused two-pass importance from q, k (computes the row LSE itself).
latentfast_lse   fused importance given the LSE the attention forward already returned
                 (flash-attn / SDPA), i.e. the extra cost on top of a flash forward.
sdpa_forward     a flash SDPA attention forward, for scale only (not an importance).
Also: the attention-weighted KV loss fwd+bwd, eager reference vs the fused op.
"""
from __future__ import annotations

import math

import torch

from measure import compare

from latentfast.ops import attention_token_importance, kv_loss
from latentfast.reference import kv_loss as kv_ref


def eager_importance(q, k, mask):
    """The recipe: eager attention probabilities, then attn.detach().mean(dim=(1, 2))."""
    B, H, T, D = q.shape
    kk = k.repeat_interleave(H // k.shape[1], dim=1)
    scores = torch.matmul(q, kk.transpose(-1, -2)) * (1.0 / math.sqrt(D)) + mask
    attn = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return attn.detach().mean(dim=(1, 2))


def _importance_case(B, H, Hk, T, D, dtype, device):
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(B, H, T, D, device=device, dtype=dtype, generator=g)
    k = torch.randn(B, Hk, T, D, device=device, dtype=dtype, generator=g)
    impls = {}
    min_val = torch.finfo(dtype).min

    def eager():
        causal = torch.full((T, T), min_val, device=device, dtype=dtype).triu(1)  # HF builds this per call
        return eager_importance(q, k, causal)

    impls["eager"] = eager
    impls["latentfast"] = lambda: attention_token_importance(q, k)
    if device.type == "cuda":
        kk = k.repeat_interleave(H // Hk, dim=1)
        sdpa = torch.ops.aten._scaled_dot_product_flash_attention
        lse = sdpa(q, kk, kk, 0.0, True)[1]
        impls["latentfast_lse"] = lambda: attention_token_importance(q, k, lse=lse)
        impls["sdpa_forward"] = lambda: sdpa(q, kk, kk, 0.0, True)[0]
    rows = compare(impls, device, baseline="eager")
    backend = "triton" if device.type == "cuda" else "reference (no Triton on CPU)"
    return {"op": "attention_token_importance", "B": B, "H": H, "H_kv": Hk, "T": T, "d": D,
            "dtype": str(dtype).replace("torch.", ""), "backend": backend, "impls": rows}


def _kv_loss_case(B, H, T, D, dtype, device):
    g = torch.Generator(device=device).manual_seed(1)
    sk, sv, tk, tv = (torch.randn(B, H, T, D, device=device, dtype=dtype, generator=g) for _ in range(4))
    sk.requires_grad_(True)
    sv.requires_grad_(True)
    imp = torch.rand(B, T, device=device, generator=g)

    def step(fn):
        def go():
            fn(sk, sv, tk, tv, importance=imp).backward()
            sk.grad = sv.grad = None
        return go

    rows = compare({"eager": step(kv_ref.kv_loss), "latentfast": step(kv_loss)}, device, baseline="eager")
    backend = "triton" if device.type == "cuda" else "reference (no Triton on CPU)"
    return {"op": "weighted kv_loss fwd+bwd", "B": B, "H": H, "T": T, "d": D,
            "dtype": str(dtype).replace("torch.", ""), "backend": backend, "impls": rows}


def run(device: torch.device, quick: bool) -> list[dict]:
    cases = []
    if quick:
        for T in (256, 1024):
            cases.append(_importance_case(1, 4, 2, T, 64, torch.float32, device))
        cases.append(_kv_loss_case(4, 2, 512, 64, torch.float32, device))
        return cases
    # Qwen2-1.5B student (12 q heads, 2 kv heads) and Qwen2-7B teacher (28 / 4) shapes
    for T in (1024, 4096, 16384):
        cases.append(_importance_case(1, 12, 2, T, 128, torch.bfloat16, device))
    for T in (4096, 16384):
        cases.append(_importance_case(1, 28, 4, T, 128, torch.bfloat16, device))
    cases.append(_kv_loss_case(8, 4, 1024, 128, torch.bfloat16, device))
    return cases
