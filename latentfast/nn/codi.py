"""CODI's losses (Shen et al. 2025, "CODI"): the hidden-state distillation term ``CODILoss``
(also the KV distiller's CODI term) and CODI's whole training loss ``CODIObjective`` on
``latentfast.models.codi.CODIModel``'s hidden states.

At the token right before the answer, the student's hidden state in every selected
layer is pulled towards the teacher's (teacher side detached), and the per-layer
losses are averaged. The original CODI (zhenyi4/codi, ``src/model.py``) uses every
hidden state HF returns -- the embedding output too -- ``smooth_l1`` or ``l2``
(MSE), and with ``--distill_loss_div_std`` divides by the teacher's std at that
position, twice for ``l2``; ``latentfast.reference.codi_loss`` writes that formula
out and the tests hold this module to it. When widths differ (e.g. 1.5B student,
7B teacher) a learnable linear map takes the student to the teacher's width.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from latentfast.choices import CODI_DISTILL_LOSS_TYPES as LOSS_TYPES  # torch-free: the CLI's choices
from latentfast.nn.layer_pairs import layer_pairs

_LOSS = {"smooth_l1": F.smooth_l1_loss, "l2": F.mse_loss, "l1": F.l1_loss}
_STD_POWER = {"smooth_l1": 1, "l2": 2, "l1": 1}  # the original divides an l2 loss by the std twice


class CODILoss(nn.Module):
    """
    Args:
        layers: 'all' = every hidden state incl. the embedding output (the original CODI;
            mean over L + 1) | 'blocks' = every block's output, no embedding (default;
            mean over L) | 'middle' | 'last' | int | list of ints (student blocks).
        loss_type: 'smooth_l1' / 'l2' (the original's) or 'l1'.
        div_std: divide each layer's loss by the teacher's hidden-state std there
            (squared for 'l2', as the original).
        student_dim, teacher_dim: widths; a ``proj`` Linear is created when they differ.
        includes_embedding: hidden-state tuples start with the embedding output (HF).
    """

    def __init__(self, layers="blocks", loss_type: str = "l1", div_std: bool = True,
                 student_dim: int | None = None, teacher_dim: int | None = None,
                 includes_embedding: bool = True):
        super().__init__()
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
        self.layers, self.loss_type, self.div_std = layers, loss_type, bool(div_std)
        self.includes_embedding = includes_embedding
        self.proj = None
        if student_dim is not None and teacher_dim is not None and student_dim != teacher_dim:
            self.proj = nn.Linear(student_dim, teacher_dim, bias=False)

    def _pairs(self, n_student: int, n_teacher: int) -> list[tuple[int, int]]:
        """(student, teacher) indices into the hidden-state tuples."""
        off = 1 if self.includes_embedding else 0
        spec = self.layers.strip().lower() if isinstance(self.layers, str) else self.layers
        blocks = layer_pairs(n_student - off, n_teacher - off, "all" if spec in ("all", "blocks") else spec)
        pairs = [(s + off, t + off) for s, t in blocks]
        return [(0, 0)] + pairs if spec == "all" and off else pairs

    def forward(self, student_hidden, teacher_hidden, student_positions, teacher_positions) -> torch.Tensor:
        """``*_hidden``: tuples of (B, T, D) per layer; ``*_positions``: (B,) index of the
        token before the answer in each student / teacher sequence."""
        pairs = self._pairs(len(student_hidden), len(teacher_hidden))
        b = torch.arange(student_hidden[0].shape[0], device=student_hidden[0].device)
        sp = torch.as_tensor(student_positions, device=b.device)
        tp = torch.as_tensor(teacher_positions, device=teacher_hidden[0].device)
        bt = b.to(tp.device)
        fn, power = _LOSS[self.loss_type], _STD_POWER[self.loss_type]
        losses = []
        for s, t in pairs:
            hs = student_hidden[s][b, sp]
            ht = teacher_hidden[t][bt, tp].detach().to(hs.device)
            if self.proj is not None:
                hs = self.proj(hs.to(self.proj.weight.dtype))
            if hs.shape[-1] != ht.shape[-1]:
                raise ValueError(f"student width {hs.shape[-1]} != teacher width {ht.shape[-1]}: "
                                 "pass student_dim and teacher_dim to create a projection")
            hs, ht = hs.float(), ht.float()
            loss = fn(hs, ht)
            if self.div_std:
                loss = loss / ht.std().clamp_min(1e-6) ** power
            losses.append(loss)
        return torch.stack(losses).mean()


def target_ce(head, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean CE of the target tokens (``targets`` -100: none); ``head`` (the lm_head) runs only
    at those positions, so no B x T x V logits. 0, still in the graph, when there are none."""
    sel = targets != -100
    if not sel.any():
        return hidden.sum() * 0.0
    return F.cross_entropy(head(hidden[sel]).float(), targets[sel])


class CODIObjective(nn.Module):
    """CODI's training loss on ``CODIModel.forward``'s hidden states (``CODIOutput``), the
    original CODI's formula:

        loss = ref_loss_factor * CE(teacher) + CE(student's explicit tokens)
               + distill_loss_factor * CODILoss(student rows vs their teacher rows)

    with the CODILoss options ``distill_layers`` / ``distill_loss_type`` / ``distill_div_std``
    (defaults: the original's 'all', 'smooth_l1', no std). Rows without a student pass
    (pure CoT) get the teacher CE only. ``ref_stats`` adds ``ref_answer_prob``, the teacher's
    probability of the first answer token (the original's ``--print_ref_model_stats``).
    ``forward(out, batch, head) -> (loss, metrics)``; ``head``: the lm_head module."""

    def __init__(self, distill_loss_factor: float = 1.0, ref_loss_factor: float = 1.0, distill_layers="all",
                 distill_loss_type: str = "smooth_l1", distill_div_std: bool = False, ref_stats: bool = False):
        super().__init__()
        self.distill_loss_factor, self.ref_loss_factor, self.ref_stats = distill_loss_factor, ref_loss_factor, ref_stats
        self.distill = CODILoss(layers=distill_layers, loss_type=distill_loss_type, div_std=distill_div_std)

    @torch.no_grad()
    def answer_prob(self, head, final_hidden, batch) -> torch.Tensor:
        """Mean teacher probability of the first answer token, predicted at the token before it."""
        pos = batch["teacher_distill"]
        b = torch.arange(pos.shape[0], device=pos.device)
        p = head(final_hidden[b, pos]).float().softmax(-1)
        return p[b, batch["teacher_ids"][b, pos + 1]].mean()

    def forward(self, out, batch: dict, head):
        ref_ce = target_ce(head, out.teacher_last, batch["teacher_targets"])
        loss = self.ref_loss_factor * ref_ce
        metrics = {"ref_ce": ref_ce.detach()}
        if self.ref_stats:
            metrics["ref_answer_prob"] = self.answer_prob(head, out.teacher_hidden[-1], batch)
        if out.student_hidden is not None:
            ce = target_ce(head, out.student_hidden[-1], batch["student_targets"])
            t_sel = tuple(h[out.student_index] for h in out.teacher_hidden)
            distill = self.distill(out.student_hidden, t_sel, batch["student_distill"],
                                   batch["teacher_distill"][out.student_index])
            loss = loss + ce + self.distill_loss_factor * distill
            metrics.update(ce=ce.detach(), distill=distill.detach())
        if out.aux is not None:
            loss = loss + out.aux.to(loss.dtype)
        metrics["loss"] = loss.detach()
        return loss, metrics
