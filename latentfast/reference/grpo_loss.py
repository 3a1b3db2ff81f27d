"""GRPO token-level loss on materialized logits: TRL ``GRPOTrainer._compute_loss``.

Plain, readable PyTorch: the ground truth for ``latentfast.ops.grpo_loss``. It builds
the full (B, T, V) logits in fp32, so it is only for tests and small shapes.

Semantics (TRL, with Liger's ``LigerFusedLinearGRPOLoss`` conventions where TRL's
trainer does something outside the loss):
  * ``logp = log_softmax((x W^T + b) / temperature)[token]``, entropy of the same softmax.
  * ``coef_1 = exp(logp - old)`` per token, or per sequence (GSPO,
    ``importance_sampling_level="sequence"``: masked mean of the log-ratio).
  * ``coef_2 = clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)``; ``delta`` clamps
    ``coef_1`` from above; ``pg = -min(coef_1 * A, coef_2 * A)``.
  * ``pg *= entropy_mask`` (``top_entropy_quantile < 1``), then ``pg *= vllm_is_ratio``.
  * ``+ beta * k3(ref, logp)`` (times ``coef_1`` with ``use_bias_correction_kl``).
  * normalisation by ``loss_type``; no division by gradient-accumulation steps
    (the trainer's business, as in Liger).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")


def logps_and_entropy(logits: torch.Tensor, ids: torch.Tensor):
    """Per-token log-prob of ``ids`` and entropy of ``softmax(logits)`` (fp32)."""
    logp_all = F.log_softmax(logits.float(), dim=-1)
    logp = logp_all.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def high_entropy_mask(entropy: torch.Tensor, mask: torch.Tensor, top_entropy_quantile: float) -> torch.Tensor:
    """TRL ``get_high_entropy_mask`` on one process: keep tokens at or above the
    ``1 - top_entropy_quantile`` quantile of the completion tokens' entropies."""
    mask = mask.bool()
    values = entropy[mask].float()
    if values.numel() == 0:
        return torch.zeros_like(mask)
    threshold = torch.quantile(values, 1.0 - top_entropy_quantile)
    return ((entropy * mask) >= threshold) & mask


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
):
    """Returns ``(loss, metrics)``; ``metrics`` is a dict of scalar tensors
    (kl, entropy, ratio_mean, clip_ratio_low, clip_ratio_high, clip_ratio_region)."""
    logits = x @ weight.t()
    if bias is not None:
        logits = logits + bias
    logits = logits.float() / temperature
    logp, entropy = logps_and_entropy(logits, selected_token_ids)
    mask = attention_mask.float()
    adv = advantages.float()
    if adv.dim() == 1:
        adv = adv.unsqueeze(1)

    old = logp.detach() if old_per_token_logps is None else old_per_token_logps.float()
    log_ratio = logp - old
    if importance_sampling_level == "token":
        log_w = log_ratio
    elif importance_sampling_level == "sequence":
        log_w = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    else:
        raise ValueError(f"unknown importance_sampling_level {importance_sampling_level!r}")

    coef_1 = torch.exp(log_w)
    coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)
    ratio = coef_1
    if delta is not None:
        coef_1 = torch.clamp(coef_1, max=delta)
    per_token_loss = -torch.min(coef_1 * adv, coef_2 * adv)
    if top_entropy_quantile < 1.0:
        per_token_loss = per_token_loss * high_entropy_mask(entropy.detach(), mask, top_entropy_quantile)
    if vllm_is_ratio is not None:
        vis = vllm_is_ratio.float()
        per_token_loss = per_token_loss * (vis.unsqueeze(-1) if vis.dim() == 1 else vis)

    kl = None
    if beta != 0.0:
        ref = logp.detach() if ref_per_token_logps is None else ref_per_token_logps.float()
        kl = torch.exp(ref - logp) - (ref - logp) - 1
        if use_bias_correction_kl:
            kl = kl * torch.exp(log_w)
        per_token_loss = per_token_loss + beta * kl

    per_token_loss = per_token_loss * mask
    B = mask.shape[0]
    if loss_type == "grpo":
        loss = (per_token_loss.sum(-1) / mask.sum(-1).clamp(min=1.0)).sum() / B
    elif loss_type == "bnpo":
        loss = per_token_loss.sum() / mask.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        loss = per_token_loss.sum() / (B * max_completion_length)
    elif loss_type == "dapo":
        n = mask.sum() if num_items_in_batch is None else torch.as_tensor(float(num_items_in_batch))
        loss = per_token_loss.sum() / n.clamp(min=1.0)
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}")

    with torch.no_grad():
        count = mask.sum().clamp(min=1.0)

        def batch_mean(v):  # TRL's masked_batch_mean: per-sequence values average over sequences
            return v.float().mean() if v.shape[1] == 1 else (v * mask).sum() / count

        low = (ratio < 1 - epsilon_low) & (adv < 0)
        high = (ratio > 1 + epsilon_high) & (adv > 0)
        if delta is not None:  # TRL measures clipping on the delta-clamped coef_1
            low = (coef_1 < 1 - epsilon_low) & (adv < 0)
            high = (coef_1 > 1 + epsilon_high) & (adv > 0)
        metrics = {
            "kl": batch_mean(kl) if kl is not None else torch.zeros(()),
            "entropy": batch_mean(entropy),
            "ratio_mean": batch_mean(ratio),
            "clip_ratio_low": batch_mean(low),
            "clip_ratio_high": batch_mean(high),
            "clip_ratio_region": batch_mean(low | high),
        }
    return loss, metrics
