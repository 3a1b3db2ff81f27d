"""The loss objects of the RL trainers: the one place a loss type's options are validated.

    loss_fn = GRPOLoss(loss_type="dapo", beta=0.0, epsilon=0.2, ...)   # ValueError naming the flag
    loss, metrics = loss_fn(hidden, weight, bias, ids, mask, advantages, ref=..., old=...)
    DPOLoss(loss_type="sigmoid", beta=0.1, rpo_alpha=None)(hidden, weight, bias, target, ref_c, ref_r)

Both call the fused lm_head engine (``latentfast.ops``): no (B, T, V) logits. Options carry
TRL's names (GRPOConfig / DPOConfig); the checks run when the config is built, so a bad
combination is an argument error before any model loads. torch and the fused ops load at the
first call: building (= validating) a loss needs neither, so parsing stays torch-free.
"""
from __future__ import annotations

from dataclasses import dataclass

from latentfast.choices import DPO_LOSS_TYPES, GRPO_LOSS_TYPES, TOKEN_NORMALISED, check_dpo_options, check_grpo_options

from ..config import check


@dataclass(frozen=True)
class GRPOLoss:
    """The GRPO family (every loss type of the engine) with TRL GRPOConfig's option names."""

    loss_type: str = "dapo"
    beta: float = 0.0
    epsilon: float = 0.2
    epsilon_high: float | None = None
    delta: float | None = None
    importance_sampling_level: str = "token"
    top_entropy_quantile: float = 1.0
    use_bias_correction_kl: bool = False
    max_completion_length: int | None = None
    temperature: float = 1.0
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05
    off_policy_mask_threshold: float | None = None
    entropy_coef: float = 0.0

    def __post_init__(self):
        try:  # the loss type's own options: the engine's one check (choices.check_grpo_options)
            check_grpo_options(self.loss_type, max_completion_length=self.max_completion_length, delta=self.delta,
                               importance_sampling_level=self.importance_sampling_level,
                               top_entropy_quantile=self.top_entropy_quantile,
                               sapo_temperature_pos=self.sapo_temperature_pos,
                               sapo_temperature_neg=self.sapo_temperature_neg)
        except ValueError as e:
            raise ValueError(f"--{e}") from None
        # TRL GRPOConfig's ranges of the shared options
        check(self.beta >= 0, "beta", "a KL coefficient >= 0", self.beta)
        check(self.epsilon > 0, "epsilon", "a clip range > 0", self.epsilon)
        check(self.epsilon_high is None or self.epsilon_high > 0, "epsilon_high", "a clip range > 0 (or unset)",
              self.epsilon_high)
        check(self.delta is None or self.delta > 1, "delta", "a two-sided clip bound > 1 (or unset)", self.delta)
        check(self.loss_type != "luspo" or self.importance_sampling_level == "sequence", "importance_sampling_level",
              "'sequence' with --loss_type luspo (TRL)", self.importance_sampling_level)
        check(self.temperature > 0, "temperature", "a number > 0", self.temperature)

    @property
    def token_normalised(self) -> bool:
        """The loss divides by the step's completion tokens (micro-batch losses add up)."""
        return self.loss_type in TOKEN_NORMALISED

    def __call__(self, hidden, weight, bias, ids, mask, advantages, *, ref=None, old=None, num_items_in_batch=None,
                 return_logps: bool = False):
        """``(loss, metrics)``; with ``return_logps`` also the policy's (B, C) per-token log-probs."""
        from latentfast.ops.grpo_loss import fused_linear_grpo_loss

        eps_high = self.epsilon_high if self.epsilon_high is not None else self.epsilon
        out = fused_linear_grpo_loss(
            hidden, weight, ids, mask, advantages, bias, ref_per_token_logps=ref if self.beta else None,
            old_per_token_logps=old, beta=self.beta, epsilon_low=self.epsilon, epsilon_high=eps_high,
            loss_type=self.loss_type, max_completion_length=self.max_completion_length,
            importance_sampling_level=self.importance_sampling_level, temperature=self.temperature,
            delta=self.delta, use_bias_correction_kl=self.use_bias_correction_kl,
            top_entropy_quantile=self.top_entropy_quantile, num_items_in_batch=num_items_in_batch,
            sapo_temperature_pos=self.sapo_temperature_pos, sapo_temperature_neg=self.sapo_temperature_neg,
            off_policy_mask_threshold=self.off_policy_mask_threshold, entropy_coef=self.entropy_coef,
            return_logps=return_logps)
        return (out[0], dict(out[1]._asdict()), *out[2:])


@dataclass(frozen=True)
class DPOLoss:
    """The DPO family with TRL DPOConfig's names; ``rpo_alpha`` adds alpha x the chosen NLL."""

    loss_type: str = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    rpo_alpha: float | None = None
    discopop_tau: float = 0.05
    average_log_prob: bool = False  # a response's score: mean token log-prob (MiniMind) instead of the sum

    def __post_init__(self):
        check(self.loss_type in DPO_LOSS_TYPES, "loss_type", f"one of {DPO_LOSS_TYPES}", self.loss_type)
        check(self.rpo_alpha is None or self.rpo_alpha >= 0, "rpo_alpha", "a weight >= 0 (or unset)", self.rpo_alpha)
        try:
            check_dpo_options(self.loss_type, self.beta, self.label_smoothing)
        except ValueError as e:
            raise ValueError(f"--loss_type {self.loss_type}: {e}") from None

    def __call__(self, hidden, weight, bias, target, ref_chosen=None, ref_rejected=None, *, ref_hidden=None,
                 ref_weight=None, ref_bias=None):
        """``hidden`` (2B, T, H) chosen rows then rejected rows; ``target`` -100 outside the responses.
        The reference: its log-probs (``ref_chosen``/``ref_rejected``), or its hidden states and head."""
        from latentfast.ops.preference import fused_linear_dpo_loss

        loss, aux = fused_linear_dpo_loss(
            hidden, weight, target, bias, ref_hidden, ref_weight, ref_bias, ref_chosen_logps=ref_chosen,
            ref_rejected_logps=ref_rejected, use_ref_model=ref_chosen is not None or ref_hidden is not None,
            average_log_prob=self.average_log_prob, beta=self.beta, loss_type=self.loss_type,
            label_smoothing=self.label_smoothing, discopop_tau=self.discopop_tau,
            compute_nll_loss=self.rpo_alpha is not None,
            alpha=self.rpo_alpha if self.rpo_alpha is not None else 1.0)
        c, r = aux[5], aux[6]
        return loss, {"rewards/chosen": c.mean(), "rewards/rejected": r.mean(), "rewards/margins": (c - r).mean(),
                      "rewards/accuracies": (c > r).float().mean(), "logps/chosen": aux[0].mean(),
                      "logps/rejected": aux[1].mean(), "nll_loss": aux[4]}


def sequence_logps(hidden, weight, bias, ids, mask):
    """(B,) summed response log-probs (no grad) through the engine's stats sweep."""
    from latentfast.ops.lm_head_engine import lm_head_logps

    tok, _ = lm_head_logps(hidden, weight, ids, bias, mask=mask)
    return (tok * mask).sum(-1)


__all__ = ["DPOLoss", "GRPOLoss", "GRPO_LOSS_TYPES", "DPO_LOSS_TYPES", "sequence_logps"]
