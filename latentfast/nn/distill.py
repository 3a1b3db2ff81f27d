"""Drop-in for Liger-Kernel's ``LigerFusedLinearJSDLoss`` (same constructor and
``forward(student_input, student_weight, teacher_input, teacher_weight, true_labels,
student_bias=None, teacher_bias=None)``), backed by ``latentfast.ops.fused_linear_jsd_loss``."""
from __future__ import annotations

from torch import nn

from latentfast.ops.distill import fused_linear_jsd_loss

__all__ = ["FusedLinearJSDLoss"]


class FusedLinearJSDLoss(nn.Module):
    """Args (Liger's): weight_hard_loss, weight_soft_loss, beta (0 forward KL, 1 reverse KL,
    between JSD), ignore_index, temperature, compiled (accepted, unused), chunk_size (rows per
    chunk; None = per-device default), return_soft_hard_loss."""

    def __init__(self, weight_hard_loss: float = 0.5, weight_soft_loss: float = 0.5, beta: float = 0.5,
                 ignore_index: int = -100, temperature: float = 1.0, compiled: bool = True,
                 chunk_size: int | None = None, return_soft_hard_loss: bool = False):
        super().__init__()
        if temperature == 0:
            raise ValueError("temperature must be nonzero")
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {beta}")
        self.weight_hard_loss = weight_hard_loss
        self.weight_soft_loss = weight_soft_loss
        self.beta = beta
        self.ignore_index = ignore_index
        self.temperature = temperature
        self.compiled = compiled
        self.chunk_size = chunk_size
        self.return_soft_hard_loss = return_soft_hard_loss

    def forward(self, student_input, student_weight, teacher_input, teacher_weight, true_labels, student_bias=None,
                teacher_bias=None):
        return fused_linear_jsd_loss(
            student_input, student_weight, teacher_input, teacher_weight, true_labels, student_bias, teacher_bias,
            weight_hard_loss=self.weight_hard_loss, weight_soft_loss=self.weight_soft_loss, beta=self.beta,
            ignore_index=self.ignore_index, temperature=self.temperature, chunk_size=self.chunk_size,
            return_soft_hard_loss=self.return_soft_hard_loss)
