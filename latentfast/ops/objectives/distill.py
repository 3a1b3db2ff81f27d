"""Distribution-level distillation objectives, written once (the engine's second mode).

They need both heads' full softmax, so they are plain torch over one chunk of student and
teacher logits (R, V) rather than over per-token statistics: the reference applies them to
full logits, the engine (``lm_head_engine.distill_loss``) to each chunk and differentiates
them there with ``torch.func.vjp`` w.r.t. the student logits alone (teacher detached).

JSD (Liger's ``LigerFusedLinearJSDLoss``): on z_s = student / T, z_t = teacher / T,
  beta 0: KL(teacher || student); beta 1: KL(student || teacher);
  else beta KL(teacher || m) + (1 - beta) KL(student || m), m = beta p_t + (1 - beta) p_s
summed over the vocabulary, summed over non-ignored tokens / their count ("soft");
"hard" = the student's cross-entropy (no temperature) over the same tokens;
loss = weight_hard_loss * hard + weight_soft_loss * soft.
MiniMind's distillation is beta 0 with soft scaled by T^2 (``soft_scale``):
``alpha * CE + (1 - alpha) * T^2 KL``; a teacher vocabulary larger than the student's is
cut to the student's first V entries (``cut_teacher_vocab``).
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from latentfast.ops.lm_head_engine import register_objective


@register_objective
@dataclasses.dataclass(frozen=True)
class JSDObjective:
    beta: float = 0.5
    temperature: float = 1.0
    weight_hard_loss: float = 0.5
    weight_soft_loss: float = 0.5
    soft_scale: float = 1.0  # T^2 for MiniMind's form

    def __post_init__(self):
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {self.beta}")
        if self.temperature == 0:
            raise ValueError("temperature must be nonzero")

    def row_divergence(self, s_logits: torch.Tensor, t_logits: torch.Tensor) -> torch.Tensor:
        s = F.log_softmax(s_logits.float() / self.temperature, dim=-1)
        t = F.log_softmax(t_logits.float() / self.temperature, dim=-1)
        if self.beta == 0:
            return (t.exp() * (t - s)).sum(-1)
        if self.beta == 1:
            return (s.exp() * (s - t)).sum(-1)
        m = torch.logsumexp(torch.stack([s + math.log(1 - self.beta), t + math.log(self.beta)]), dim=0)
        return (self.beta * (t.exp() * (t - m)) + (1 - self.beta) * (s.exp() * (s - m))).sum(-1)

    def terms(self, s_logits, t_logits, ids, n_valid):
        """(loss, soft, hard) of these rows (all valid); n_valid = valid tokens of the batch."""
        soft = self.soft_scale * self.row_divergence(s_logits, t_logits).sum() / n_valid
        hard = (torch.logsumexp(s_logits.float(), -1) - s_logits.float().gather(1, ids[:, None])[:, 0]).sum() / n_valid
        return self.weight_hard_loss * hard + self.weight_soft_loss * soft, soft, hard
