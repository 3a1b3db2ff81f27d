"""Fused lm_head distillation losses without student or teacher logits tensors:
Liger's ``LigerFusedLinearJSDLoss`` semantics and MiniMind's ``alpha CE + (1 - alpha) T^2 KL``.
Formulas: ``latentfast.ops.objectives.distill``; sweep: ``latentfast.ops.lm_head_distill``."""
from __future__ import annotations

import torch

from latentfast.ops._dispatch import check_shape, check_tensor
from latentfast.ops.lm_head_distill import distill_loss
from latentfast.ops.lm_head_engine import autocast_head
from latentfast.ops.objectives.distill import JSDObjective


def _prepare(student_input, student_weight, teacher_input, teacher_weight, labels, student_bias, teacher_bias,
             ignore_index):
    xs, ws, bs = autocast_head(student_input, student_weight, student_bias)
    xt, wt, bt = autocast_head(teacher_input, teacher_weight, teacher_bias)
    for name, t in (("student_input", xs), ("teacher_input", xt)):
        check_tensor(name, t, ndim=2, float_=True)
    check_shape("student_weight", ws, (None, xs.shape[1]), "(vocab_size, student hidden)")
    check_shape("teacher_weight", wt, (None, xt.shape[1]), "(teacher vocab_size, teacher hidden)")
    if xt.shape[0] != xs.shape[0]:
        raise ValueError(f"teacher_input must have {xs.shape[0]} rows like student_input, got {xt.shape[0]}")
    if wt.shape[0] < ws.shape[0]:
        raise ValueError(f"the teacher vocabulary ({wt.shape[0]}) must be at least the student's ({ws.shape[0]})")
    check_tensor("true_labels", labels)
    check_shape("true_labels", labels, (xs.shape[0],), "(rows of student_input,)")
    if ws.dtype != xs.dtype or wt.dtype != xt.dtype:
        raise TypeError("each head's input and weight must share one dtype")
    mask = labels != ignore_index
    ids = torch.where(mask, labels, torch.zeros_like(labels)).long()
    V = ws.shape[0]
    if not torch.compiler.is_compiling() and ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= V):
        raise ValueError(f"true_labels must lie in [0, {V}) or equal ignore_index={ignore_index}")
    return xs, ws, bs, xt, wt, bt, ids, mask


def fused_linear_jsd_loss(student_input, student_weight, teacher_input, teacher_weight, true_labels,
                          student_bias=None, teacher_bias=None, *, weight_hard_loss: float = 0.5,
                          weight_soft_loss: float = 0.5, beta: float = 0.5, ignore_index: int = -100,
                          temperature: float = 1.0, chunk_size: int | None = None,
                          return_soft_hard_loss: bool = False, soft_scale: float = 1.0):
    """Generalised JSD distillation (beta 0 = KL(teacher || student), 1 = KL(student || teacher)).
    Inputs (N, H_s) / (N, H_t), ``true_labels`` (N,) with ``ignore_index`` where no loss is taken.
    ``chunk_size``: rows per chunk (None = the per-device default). Returns the loss, or
    ``(loss, soft_loss, hard_loss)`` with ``return_soft_hard_loss``."""
    xs, ws, bs, xt, wt, bt, ids, mask = _prepare(student_input, student_weight, teacher_input, teacher_weight,
                                                 true_labels, student_bias, teacher_bias, ignore_index)
    obj = JSDObjective(beta=float(beta), temperature=float(temperature), weight_hard_loss=float(weight_hard_loss),
                       weight_soft_loss=float(weight_soft_loss), soft_scale=float(soft_scale))
    loss, soft, hard = distill_loss(obj, xs, ws, xt, wt, ids, mask, bs, bt, chunk_rows=int(chunk_size or 0))
    return (loss, soft, hard) if return_soft_hard_loss else loss


def fused_linear_distill_loss(student_input, student_weight, teacher_input, teacher_weight, labels,
                              student_bias=None, teacher_bias=None, *, alpha: float = 0.5, temperature: float = 1.5,
                              ignore_index: int = -100, chunk_size: int | None = None):
    """MiniMind's distillation: ``alpha * CE + (1 - alpha) * T^2 * KL(teacher_T || student_T)``,
    both token means over the tokens whose label is not ``ignore_index``; a larger teacher
    vocabulary is cut to the student's. Returns ``(loss, kd, ce)``."""
    return fused_linear_jsd_loss(student_input, student_weight, teacher_input, teacher_weight, labels, student_bias,
                                 teacher_bias, weight_hard_loss=alpha, weight_soft_loss=1.0 - alpha, beta=0.0,
                                 ignore_index=ignore_index, temperature=temperature, chunk_size=chunk_size,
                                 return_soft_hard_loss=True, soft_scale=float(temperature) ** 2)
