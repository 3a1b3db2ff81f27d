"""Attention-weighted KV distillation loss (fused forward/backward).

    w = importance_weights(importance, attention_mask)          # mean 1 per sequence
    loss = kv_loss(s_k, s_v, t_k, t_v, importance=imp, attention_mask=mask)

Per layer pair: weighted MSE(K) + weighted MSE(V), where each token's squared error
(mean over heads and head dims) is weighted by its importance normalised to mean 1
over the sequence's valid tokens, so uniform attention gives the plain MSE. The
squared-error reduction is one Triton op (``latentfast::weighted_sq_error``) that
never materializes the (B, H, T, d) difference.
"""
from __future__ import annotations

import torch

from latentfast.ops._dispatch import check_same_device, check_shape, check_tensor, use_triton
from latentfast.reference import kv_loss as _ref
from latentfast.reference.kv_loss import importance_weights  # noqa: F401  (re-exported)


@torch.library.custom_op("latentfast::weighted_sq_error", mutates_args=())
def _wse_op(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    if use_triton(x):
        from latentfast.kernels.weighted_kv_loss import weighted_sq_error  # Triton: optional on CPU

        return weighted_sq_error(x, y, w)
    return _ref.weighted_sq_error(x, y, w)


@_wse_op.register_fake
def _(x, y, w):
    return x.new_empty((), dtype=torch.float32)


@torch.library.custom_op("latentfast::weighted_sq_error_backward", mutates_args=())
def _wse_bwd_op(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    if use_triton(x):
        from latentfast.kernels.weighted_kv_loss import weighted_sq_error_backward  # Triton: optional on CPU

        return weighted_sq_error_backward(x, y, w, grad)
    return (2.0 * grad.float() * w.float()[:, None, :, None] * (x.float() - y.float())).to(x.dtype)


@_wse_bwd_op.register_fake
def _(x, y, w, grad):
    return x.new_empty(x.shape)


def _setup_context(ctx, inputs, output):
    x, y, w = inputs
    ctx.save_for_backward(x, y, w)


def _backward(ctx, grad):
    x, y, w = ctx.saved_tensors
    need_x, need_y, _ = ctx.needs_input_grad
    dx = _wse_bwd_op(x, y, w, grad) if (need_x or need_y) else None
    dy = (-dx).to(y.dtype) if need_y else None
    return (dx if need_x else None), dy, None


_wse_op.register_autograd(_backward, setup_context=_setup_context)


def weighted_sq_error(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``sum_{b,h,t,d} w[b, t] * (x - y)**2`` as an fp32 scalar; x, y (B, H, T, d), w (B, T).
    Differentiable in x and y; ``w`` is treated as a constant."""
    check_tensor("x", x, ndim=4, float_=True)
    check_tensor("y", y, ndim=4, float_=True)
    check_shape("y", y, tuple(x.shape), "same shape as x (batch, heads, seq, head_dim)")
    check_tensor("w", w, ndim=2, float_=True)
    check_shape("w", w, (x.shape[0], x.shape[2]), "(batch, seq) token weights")
    check_same_device(x=x, y=y, w=w)
    return _wse_op(x, y, w.detach().float())


def kv_loss(student_k, student_v, teacher_k, teacher_v, importance=None, attention_mask=None,
            sample_weight=None) -> torch.Tensor:
    """Attention-weighted KV loss for one layer pair, fp32 scalar.

    Args:
        student_k, student_v: (B, H, T, d) student cache, already mapped to the teacher's
            heads/dims (see ``latentfast.nn.KVProjection``).
        teacher_k, teacher_v: (B, H, T, d) teacher cache (usually detached).
        importance: optional (B, T) token importance (``attention_token_importance``);
            None gives the unweighted MSE. Always detached.
        attention_mask: optional (B, T), 1 = token, 0 = padding; padding is ignored.
        sample_weight: optional (B,) constant scale of each sample's tokens (a teacher's
            per-sample weight in multi-teacher distillation; see ``kv_loss_per_sample``).
    """
    for name, t in (("student_k", student_k), ("student_v", student_v), ("teacher_k", teacher_k), ("teacher_v", teacher_v)):
        check_tensor(name, t, ndim=4, float_=True)
    check_shape("student_k", student_k, tuple(teacher_k.shape), "teacher_k's (batch, heads, seq, head_dim); map it with KVProjection")
    check_shape("student_v", student_v, tuple(teacher_v.shape), "teacher_v's (batch, heads, seq, head_dim); map it with KVProjection")
    B, _, T, _ = teacher_k.shape
    if importance is not None:
        check_tensor("importance", importance, ndim=2, float_=True)
        check_shape("importance", importance, (B, T), "(batch, seq)")
    if attention_mask is not None:
        check_tensor("attention_mask", attention_mask, ndim=2)
        check_shape("attention_mask", attention_mask, (B, T), "(batch, seq), 1 = token, 0 = padding")
    if sample_weight is not None:
        check_tensor("sample_weight", sample_weight, ndim=1, float_=True)
        check_shape("sample_weight", sample_weight, (B,), "(batch,) per-sample weights")
    check_same_device(student_k=student_k, teacher_k=teacher_k, importance=importance, attention_mask=attention_mask,
                      sample_weight=sample_weight)

    w = importance_weights(importance, attention_mask, shape=(B, T)).to(teacher_k.device)
    if sample_weight is not None:
        w = w * sample_weight.detach().float()[:, None]
    n_tok = float(B * T) if attention_mask is None else (attention_mask != 0).sum().clamp_min(1).float()
    loss = 0.0
    for s, t in ((student_k, teacher_k), (student_v, teacher_v)):
        # fold the mean's divisor into w: one op, no extra pass
        loss = loss + weighted_sq_error(s, t, w / (n_tok * t.shape[1] * t.shape[3]))
    return loss


@torch.no_grad()
def kv_loss_per_sample(student_k, student_v, teacher_k, teacher_v, importance=None, attention_mask=None) -> torch.Tensor:
    """(B,) fp32 shares of ``kv_loss`` per sample (they sum to it), detached: what a
    teacher router's gradient needs (d/dw_b of sum_b w_b * share_b)."""
    return _ref.kv_loss_per_sample(student_k, student_v, teacher_k, teacher_v, importance, attention_mask)
