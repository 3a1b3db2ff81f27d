"""Drop-in for Liger-Kernel's ``LigerFusedLinearGRPOLoss`` (same constructor and
``forward`` arguments, same ``(loss, metrics)`` return), backed by
``latentfast.ops.fused_linear_grpo_loss``.

    loss_fn = FusedLinearGRPOLoss(beta=0.04, loss_type="dapo")
    loss, metrics = loss_fn(hidden, lm_head.weight, completion_ids, completion_mask,
                            advantages, ref_per_token_logps=ref_logps)
    metrics.kl, metrics.clip_ratio_region, metrics.entropy  # also metrics[0], metrics[-1]

Extras over Liger: ``top_entropy_quantile``, TRL's ``off_policy_mask_threshold`` and
``entropy_coef``, MiniMind's ``spo``, the entropy metric, and padding tokens skipped before
the GEMMs. Loss types: grpo, bnpo, dr_grpo, dapo, cispo, sapo, luspo, vespo, spo.
"""
from __future__ import annotations

import torch
from torch import nn

from latentfast.choices import check_grpo_options
from latentfast.ops.grpo_loss import GRPOMetrics, fused_linear_grpo_loss, lm_head_logps

__all__ = ["FusedLinearGRPOLoss", "GRPOMetrics"]



class FusedLinearGRPOLoss(nn.Module):
    """GRPO loss from last hidden states and the lm_head weight, never building logits.

    Args (Liger's, plus ``top_entropy_quantile``):
        beta: KL coefficient (0 skips the reference model). epsilon_low / epsilon_high: clip range.
        loss_type: "grpo" | "bnpo" | "dr_grpo" | "dapo". max_completion_length: for dr_grpo.
        importance_sampling_level: "token" | "sequence". temperature: logits divisor.
        delta: optional upper clamp of the ratio (two-sided clipping).
        use_bias_correction_kl: KL times the importance ratio.
        use_ref_model: when True, ``ref_per_token_logps`` (or ``ref_input``) must be given.
        chunk_size: sequences per chunk; None = about 1 GiB of logits per chunk.
        sapo_temperature_pos/neg, vespo_k_pos/lambda_pos/k_neg/lambda_neg: those loss types' options.
        off_policy_mask_threshold, entropy_coef: TRL GRPOConfig's options of those names.
        compiled: accepted for Liger compatibility, unused.
    """

    def __init__(
        self,
        beta: float = 0.04,
        compiled: bool = True,
        use_ref_model: bool = True,
        chunk_size: int | None = None,
        epsilon_low: float = 0.2,
        epsilon_high: float = 0.2,
        loss_type: str = "dapo",
        max_completion_length: int | None = None,
        importance_sampling_level: str = "token",
        sapo_temperature_pos: float = 1.0,
        sapo_temperature_neg: float = 1.05,
        temperature: float = 1.0,
        delta: float | None = None,
        use_bias_correction_kl: bool = False,
        top_entropy_quantile: float = 1.0,
        vespo_k_pos: float = 2.0,
        vespo_lambda_pos: float = 3.0,
        vespo_k_neg: float = 3.0,
        vespo_lambda_neg: float = 2.0,
        off_policy_mask_threshold: float | None = None,
        entropy_coef: float = 0.0,
    ):
        super().__init__()
        check_grpo_options(loss_type, max_completion_length=max_completion_length, delta=delta,
                           importance_sampling_level=importance_sampling_level,
                           top_entropy_quantile=top_entropy_quantile, sapo_temperature_pos=sapo_temperature_pos,
                           sapo_temperature_neg=sapo_temperature_neg)
        self.beta = beta
        self.compiled = compiled
        self.use_ref_model = use_ref_model
        self.chunk_size = chunk_size
        self.epsilon_low = epsilon_low
        self.epsilon_high = epsilon_high
        self.loss_type = loss_type
        self.max_completion_length = max_completion_length
        self.importance_sampling_level = importance_sampling_level
        self.temperature = temperature
        self.delta = delta
        self.use_bias_correction_kl = use_bias_correction_kl
        self.top_entropy_quantile = top_entropy_quantile
        self.extra = dict(sapo_temperature_pos=sapo_temperature_pos, sapo_temperature_neg=sapo_temperature_neg,
                          vespo_k_pos=vespo_k_pos, vespo_lambda_pos=vespo_lambda_pos, vespo_k_neg=vespo_k_neg,
                          vespo_lambda_neg=vespo_lambda_neg, off_policy_mask_threshold=off_policy_mask_threshold,
                          entropy_coef=entropy_coef)

    def forward(
        self,
        _input: torch.Tensor,
        lin_weight: torch.Tensor,
        selected_token_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        advantages: torch.Tensor,
        bias: torch.Tensor | None = None,
        ref_per_token_logps: torch.Tensor | None = None,
        old_per_token_logps: torch.Tensor | None = None,
        ref_input: torch.Tensor | None = None,
        ref_weight: torch.Tensor | None = None,
        ref_bias: torch.Tensor | None = None,
        vllm_is_ratio: torch.Tensor | None = None,
        num_items_in_batch: float | torch.Tensor | None = None,
        sampling_per_token_logps: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, GRPOMetrics]:
        """_input (B, T, H) completion hidden states; lin_weight (V, H); selected_token_ids,
        attention_mask (B, T); advantages (B,); ref/old_per_token_logps (B, T) or None.
        ``ref_input`` (+ ``ref_weight``/``ref_bias``, default this lm_head): reference hidden
        states, used to compute the reference log-probs (no grad) when ``ref_per_token_logps``
        is None."""
        use_ref = self.beta != 0.0 and self.use_ref_model
        if use_ref and ref_per_token_logps is None:
            if ref_input is None:
                raise ValueError("use_ref_model=True needs ref_per_token_logps or ref_input")
            if ref_weight is None:  # same lm_head (e.g. LoRA reference = adapters disabled)
                ref_weight, ref_bias = lin_weight, bias
            ref_per_token_logps, _ = lm_head_logps(
                ref_input, ref_weight, selected_token_ids, ref_bias, self.temperature, attention_mask,
                self.chunk_size)
        return fused_linear_grpo_loss(
            _input, lin_weight, selected_token_ids, attention_mask, advantages, bias,
            ref_per_token_logps if use_ref else None, old_per_token_logps,
            beta=self.beta, epsilon_low=self.epsilon_low, epsilon_high=self.epsilon_high,
            loss_type=self.loss_type, max_completion_length=self.max_completion_length,
            importance_sampling_level=self.importance_sampling_level, temperature=self.temperature,
            delta=self.delta, use_bias_correction_kl=self.use_bias_correction_kl,
            top_entropy_quantile=self.top_entropy_quantile, vllm_is_ratio=vllm_is_ratio,
            num_items_in_batch=num_items_in_batch, chunk_size=self.chunk_size,
            sampling_per_token_logps=sampling_per_token_logps, **self.extra)
