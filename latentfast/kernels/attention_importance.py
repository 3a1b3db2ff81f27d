"""Token importance = column means of the softmax attention matrix, without the matrix.

    importance[b, j] = 1/(H*T) * sum_h sum_i softmax(q_i . k_j * scale + mask)[i, j]

Two passes over Q/K tiles, flash-attention style, so memory is O(B*H*T):
  1. ``_row_lse_kernel``: per query row the log-sum-exp of its scores (skipped when
     the caller already has it from the attention forward: flash-attn / SDPA
     return it).
  2. ``_column_sum_kernel``: one program per (key block, batch*head) walks the query
     blocks that can see those keys and sums exp(s - lse) down each column.
Per-head partial sums (B, H, T) are reduced over heads by the launcher.

Masks: causal (key j visible to query i iff j <= i) and an optional (B, T) padding
mask; padded keys get probability 0 and padded query rows contribute nothing.
GQA: query head h reads key head h // (H // H_kv), as in HF's ``repeat_kv``.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634


@triton.jit
def _row_lse_kernel(
    Q, K, Mask, LSE,
    s_qb, s_qh, s_qt,
    s_kb, s_kh, s_kt,
    s_mb,
    H, T, D, n_rep, scale_log2,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # one flat grid axis (CUDA caps axes 1 and 2 at 65535), token blocks fastest so
    # programs running together share one head's Q/K in L2
    pid = tl.program_id(0)
    n_blocks = tl.cdiv(T, BLOCK_M)
    pid_m = pid % n_blocks
    pid_bh = (pid // n_blocks).to(tl.int64)  # int64: b * stride overflows int32 past 2^31 elements
    b = pid_bh // H
    h = pid_bh % H
    hk = h // n_rep

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q = tl.load(Q + b * s_qb + h * s_qh + offs_m[:, None] * s_qt + offs_d[None, :],
                mask=(offs_m < T)[:, None] & d_ok[None, :], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    # causal: keys past this block's last row are invisible to every row in it
    n_end = T
    if CAUSAL:
        n_end = tl.minimum(T, (pid_m + 1) * BLOCK_M)
    for start_n in range(0, n_end, BLOCK_N):
        offs_n = start_n + offs_n0
        k = tl.load(K + b * s_kb + hk * s_kh + offs_n[:, None] * s_kt + offs_d[None, :],
                    mask=(offs_n < T)[:, None] & d_ok[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale_log2  # log2 domain
        valid = (offs_n < T)[None, :] & (offs_m >= 0)[:, None]
        if CAUSAL:
            valid = valid & (offs_n[None, :] <= offs_m[:, None])
        if HAS_MASK:
            km = tl.load(Mask + b * s_mb + offs_n, mask=offs_n < T, other=0)
            valid = valid & (km != 0)[None, :]
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # avoid (-inf) - (-inf)
        l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), 1)
        m_i = m_new
    # natural-log LSE, like flash-attn / SDPA; -inf for rows that see no key
    lse = tl.where(l_i > 0, (m_i + tl.log2(tl.maximum(l_i, 1e-30))) / 1.4426950408889634, float("-inf"))
    tl.store(LSE + pid_bh * T + offs_m, lse, mask=offs_m < T)


@triton.jit
def _column_sum_kernel(
    Q, K, Mask, LSE, Out,
    s_qb, s_qh, s_qt,
    s_kb, s_kh, s_kt,
    s_mb, s_lb, s_lh, s_lt,
    H, T, D, n_rep, scale_log2,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # one flat grid axis (CUDA caps axes 1 and 2 at 65535), token blocks fastest so
    # programs running together share one head's Q/K in L2
    pid = tl.program_id(0)
    n_blocks = tl.cdiv(T, BLOCK_N)
    pid_n = pid % n_blocks
    pid_bh = (pid // n_blocks).to(tl.int64)  # int64: b * stride overflows int32 past 2^31 elements
    b = pid_bh // H
    h = pid_bh % H
    hk = h // n_rep

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    n_ok = offs_n < T
    k = tl.load(K + b * s_kb + hk * s_kh + offs_n[:, None] * s_kt + offs_d[None, :],
                mask=n_ok[:, None] & d_ok[None, :], other=0.0)
    col_ok = n_ok
    if HAS_MASK:
        km = tl.load(Mask + b * s_mb + offs_n, mask=n_ok, other=0)
        col_ok = col_ok & (km != 0)

    acc = tl.zeros([BLOCK_N], tl.float32)
    # causal: query rows above this key block see none of it
    m_start = 0
    if CAUSAL:
        m_start = (pid_n * BLOCK_N // BLOCK_M) * BLOCK_M
    for start_m in range(m_start, T, BLOCK_M):
        offs_m = start_m + offs_m0
        m_ok = offs_m < T
        q = tl.load(Q + b * s_qb + h * s_qh + offs_m[:, None] * s_qt + offs_d[None, :],
                    mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        lse = tl.load(LSE + b * s_lb + h * s_lh + offs_m * s_lt, mask=m_ok, other=0.0).to(tl.float32)
        row_ok = m_ok & (lse != float("-inf"))  # a row that sees no key has no probabilities
        if HAS_MASK:
            qm = tl.load(Mask + b * s_mb + offs_m, mask=m_ok, other=0)
            row_ok = row_ok & (qm != 0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale_log2
        p = tl.exp2(s - (lse * 1.4426950408889634)[:, None])
        valid = row_ok[:, None] & col_ok[None, :]
        if CAUSAL:
            valid = valid & (offs_n[None, :] <= offs_m[:, None])
        acc += tl.sum(tl.where(valid, p, 0.0), 0)
    tl.store(Out + pid_bh * T + offs_n, acc, mask=n_ok)


def _blocks(T: int, D: int):
    block_d = max(16, triton.next_power_of_2(D))
    if T <= 32:  # tiny sequences (and the interpreter) do not need 64-wide tiles
        return 16, 16, block_d
    return 64, 64, block_d


def _mask_arg(attention_mask, q):
    if attention_mask is None:
        return q, 0, False  # dummy pointer, never read
    m = attention_mask
    if m.dtype == torch.bool:
        m = m.to(torch.int8)
    m = m.contiguous()
    return m, m.stride(0), True


def row_lse(q, k, *, causal=True, attention_mask=None, scale=None) -> torch.Tensor:
    """Natural-log log-sum-exp of every score row, (B, H, T) fp32; needs unit stride in d."""
    B, H, T, D = q.shape
    n_rep = H // k.shape[1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    lse = torch.empty((B, H, T), device=q.device, dtype=torch.float32)
    mask, s_mb, has_mask = _mask_arg(attention_mask, q)
    bm, bn, bd = _blocks(T, D)
    grid = (triton.cdiv(T, bm) * B * H,)
    _row_lse_kernel[grid](
        q, k, mask, lse,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        s_mb, H, T, D, n_rep, scale * _LOG2E,
        CAUSAL=causal, HAS_MASK=has_mask, DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32",
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd,
    )
    return lse


def attention_importance(q, k, *, causal=True, attention_mask=None, lse=None, scale=None) -> torch.Tensor:
    """(B, T) fp32 token importance from q (B, H, T, d) and k (B, H_kv, T, d).

    ``lse`` (B, H, >=T), natural log, is the row log-sum-exp for the same scale and
    masks; pass the one your attention forward returned to skip the first pass.
    Inputs must have unit stride along d (the launchers in ``latentfast.ops`` ensure it).
    """
    B, H, T, D = q.shape
    n_rep = H // k.shape[1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    if lse is None:
        lse = row_lse(q, k, causal=causal, attention_mask=attention_mask, scale=scale)
    partial = torch.empty((B, H, T), device=q.device, dtype=torch.float32)
    mask, s_mb, has_mask = _mask_arg(attention_mask, q)
    bm, bn, bd = _blocks(T, D)
    grid = (triton.cdiv(T, bn) * B * H,)
    _column_sum_kernel[grid](
        q, k, mask, lse, partial,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        s_mb, lse.stride(0), lse.stride(1), lse.stride(2),
        H, T, D, n_rep, scale * _LOG2E,
        CAUSAL=causal, HAS_MASK=has_mask, DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32",
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd,
    )
    # mean over heads and query rows, exactly like the recipe's attn.mean(dim=(1, 2))
    return partial.sum(1).div_(H * T)
