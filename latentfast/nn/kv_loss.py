"""Attention-weighted KV-cache distillation loss with the recipe's warmup.

    kv_loss = AttentionWeightedKVLoss(warmup_steps=1000, use_teacher_attention=False,
                                      projections=KVProjection(2, 128, 4, 128))
    loss = kv_loss(student_kv, teacher_kv, step=global_step,
                   student_attention=(q, k),          # or student_importance=..., or (B,H,T,T)
                   attention_mask=mask)
    if kv_loss.weighting_active(global_step): ...     # compute attention only when needed

Before ``warmup_steps`` the loss is the plain KV MSE (student attention is still
noisy early on, seed note 004); from then on each token is weighted by how much
attention it receives, from the student's attention (default) or the teacher's
(``use_teacher_attention=True``: steadier, recommended for students < 1B).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from latentfast.ops.attention_importance import attention_token_importance
from latentfast.ops.kv_loss import kv_loss, kv_loss_per_sample


def cache_kv(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """[(K, V), ...] per layer, each (B, H_kv, T, d), from an HF cache (``DynamicCache``
    of transformers 5, older ``key_cache``/``value_cache`` caches, or legacy tuples)."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    if hasattr(cache, "key_cache"):
        return list(zip(cache.key_cache, cache.value_cache))
    return [(kv[0], kv[1]) for kv in cache]


class KVProjection(nn.Module):
    """Learnable map of a student K/V cache (B, Hs, T, ds) to the teacher's (B, Ht, T, dt):
    one linear map over the concatenated heads for K, one for V. Identity-initialised
    when the shapes already agree."""

    def __init__(self, student_heads: int, student_head_dim: int, teacher_heads: int, teacher_head_dim: int,
                 bias: bool = False):
        super().__init__()
        self.teacher_heads, self.teacher_head_dim = teacher_heads, teacher_head_dim
        d_in, d_out = student_heads * student_head_dim, teacher_heads * teacher_head_dim
        self.k_proj = nn.Linear(d_in, d_out, bias=bias)
        self.v_proj = nn.Linear(d_in, d_out, bias=bias)
        if d_in == d_out:
            for lin in (self.k_proj, self.v_proj):
                nn.init.eye_(lin.weight)

    def _map(self, lin: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        B, H, T, d = x.shape
        y = lin(x.transpose(1, 2).reshape(B, T, H * d).to(lin.weight.dtype))
        return y.view(B, T, self.teacher_heads, self.teacher_head_dim).transpose(1, 2)

    def forward(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._map(self.k_proj, k), self._map(self.v_proj, v)


def _importance(importance, attention, attention_mask, name):
    if importance is not None:
        return importance.detach()
    if attention is None:
        return None
    if isinstance(attention, (tuple, list)):  # (q, k) or (q, k, lse)
        q, k, *rest = attention
        return attention_token_importance(q, k, attention_mask=attention_mask, lse=rest[0] if rest else None)
    if isinstance(attention, torch.Tensor):
        return attention_token_importance(attention, attention_mask=attention_mask)
    raise TypeError(f"{name} must be a materialized attention tensor or a (q, k[, lse]) tuple, "
                    f"got {type(attention).__name__}")


class AttentionWeightedKVLoss(nn.Module):
    """Mean over layer pairs of weighted MSE(K) + weighted MSE(V).

    Args:
        warmup_steps: unweighted loss while ``step < warmup_steps``.
        use_teacher_attention: weight by the teacher's attention instead of the student's.
        projections: None (shapes already match), one ``KVProjection`` shared by all
            pairs, or a sequence with one per pair.
    """

    def __init__(self, warmup_steps: int = 1000, use_teacher_attention: bool = False,
                 projections: nn.Module | Sequence[nn.Module] | None = None):
        super().__init__()
        self.warmup_steps = int(warmup_steps)
        self.use_teacher_attention = bool(use_teacher_attention)
        if projections is not None and not isinstance(projections, nn.Module):
            projections = nn.ModuleList(projections)
        self.projections = projections
        self.num_steps = 0  # used when forward() gets no step; counts training calls
        self.last_weighted = False

    def weighting_active(self, step: int | None = None) -> bool:
        step = self.num_steps if step is None else step
        return step >= self.warmup_steps

    def status(self, step: int | None = None) -> str:
        """The recipe's log tag: '[Attn-warmup: N steps]' or '[Student-Attn-weighted]'."""
        step = self.num_steps if step is None else step
        if not self.weighting_active(step):
            return f"[Attn-warmup: {self.warmup_steps - step} steps]"
        return "[Teacher-Attn-weighted]" if self.use_teacher_attention else "[Student-Attn-weighted]"

    def _project(self, i: int, k, v):
        p = self.projections
        if p is None:
            return k, v
        if isinstance(p, nn.ModuleList):
            if len(p) <= i:
                raise ValueError(f"{len(p)} projections for more layer pairs (pair {i})")
            p = p[i]
        return p(k, v)

    def forward(self, student_kv, teacher_kv, *, step: int | None = None,
                student_importance=None, teacher_importance=None,
                student_attention=None, teacher_attention=None, attention_mask=None,
                sample_weight=None, return_per_sample: bool = False):
        """
        Args:
            student_kv, teacher_kv: one (K, V) pair or a sequence of them, one per
                distilled layer pair, each (B, H, T, d).
            step: global step (default: this module's own count of training calls).
            student_importance / teacher_importance: (B, T) importance, if precomputed.
            student_attention / teacher_attention: a materialized attention
                (B, H, T, T) / (B, T, T) / (T, T), or a (q, k[, lse]) tuple for the fused
                path; only read once the warmup is over.
            attention_mask: (B, T), 1 = token, 0 = padding.
            sample_weight: optional (B,) constant per-sample scale (a teacher's weights).
            return_per_sample: also return the (B,) detached per-sample shares of the
                unscaled loss (they sum to it), for a teacher router's gradient.
        """
        if isinstance(student_kv[0], torch.Tensor):
            student_kv, teacher_kv = [student_kv], [teacher_kv]
        if len(student_kv) != len(teacher_kv):
            raise ValueError(f"got {len(student_kv)} student and {len(teacher_kv)} teacher layers")
        step = self.num_steps if step is None else step
        if self.training:
            self.num_steps += 1

        importance = None
        if self.weighting_active(step):
            if self.use_teacher_attention:
                importance = _importance(teacher_importance, teacher_attention, attention_mask, "teacher_attention")
                missing = "teacher_attention or teacher_importance (use_teacher_attention=True)"
            else:
                importance = _importance(student_importance, student_attention, attention_mask, "student_attention")
                missing = "student_attention or student_importance"
            if importance is None:
                raise ValueError(f"attention weighting is active (step {step} >= warmup_steps "
                                 f"{self.warmup_steps}) but no {missing} was given")
        self.last_weighted = importance is not None

        losses, shares = [], []
        for i, ((sk, sv), (tk, tv)) in enumerate(zip(student_kv, teacher_kv)):
            sk, sv = self._project(i, sk, sv)
            tk, tv = tk.detach(), tv.detach()
            losses.append(kv_loss(sk, sv, tk, tv, importance=importance, attention_mask=attention_mask,
                                  sample_weight=sample_weight))
            if return_per_sample:
                shares.append(kv_loss_per_sample(sk, sv, tk, tv, importance=importance, attention_mask=attention_mask))
        loss = torch.stack(losses).mean()
        return (loss, torch.stack(shares).mean(0)) if return_per_sample else loss

    def get_extra_state(self):
        return {"num_steps": self.num_steps}

    def set_extra_state(self, state):
        # on resume torch.distributed.checkpoint's set_model_state_dict hands a placeholder
        # (not a dict) for extra state the checkpoint does not hold (checkpoint.save keeps
        # parameters only); trainers pass ``step`` explicitly, so the count is kept as is
        if isinstance(state, dict):
            self.num_steps = int(state.get("num_steps", 0))

    def extra_repr(self) -> str:
        return f"warmup_steps={self.warmup_steps}, use_teacher_attention={self.use_teacher_attention}"
