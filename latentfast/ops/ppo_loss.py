"""Fused lm_head + MiniMind's sequence-level PPO actor loss (no (B, T, V) logits).

    loss, metrics = fused_linear_ppo_sequence_loss(hidden, lm_head.weight, response_ids, response_mask,
                                                   advantages, old_logps=old, ref_logps=ref,
                                                   clip_epsilon=0.1, kl_coef=0.02)

``advantages`` / ``old_logps`` / ``ref_logps`` are per sequence (B,): the old and reference
values are *sums* of response-token log-probs (``lm_head_logps(...)[0].sum(1)``). The math is
``latentfast.ops.objectives.ppo.PPOSequenceObjective``; the chunk sweep the lm_head engine's.
"""
from __future__ import annotations

import torch

from latentfast.ops._dispatch import check_same_device, check_shape, check_tensor
from latentfast.ops.lm_head_engine import autocast_head, check_head, objective_loss
from latentfast.ops.objectives.ppo import PPOSequenceObjective


def fused_linear_ppo_sequence_loss(_input: torch.Tensor, lin_weight: torch.Tensor, selected_token_ids: torch.Tensor,
                                   attention_mask: torch.Tensor, advantages: torch.Tensor, bias=None, *,
                                   old_logps: torch.Tensor | None = None, ref_logps: torch.Tensor | None = None,
                                   clip_epsilon: float = 0.1, kl_coef: float = 0.02, temperature: float = 1.0,
                                   chunk_size: int | None = None):
    """``(loss, metrics)``; metrics: policy_loss, kl_ref, ratio_mean, clip_frac (detached).
    ``old_logps=None``: ratio 1 (on-policy, gradient of the sequence log-prob)."""
    x, W, b = autocast_head(_input, lin_weight, bias)
    check_tensor("_input", x, ndim=3, float_=True)
    B, T, _ = x.shape
    check_head(x, W, b, selected_token_ids)
    check_shape("attention_mask", attention_mask, (B, T), "(batch, seq_len) of _input")
    for name, t in (("advantages", advantages), ("old_logps", old_logps), ("ref_logps", ref_logps)):
        if t is not None:
            check_tensor(name, t, float_=True)
            check_shape(name, t, (B,), "(batch,): one value per sequence")
    check_same_device(_input=x, attention_mask=attention_mask, advantages=advantages, old_logps=old_logps,
                      ref_logps=ref_logps)
    objective = PPOSequenceObjective(clip_epsilon=float(clip_epsilon), kl_coef=float(kl_coef))
    inputs = {"advantages": advantages.float(), "old": None if old_logps is None else old_logps.float(),
              "ref": None if ref_logps is None else ref_logps.float()}
    return objective_loss(objective, x, W, b, selected_token_ids, attention_mask, inputs, temperature=temperature,
                          chunk_rows=(chunk_size or 0) * T)
