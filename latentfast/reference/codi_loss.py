"""CODI's distillation loss as the original writes it (zhenyi4/codi, ``src/model.py``).

For every hidden state the HF model returns (the embedding output and each block's
output, L + 1 tensors) take the student's and the teacher's vector at the token
before the answer, apply the loss (``smooth_l1`` = ``nn.SmoothL1Loss``, ``l2`` =
``nn.MSELoss``, mean over batch and width), optionally divide by the teacher's std
at that position (over batch and width, unbiased) -- once, and a second time for
``l2`` -- then divide the sum by the number of hidden states. ``l1`` is latentfast's
addition (divided once, like ``smooth_l1``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

LOSSES = {"smooth_l1": F.smooth_l1_loss, "l2": F.mse_loss, "l1": F.l1_loss}


def codi_distill_loss(student_hidden, teacher_hidden, student_positions, teacher_positions,
                      loss_type: str = "smooth_l1", div_std: bool = False) -> torch.Tensor:
    fn = LOSSES[loss_type]
    total = 0
    for out, ref in zip(student_hidden, teacher_hidden):
        ref_sel = ref.gather(1, teacher_positions.view(-1, 1, 1).expand(-1, -1, ref.size(-1)))
        out_sel = out.gather(1, student_positions.view(-1, 1, 1).expand(-1, -1, out.size(-1)))
        tmp = fn(out_sel, ref_sel.detach())
        if div_std:
            if loss_type == "l2":
                tmp = tmp / ref_sel.detach().std()
            tmp = tmp / ref_sel.detach().std()
        total = total + tmp
    return total / len(student_hidden)
