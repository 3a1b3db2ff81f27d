"""Eager token importance, as the KV-distillation recipe computes it.

The recipe runs the model with ``output_attentions=True`` and takes
``attn.detach().mean(dim=(1, 2))``: the mean over heads and query rows of the full
(B, H, T, T) probability matrix, zeros above the causal diagonal included.
"""
from __future__ import annotations

import math

import torch


def eager_attention_probs(q, k, *, causal=True, attention_mask=None, scale=None) -> torch.Tensor:
    """Materialized softmax attention (B, H, T, T) in fp32, HF-eager style (repeat_kv for
    GQA, fp32 softmax). Padded keys get probability 0; padded query rows are all zero."""
    B, H, T, D = q.shape
    n_rep = H // k.shape[1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    k = k.repeat_interleave(n_rep, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * scale
    allowed = torch.ones(T, T, dtype=torch.bool, device=q.device)
    if causal:
        allowed = torch.tril(allowed)
    allowed = allowed.expand(B, 1, T, T)
    if attention_mask is not None:
        keep = attention_mask.bool()
        allowed = allowed & keep[:, None, None, :]
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows with no visible key -> 0
    if attention_mask is not None:
        probs = probs * attention_mask.bool()[:, None, :, None]
    return probs


def token_importance_from_attention(attn: torch.Tensor, attention_mask=None) -> torch.Tensor:
    """The recipe's 4D/3D/2D forms: (B, H, T, T) -> mean over heads and rows;
    (B, T, T) -> mean over rows; (T, T) -> mean over rows, returned as (1, T).
    With ``attention_mask`` (B, T), padded query rows and key columns are zeroed first."""
    attn = attn.detach().float()
    if attn.dim() == 2:
        attn = attn[None, None]
    elif attn.dim() == 3:
        attn = attn[:, None]
    if attention_mask is not None:
        keep = attention_mask.bool().to(attn.device)
        attn = attn * keep[:, None, :, None] * keep[:, None, None, :]
    return attn.mean(dim=(1, 2))


def attention_token_importance(q, k, *, causal=True, attention_mask=None, lse=None, scale=None) -> torch.Tensor:
    """(B, T) fp32 importance through the materialized matrix (``lse`` is not needed here)."""
    probs = eager_attention_probs(q.detach(), k.detach(), causal=causal, attention_mask=attention_mask, scale=scale)
    return probs.mean(dim=(1, 2))
