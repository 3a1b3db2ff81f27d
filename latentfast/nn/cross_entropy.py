"""Drop-in for Liger-Kernel's ``LigerFusedLinearCrossEntropyLoss`` (same constructor and
``forward(lin_weight, _input, target, bias=None)``), backed by
``latentfast.ops.fused_linear_cross_entropy``; ``forward`` also takes per-token
``loss_weights`` and HF's ``num_items_in_batch``.

    loss_fn = FusedLinearCrossEntropyLoss(ignore_index=-100)
    loss = loss_fn(lm_head.weight, hidden.view(-1, H), labels.view(-1))
"""
from __future__ import annotations

import torch
from torch import nn

from latentfast.ops.cross_entropy import CrossEntropyOutput, _check_ce_args, fused_linear_cross_entropy

__all__ = ["FusedLinearCrossEntropyLoss", "CrossEntropyOutput"]


class FusedLinearCrossEntropyLoss(nn.Module):
    def __init__(
        self,
        ce_weight: torch.Tensor | None = None,
        ignore_index: int = -100,
        lse_square_scale: float = 0.0,
        label_smoothing: float = 0.0,
        reduction: str = "mean",
        softcap: float | None = None,
        return_z_loss: bool = False,
        accum_dtype: torch.dtype | None = None,
        use_token_scaling: bool = False,
        return_token_accuracy: bool = False,
        return_predicted_tokens: bool = False,
        chunk_size: int | None = None,
    ):
        super().__init__()
        _check_ce_args(reduction, softcap, label_smoothing, return_token_accuracy, return_predicted_tokens)
        self.ce_weight = ce_weight
        self.ignore_index = ignore_index
        self.lse_square_scale = lse_square_scale
        self.label_smoothing = label_smoothing
        self.reduction = reduction
        self.softcap = softcap
        self.return_z_loss = return_z_loss
        self.accum_dtype = accum_dtype
        self.use_token_scaling = use_token_scaling
        self.return_token_accuracy = return_token_accuracy
        self.return_predicted_tokens = return_predicted_tokens
        self.chunk_size = chunk_size

    def forward(self, lin_weight, _input, target, bias=None, loss_weights=None, num_items_in_batch=None):
        return fused_linear_cross_entropy(
            _input, lin_weight, target, bias, self.ce_weight, self.ignore_index, self.lse_square_scale,
            self.label_smoothing, self.reduction, self.softcap, self.return_z_loss, self.accum_dtype,
            self.use_token_scaling, self.return_token_accuracy, self.return_predicted_tokens,
            loss_weights=loss_weights, num_items_in_batch=num_items_in_batch, chunk_size=self.chunk_size)
