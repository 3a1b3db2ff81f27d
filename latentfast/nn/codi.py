"""CODI hidden-state distillation loss (Shen et al. 2025, "CODI").

At the token right before the answer, the student's hidden state in every selected
layer is pulled towards the teacher's: L1 (or smooth L1) distance divided by the
teacher's standard deviation in that layer, averaged over layers. The teacher side
is detached. When widths differ (e.g. 1.5B student, 7B teacher) a learnable linear
map takes the student to the teacher's width.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from latentfast.nn.layer_pairs import layer_pairs


class CODILoss(nn.Module):
    """
    Args:
        layers: 'all' (default) | 'middle' | 'last' | int | list of ints (student blocks).
        loss_type: 'l1' or 'smooth_l1'.
        div_std: divide each layer's loss by the teacher's hidden-state std there.
        student_dim, teacher_dim: widths; a ``proj`` Linear is created when they differ.
        includes_embedding: hidden-state tuples start with the embedding output (HF).
    """

    def __init__(self, layers="all", loss_type: str = "l1", div_std: bool = True,
                 student_dim: int | None = None, teacher_dim: int | None = None,
                 includes_embedding: bool = True):
        super().__init__()
        if loss_type not in ("l1", "smooth_l1"):
            raise ValueError(f"loss_type must be 'l1' or 'smooth_l1', got {loss_type!r}")
        self.layers, self.loss_type, self.div_std = layers, loss_type, div_std
        self.includes_embedding = includes_embedding
        self.proj = None
        if student_dim is not None and teacher_dim is not None and student_dim != teacher_dim:
            self.proj = nn.Linear(student_dim, teacher_dim, bias=False)

    def forward(self, student_hidden, teacher_hidden, student_positions, teacher_positions) -> torch.Tensor:
        """``*_hidden``: tuples of (B, T, D) per layer; ``*_positions``: (B,) index of the
        token before the answer in each student / teacher sequence."""
        off = 1 if self.includes_embedding else 0
        pairs = layer_pairs(len(student_hidden) - off, len(teacher_hidden) - off, self.layers)
        b = torch.arange(student_hidden[0].shape[0], device=student_hidden[0].device)
        sp = torch.as_tensor(student_positions, device=b.device)
        tp = torch.as_tensor(teacher_positions, device=teacher_hidden[0].device)
        bt = b.to(tp.device)
        losses = []
        for s, t in pairs:
            hs = student_hidden[s + off][b, sp]
            ht = teacher_hidden[t + off][bt, tp].detach().to(hs.device)
            if self.proj is not None:
                hs = self.proj(hs.to(self.proj.weight.dtype))
            if hs.shape[-1] != ht.shape[-1]:
                raise ValueError(f"student width {hs.shape[-1]} != teacher width {ht.shape[-1]}: "
                                 "pass student_dim and teacher_dim to create a projection")
            hs, ht = hs.float(), ht.float()
            loss = F.l1_loss(hs, ht) if self.loss_type == "l1" else F.smooth_l1_loss(hs, ht)
            if self.div_std:
                loss = loss / ht.std().clamp_min(1e-6)
            losses.append(loss)
        return torch.stack(losses).mean()
