"""Per-chunk softmax work of the fused lm_head + GRPO loss.

The op (``latentfast.ops.grpo_loss``) computes a chunk of logits ``L = x_c W^T``
with cuBLAS, then runs two row-wise kernels over it:

  ``logit_stats``  one read of L: online max / sum-exp over V tiles, the chosen
                   token's logit and the entropy -> lse, logp, entropy (fp32).
  ``logit_grad_``  one read + one in-place write of L: with g = dLoss/dlogp per row,
                   ``L <- g * (onehot(id) - softmax(L / T)) / T``, the gradient w.r.t.
                   the logits, which the two backward GEMMs then consume.

Between the two, torch computes g from the chunk's logps (a few (rows,) ops).
Loads are cast to fp32 (the interpreter mis-computes bf16 arithmetic otherwise);
all statistics accumulate in fp32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _logit_stats_kernel(
    L_ptr, stride, ids_ptr, lse_ptr, logp_ptr, ent_ptr, V, inv_t, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = L_ptr + row * stride
    cols = tl.arange(0, BLOCK_V)
    # Running max m, s = sum exp(z - m), t = sum exp(z - m) * (z - m). Keeping t
    # relative to m avoids the cancellation of lse - sum(p z) at |z| ~ 1e4.
    # m starts finite so that 0 * (m_old - m_new) stays 0 on the first tile.
    m = -1e30
    s = 0.0
    t = 0.0
    for off in range(0, V, BLOCK_V):
        idx = off + cols
        z = tl.load(base + idx, mask=idx < V, other=float("-inf")).to(tl.float32) * inv_t
        m_new = tl.maximum(m, tl.max(z, 0))
        a = tl.exp(m - m_new)
        e = tl.exp(z - m_new)
        dz = tl.where(e > 0.0, z - m_new, 0.0)  # 0 for padding lanes (and -inf logits)
        t = a * (t + s * (m - m_new)) + tl.sum(e * dz, 0)
        s = a * s + tl.sum(e, 0)
        m = m_new
    lse = m + tl.log(s)
    target = tl.load(ids_ptr + row)
    z_t = tl.load(base + target).to(tl.float32) * inv_t
    tl.store(lse_ptr + row, lse)
    tl.store(logp_ptr + row, z_t - lse)
    tl.store(ent_ptr + row, tl.log(s) - t / s)


@triton.jit
def _logit_grad_kernel(L_ptr, stride, ids_ptr, lse_ptr, g_ptr, V, inv_t, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = L_ptr + row * stride
    cols = tl.arange(0, BLOCK_V)
    coef = tl.load(g_ptr + row) * inv_t  # d logits/T / d logits = 1/T
    lse = tl.load(lse_ptr + row)
    target = tl.load(ids_ptr + row)
    for off in range(0, V, BLOCK_V):
        idx = off + cols
        valid = idx < V
        z = tl.load(base + idx, mask=valid, other=float("-inf")).to(tl.float32) * inv_t
        p = tl.exp(z - lse)
        grad = tl.where(idx == target, coef - coef * p, -coef * p)
        tl.store(base + idx, grad.to(L_ptr.dtype.element_ty), mask=valid)


def _block_v(V: int, block_v: int | None) -> int:
    return block_v or min(4096, triton.next_power_of_2(V))


def _warps(block_v: int) -> int:
    return 8 if block_v >= 2048 else 4


def logit_stats(logits: torch.Tensor, ids: torch.Tensor, inv_t: float, block_v: int | None = None):
    """Row statistics of ``logits / T``: returns (lse, logp[ids], entropy), fp32, shape (rows,)."""
    R, V = logits.shape
    assert logits.stride(1) == 1 and ids.is_contiguous()
    lse, logp, ent = (torch.empty(R, device=logits.device, dtype=torch.float32) for _ in range(3))
    if R:
        bv = _block_v(V, block_v)
        _logit_stats_kernel[(R,)](logits, logits.stride(0), ids, lse, logp, ent, V, inv_t,
                                  BLOCK_V=bv, num_warps=_warps(bv))
    return lse, logp, ent


def logit_grad_(logits: torch.Tensor, ids: torch.Tensor, lse: torch.Tensor, g: torch.Tensor,
                inv_t: float, block_v: int | None = None) -> torch.Tensor:
    """In place: ``logits <- g * (onehot(ids) - softmax(logits / T)) / T`` (row-wise g)."""
    R, V = logits.shape
    assert logits.stride(1) == 1 and ids.is_contiguous() and g.is_contiguous()
    if R:
        bv = _block_v(V, block_v)
        _logit_grad_kernel[(R,)](logits, logits.stride(0), ids, lse, g, V, inv_t,
                                 BLOCK_V=bv, num_warps=_warps(bv))
    return logits
