"""Eager attention-weighted KV loss, as the KV-distillation recipe writes it."""
from __future__ import annotations

import torch


def importance_weights(importance=None, attention_mask=None, *, shape=None) -> torch.Tensor:
    """Per-token weights (B, T) fp32: importance scaled so each sequence's valid tokens
    average 1 (uniform importance -> all ones), zeros on padding. With ``importance``
    None the weights are the valid-token indicator (unweighted loss); ``shape`` (B, T)
    is then needed when ``attention_mask`` is None too."""
    if importance is None and attention_mask is None:
        return torch.ones(shape, dtype=torch.float32)
    ref = importance if importance is not None else attention_mask
    valid = (attention_mask != 0).float() if attention_mask is not None else torch.ones_like(ref, dtype=torch.float32)
    valid = valid.to(ref.device)
    if importance is None:
        return valid
    imp = importance.detach().float() * valid
    n_valid = valid.sum(-1, keepdim=True)
    total = imp.sum(-1, keepdim=True)
    return torch.where(total > 0, imp * n_valid / total.clamp_min(1e-30), valid)


def weighted_sq_error(x, y, w) -> torch.Tensor:
    """``sum w[b, t] * (x - y)**2`` over x, y (B, H, T, d), fp32 scalar."""
    return (w.float()[:, None, :, None] * (x.float() - y.float()).pow(2)).sum()


def kv_loss(student_k, student_v, teacher_k, teacher_v, importance=None, attention_mask=None,
            sample_weight=None) -> torch.Tensor:
    """Weighted MSE(K) + weighted MSE(V): per token the mean squared error over heads
    and head dims, averaged over valid tokens with ``importance_weights``; sample b's
    tokens are scaled by ``sample_weight[b]`` when given (a teacher's per-sample weight)."""
    B, _, T, _ = teacher_k.shape
    w = importance_weights(importance, attention_mask, shape=(B, T)).to(teacher_k.device)
    if sample_weight is not None:
        w = w * sample_weight.detach().float().to(w.device)[:, None]
    n_tok = w.new_tensor(float(B * T)) if attention_mask is None else (attention_mask != 0).sum().float().to(w.device)
    loss = 0.0
    for s, t in ((student_k, teacher_k), (student_v, teacher_v)):
        per_elem = t.shape[1] * t.shape[3]
        loss = loss + weighted_sq_error(s, t, w) / (n_tok.clamp_min(1) * per_elem)
    return loss


def kv_loss_per_sample(student_k, student_v, teacher_k, teacher_v, importance=None, attention_mask=None) -> torch.Tensor:
    """(B,) fp32: sample b's share of ``kv_loss`` (same normalisation), so the shares sum
    to ``kv_loss`` and ``sum_b s_b * share_b`` is ``kv_loss(..., sample_weight=s)``."""
    B, _, T, _ = teacher_k.shape
    w = importance_weights(importance, attention_mask, shape=(B, T)).to(teacher_k.device)
    n_tok = w.new_tensor(float(B * T)) if attention_mask is None else (attention_mask != 0).sum().float().to(w.device)
    out = 0.0
    for s, t in ((student_k, teacher_k), (student_v, teacher_v)):
        err = (s.float() - t.float()).pow(2).sum((1, 3))  # (B, T)
        out = out + (w * err).sum(1) / (n_tok.clamp_min(1) * t.shape[1] * t.shape[3])
    return out
