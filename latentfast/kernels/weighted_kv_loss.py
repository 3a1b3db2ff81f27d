"""Token-weighted squared error between student and teacher K (or V) caches.

    loss = sum_{b, h, t, d} w[b, t] * (x[b, h, t, d] - y[b, h, t, d]) ** 2

x, y: (B, H, T, d) in any strides and dtype; w: (B, T) fp32 (already holding the
normalisation, zeros on padding). Forward keeps one fp32 partial per (batch, token
block) -- no (B, H, T, d) temporaries -- and the launcher sums the partials
(deterministic, no atomics). Backward writes dx = 2 * g * w * (x - y) in x's dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _wse_fwd_kernel(
    X, Y, W, Partial,
    s_xb, s_xh, s_xt, s_xd,
    s_yb, s_yh, s_yt, s_yd,
    s_wb, s_wt,
    H, T, D,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)  # flat grid (CUDA caps axes 1 and 2 at 65535): token blocks fastest
    n_t = tl.cdiv(T, BLOCK_T)
    pid_t = pid % n_t
    b = (pid // n_t).to(tl.int64)  # int64: b * stride overflows int32 past 2^31 elements
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d0 = tl.arange(0, BLOCK_D)
    t_ok = offs_t < T
    acc = tl.zeros([BLOCK_T], tl.float32)
    for h in range(H):
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + offs_d0
            ok = t_ok[:, None] & (offs_d < D)[None, :]
            x = tl.load(X + b * s_xb + h * s_xh + offs_t[:, None] * s_xt + offs_d[None, :] * s_xd,
                        mask=ok, other=0.0).to(tl.float32)
            y = tl.load(Y + b * s_yb + h * s_yh + offs_t[:, None] * s_yt + offs_d[None, :] * s_yd,
                        mask=ok, other=0.0).to(tl.float32)
            diff = x - y
            acc += tl.sum(diff * diff, 1)
    w = tl.load(W + b * s_wb + offs_t * s_wt, mask=t_ok, other=0.0).to(tl.float32)
    tl.store(Partial + pid, tl.sum(acc * w, 0))  # pid = b * n_t + pid_t


@triton.jit
def _wse_bwd_kernel(
    X, Y, W, G, DX,
    s_xb, s_xh, s_xt, s_xd,
    s_yb, s_yh, s_yt, s_yd,
    s_wb, s_wt,
    H, T, D,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)  # flat grid, as in the forward
    n_t = tl.cdiv(T, BLOCK_T)
    pid_t = pid % n_t
    bh = (pid // n_t).to(tl.int64)
    b = bh // H
    h = bh % H
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d0 = tl.arange(0, BLOCK_D)
    t_ok = offs_t < T
    g = tl.load(G).to(tl.float32)
    w = tl.load(W + b * s_wb + offs_t * s_wt, mask=t_ok, other=0.0).to(tl.float32)
    coef = 2.0 * g * w
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + offs_d0
        ok = t_ok[:, None] & (offs_d < D)[None, :]
        x = tl.load(X + b * s_xb + h * s_xh + offs_t[:, None] * s_xt + offs_d[None, :] * s_xd,
                    mask=ok, other=0.0).to(tl.float32)
        y = tl.load(Y + b * s_yb + h * s_yh + offs_t[:, None] * s_yt + offs_d[None, :] * s_yd,
                    mask=ok, other=0.0).to(tl.float32)
        dx = coef[:, None] * (x - y)
        # DX is allocated contiguous (B, H, T, D)
        tl.store(DX + ((b * H + h) * T + offs_t[:, None]) * D + offs_d[None, :],
                 dx.to(DX.dtype.element_ty), mask=ok)


def _blocks(T: int, D: int):
    block_d = min(128, max(16, triton.next_power_of_2(D)))
    block_t = 64 if T > 32 else 16
    return block_t, block_d


def weighted_sq_error(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Scalar fp32 ``sum w[b, t] * (x - y)**2`` over (B, H, T, d)."""
    B, H, T, D = x.shape
    bt, bd = _blocks(T, D)
    n_t = triton.cdiv(T, bt)
    partial = torch.empty((B, n_t), device=x.device, dtype=torch.float32)
    _wse_fwd_kernel[(n_t * B,)](
        x, y, w, partial,
        *x.stride(), *y.stride(), *w.stride(),
        H, T, D, BLOCK_T=bt, BLOCK_D=bd,
    )
    return partial.sum()


def weighted_sq_error_backward(x, y, w, grad) -> torch.Tensor:
    """d loss / d x, contiguous (B, H, T, d) in x's dtype (d loss / d y is its negative)."""
    B, H, T, D = x.shape
    bt, bd = _blocks(T, D)
    dx = torch.empty((B, H, T, D), device=x.device, dtype=x.dtype)
    grad = grad.reshape(1).to(torch.float32)
    _wse_bwd_kernel[(triton.cdiv(T, bt) * B * H,)](
        x, y, w, grad, dx,
        *x.stride(), *y.stride(), *w.stride(),
        H, T, D, BLOCK_T=bt, BLOCK_D=bd,
    )
    return dx
