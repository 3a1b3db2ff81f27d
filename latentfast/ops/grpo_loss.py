"""Fused lm_head + GRPO token-level loss that never materializes the (B, T, V) logits.

    loss, metrics = fused_linear_grpo_loss(hidden, lm_head.weight, completion_ids,
                                           completion_mask, advantages,
                                           ref_per_token_logps=ref, beta=0.04)
    loss.backward()          # grads for hidden, lm_head.weight (and bias)

The GRPO math is ``latentfast.ops.objectives.grpo.GRPOObjective`` (written once; the
reference differentiates the same code by autograd); the chunk sweep, the GEMMs and the
in-place logit gradient are the lm_head engine's (``latentfast.ops.lm_head_engine``):
three GEMMs, gradients finished in the forward, peak extra memory one (R, V) chunk plus
grad_W. ``top_entropy_quantile < 1`` needs every token's entropy before any gradient, so
it adds one no-grad stats sweep (one more GEMM); everything else (sequence-level ratios
included: chunks then hold whole sequences) is one sweep.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from latentfast.ops._dispatch import check_same_device, check_shape, check_tensor, use_triton  # noqa: F401
from latentfast.ops.lm_head_engine import (  # noqa: F401  (re-exported: tests, benchmarks)
    _backends, _torch_logit_grad_, _torch_logit_stats, autocast_head, check_head, lm_head_logps, objective_loss)
from latentfast.ops.objectives.grpo import LOSS_TYPES, grpo_setup  # noqa: F401  (LOSS_TYPES re-exported)

_autocast, _check_head = autocast_head, check_head


class GRPOMetrics(NamedTuple):
    """Scalar tensors users log. Ordered so Liger/TRL positional use still works:
    ``metrics[0]`` is the mean KL (0 when beta == 0), ``metrics[-1]`` the region clip ratio."""

    kl: torch.Tensor
    entropy: torch.Tensor
    ratio_mean: torch.Tensor
    clip_ratio_low: torch.Tensor
    clip_ratio_high: torch.Tensor
    clip_ratio_region: torch.Tensor


def check_grpo_inputs(x, weight, bias, ids, mask, advantages, old, ref, vllm_is_ratio, sampling=None):
    check_tensor("_input", x, ndim=3, float_=True)
    B, T, H = x.shape
    check_head(x, weight, bias, ids)
    check_tensor("attention_mask", mask)
    check_shape("attention_mask", mask, (B, T), "(batch, seq_len) of _input")
    check_tensor("advantages", advantages, float_=True)
    if not (advantages.shape == (B,) or advantages.shape == (B, T)):
        raise ValueError(f"advantages must have shape ({B},) or ({B}, {T}), got {tuple(advantages.shape)}")
    for name, t in (("old_per_token_logps", old), ("ref_per_token_logps", ref), ("sampling_per_token_logps", sampling)):
        if t is not None:
            check_tensor(name, t, float_=True)
            check_shape(name, t, (B, T), "(batch, seq_len) of _input")
    if vllm_is_ratio is not None:
        check_tensor("vllm_is_ratio", vllm_is_ratio, float_=True)
        if vllm_is_ratio.shape not in ((B,), (B, 1), (B, T)):
            raise ValueError(f"vllm_is_ratio must have shape ({B},), ({B}, 1) or ({B}, {T}), "
                             f"got {tuple(vllm_is_ratio.shape)}")
    check_same_device(_input=x, attention_mask=mask, advantages=advantages, old_per_token_logps=old,
                      ref_per_token_logps=ref, vllm_is_ratio=vllm_is_ratio)


def fused_linear_grpo_loss(
    _input: torch.Tensor,
    lin_weight: torch.Tensor,
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
    num_items_in_batch: float | torch.Tensor | None = None,
    chunk_size: int | None = None,
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
    vespo_k_pos: float = 2.0,
    vespo_lambda_pos: float = 3.0,
    vespo_k_neg: float = 3.0,
    vespo_lambda_neg: float = 2.0,
    off_policy_mask_threshold: float | None = None,
    entropy_coef: float = 0.0,
    sampling_per_token_logps: torch.Tensor | None = None,
    return_logps: bool = False,
) -> tuple[torch.Tensor, GRPOMetrics]:
    """GRPO loss straight from the last hidden states (TRL GRPOTrainer semantics).

    Args:
        _input: (B, T, H) hidden states of the completion positions (the ones that predict
            ``selected_token_ids``), fp32/bf16/fp16.
        lin_weight: (V, H) lm_head weight (same dtype); ``bias``: optional (V,).
        selected_token_ids: (B, T) completion token ids. attention_mask: (B, T) completion
            mask (nonzero = token counts; binary).
        advantages: (B,) or (B, T). ref/old_per_token_logps: optional (B, T).
        loss_type: grpo | bnpo | dr_grpo (needs max_completion_length) | dapo (normaliser =
            completion tokens of the global batch: pass TRL's ``num_items_in_batch`` under
            DDP / gradient accumulation) | cispo | sapo | luspo | vespo (TRL) | spo (MiniMind's
            ``-logp A``). Per-token (B, T) advantages give PPO's clipped term (GAE).
        importance_sampling_level: "token" or "sequence" (GSPO). delta: two-sided clip.
        top_entropy_quantile: < 1 trains only on the highest-entropy tokens (TRL).
        vllm_is_ratio: (B,), (B, 1) or (B, T) rollout importance weights.
        chunk_size: sequences per chunk (Liger's meaning); None = the per-device default.
        sapo_temperature_pos/neg, vespo_k_pos/lambda_pos/k_neg/lambda_neg,
        off_policy_mask_threshold, entropy_coef: TRL GRPOConfig's options of those names;
        sampling_per_token_logps: the rollout engine's log-probs for the off-policy mask
        (default: old_per_token_logps).
        return_logps: also return the detached (B, T) per-token log-probs (0 on padding).
    Returns:
        (loss, GRPOMetrics(kl, entropy, ratio_mean, clip_ratio_low, clip_ratio_high,
        clip_ratio_region)), metrics detached (+ the log-probs with ``return_logps``).
    """
    x, W, bias = autocast_head(_input, lin_weight, bias)
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    check_grpo_inputs(x, W, bias, selected_token_ids, attention_mask, advantages, old_per_token_logps,
                      ref_per_token_logps, vllm_is_ratio, sampling_per_token_logps)
    T = x.shape[1]
    objective, inputs = grpo_setup(
        attention_mask, advantages, ref_per_token_logps, old_per_token_logps, beta=beta, epsilon_low=epsilon_low,
        epsilon_high=epsilon_high, loss_type=loss_type, max_completion_length=max_completion_length,
        importance_sampling_level=importance_sampling_level, delta=delta,
        use_bias_correction_kl=use_bias_correction_kl, top_entropy_quantile=top_entropy_quantile,
        vllm_is_ratio=vllm_is_ratio, num_items_in_batch=num_items_in_batch,
        entropy_fn=lambda: lm_head_logps(x, W, selected_token_ids, bias, temperature, attention_mask,
                                         chunk_size)[1],
        sampling_per_token_logps=sampling_per_token_logps, sapo_temperature_pos=sapo_temperature_pos,
        sapo_temperature_neg=sapo_temperature_neg, vespo_k_pos=vespo_k_pos, vespo_lambda_pos=vespo_lambda_pos,
        vespo_k_neg=vespo_k_neg, vespo_lambda_neg=vespo_lambda_neg,
        off_policy_mask_threshold=off_policy_mask_threshold, entropy_coef=entropy_coef)
    out = objective_loss(objective, x, W, bias, selected_token_ids, attention_mask, inputs,
                         temperature=temperature, chunk_rows=(chunk_size or 0) * T, return_logps=return_logps)
    return (out[0], GRPOMetrics(**out[1]), *out[2:])
