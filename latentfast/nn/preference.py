"""Drop-ins for Liger-Kernel's ``LigerFusedLinearDPOLoss`` (same constructor and
``forward(lin_weight, _input, target, bias=None, ref_input=None, ref_weight=None,
ref_bias=None)``), backed by ``latentfast.ops.fused_linear_dpo_loss``; ``loss_type``
also takes TRL's ``ipo``, and ``forward`` precomputed ``ref_chosen_logps`` /
``ref_rejected_logps``. Also ``LigerFusedLinearSimPOLoss`` / ``LigerFusedLinearORPOLoss``
(``forward(lin_weight, _input, target, bias=None[, nll_target=None])``).

    loss_fn = FusedLinearDPOLoss(beta=0.1, average_log_prob=True)   # MiniMind's DPO
    loss, aux = loss_fn(lm_head.weight, hidden, labels, ref_input=ref_hidden)
"""
from __future__ import annotations

from torch import nn

from latentfast.ops.objectives.preference import check_dpo_options
from latentfast.ops.preference import fused_linear_dpo_loss, fused_linear_orpo_loss, fused_linear_simpo_loss

__all__ = ["FusedLinearDPOLoss", "FusedLinearSimPOLoss", "FusedLinearORPOLoss"]


class FusedLinearDPOLoss(nn.Module):
    """Args (Liger's): ignore_index, beta, alpha (NLL weight), compute_nll_loss (RPO),
    compiled (accepted, unused), use_ref_model, average_log_prob, chunk_size (pairs per
    chunk; None = per-device default), loss_type, label_smoothing, discopop_tau."""

    def __init__(self, ignore_index: int = -100, beta: float = 0.1, alpha: float = 1.0,
                 compute_nll_loss: bool = False, compiled: bool = True, use_ref_model: bool = True,
                 average_log_prob: bool = False, chunk_size: int | None = None, loss_type: str = "sigmoid",
                 label_smoothing: float = 0.0, discopop_tau: float = 0.05):
        super().__init__()
        check_dpo_options(loss_type, beta, label_smoothing)
        self.ignore_index = ignore_index
        self.beta = beta
        self.alpha = alpha
        self.compute_nll_loss = compute_nll_loss
        self.compiled = compiled
        self.use_ref_model = use_ref_model
        self.average_log_prob = average_log_prob
        self.chunk_size = chunk_size
        self.loss_type = loss_type
        self.label_smoothing = label_smoothing
        self.discopop_tau = discopop_tau

    def forward(self, lin_weight, _input, target, bias=None, ref_input=None, ref_weight=None, ref_bias=None,
                ref_chosen_logps=None, ref_rejected_logps=None):
        return fused_linear_dpo_loss(
            _input, lin_weight, target, bias, ref_input, ref_weight, ref_bias, ref_chosen_logps=ref_chosen_logps,
            ref_rejected_logps=ref_rejected_logps, ignore_index=self.ignore_index, beta=self.beta, alpha=self.alpha,
            compute_nll_loss=self.compute_nll_loss, use_ref_model=self.use_ref_model,
            average_log_prob=self.average_log_prob, loss_type=self.loss_type,
            label_smoothing=self.label_smoothing, discopop_tau=self.discopop_tau, chunk_size=self.chunk_size)


class FusedLinearSimPOLoss(nn.Module):
    """Liger's constructor: ignore_index, beta, alpha, label_smoothing, compute_nll_loss,
    compiled (unused), gamma, chunk_size (pairs per chunk; None = per-device default)."""

    def __init__(self, ignore_index: int = -100, beta: float = 0.1, alpha: float = 1.0, label_smoothing: float = 0.0,
                 compute_nll_loss: bool = True, compiled: bool = True, gamma: float = 0.5,
                 chunk_size: int | None = None):
        super().__init__()
        self.ignore_index, self.beta, self.alpha, self.label_smoothing = ignore_index, beta, alpha, label_smoothing
        self.compute_nll_loss, self.compiled, self.gamma, self.chunk_size = compute_nll_loss, compiled, gamma, chunk_size

    def forward(self, lin_weight, _input, target, bias=None):
        return fused_linear_simpo_loss(_input, lin_weight, target, bias, ignore_index=self.ignore_index,
                                       beta=self.beta, alpha=self.alpha, label_smoothing=self.label_smoothing,
                                       compute_nll_loss=self.compute_nll_loss, gamma=self.gamma,
                                       chunk_size=self.chunk_size)


class FusedLinearORPOLoss(nn.Module):
    """Liger's constructor: ignore_index, beta, compute_nll_loss, compiled (unused), chunk_size."""

    def __init__(self, ignore_index: int = -100, beta: float = 0.1, compute_nll_loss: bool = True,
                 compiled: bool = True, chunk_size: int | None = None):
        super().__init__()
        self.ignore_index, self.beta, self.compute_nll_loss = ignore_index, beta, compute_nll_loss
        self.compiled, self.chunk_size = compiled, chunk_size

    def forward(self, lin_weight, _input, target, bias=None, nll_target=None):
        return fused_linear_orpo_loss(_input, lin_weight, target, bias, ignore_index=self.ignore_index,
                                      beta=self.beta, compute_nll_loss=self.compute_nll_loss, nll_target=nll_target,
                                      chunk_size=self.chunk_size)
