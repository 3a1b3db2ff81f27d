"""GRPO token-level loss on materialized logits: TRL ``GRPOTrainer._compute_loss``.

The ground truth for ``latentfast.ops.grpo_loss``: full (B, T, V) logits in fp32, plain
``log_softmax``, then the GRPO objective (``latentfast.ops.objectives.grpo``, where the
formulas and their conventions are written down) differentiated by autograd. Only for
tests and small shapes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from latentfast.ops.objectives.grpo import LOSS_TYPES, entropy_mask, grpo_setup  # noqa: F401
from latentfast.reference.lm_head_engine import objective_loss


def logps_and_entropy(logits: torch.Tensor, ids: torch.Tensor):
    """Per-token log-prob of ``ids`` and entropy of ``softmax(logits)`` (fp32)."""
    logp_all = F.log_softmax(logits.float(), dim=-1)
    logp = logp_all.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def high_entropy_mask(entropy: torch.Tensor, mask: torch.Tensor, top_entropy_quantile: float) -> torch.Tensor:
    """TRL ``get_high_entropy_mask`` (one implementation: ``objectives.grpo.entropy_mask``)."""
    return entropy_mask(entropy, mask, top_entropy_quantile)


def grpo_loss(
    x: torch.Tensor,
    weight: torch.Tensor,
    selected_token_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    advantages: torch.Tensor,
    bias: torch.Tensor | None = None,
    ref_per_token_logps: torch.Tensor | None = None,
    old_per_token_logps: torch.Tensor | None = None,
    *,
    beta: float = 0.04,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    loss_type: str = "dapo",
    max_completion_length: int | None = None,
    importance_sampling_level: str = "token",
    temperature: float = 1.0,
    delta: float | None = None,
    use_bias_correction_kl: bool = False,
    top_entropy_quantile: float = 1.0,
    vllm_is_ratio: torch.Tensor | None = None,
    num_items_in_batch: float | None = None,
    sampling_per_token_logps: torch.Tensor | None = None,
    **extra,
):
    """Returns ``(loss, metrics)``; ``metrics`` is a dict of scalar tensors
    (kl, entropy, ratio_mean, clip_ratio_low, clip_ratio_high, clip_ratio_region).
    ``extra``: TRL GRPOConfig options (sapo_*, vespo_*, off_policy_mask_threshold, entropy_coef)."""

    def entropy_fn():
        with torch.no_grad():
            logits = x @ weight.t() + (bias if bias is not None else 0)
            return logps_and_entropy(logits.float() / temperature, selected_token_ids)[1]

    objective, inputs = grpo_setup(
        attention_mask, advantages, ref_per_token_logps, old_per_token_logps, beta=beta, epsilon_low=epsilon_low,
        epsilon_high=epsilon_high, loss_type=loss_type, max_completion_length=max_completion_length,
        importance_sampling_level=importance_sampling_level, delta=delta,
        use_bias_correction_kl=use_bias_correction_kl, top_entropy_quantile=top_entropy_quantile,
        vllm_is_ratio=vllm_is_ratio, num_items_in_batch=num_items_in_batch, entropy_fn=entropy_fn,
        sampling_per_token_logps=sampling_per_token_logps, **extra)
    return objective_loss(objective, x, weight, bias, selected_token_ids, attention_mask, inputs,
                          temperature=temperature)
