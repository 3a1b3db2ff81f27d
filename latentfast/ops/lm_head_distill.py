"""The lm_head engine's distribution-level mode: objectives that need both heads' full
softmax (distillation). Per chunk of R non-ignored rows:

    L_s = x_s W_s^T (+ b_s)                 student logits, (R, V)
    L_t = x_t W_t^T (+ b_t)   (no grad)     teacher logits, cut to V when the teacher's vocab is larger
    loss_c, vjp = torch.func.vjp(objective.terms, L_s)     the objective, written once
    L_s <- dloss_c / dL_s ; grad_x_s = L_s W_s ; grad_W_s += L_s^T x_s

so neither (N, V) tensor exists and the student's gradients are finished in the forward;
the teacher side gets none (detached).
"""
from __future__ import annotations

from typing import Optional

import torch

from latentfast.ops.lm_head_engine import (_func_enabled, _linear_chunk, chunk_rows_default, objective_from_key,
                                           objective_key)


@torch.library.custom_op("latentfast::lm_head_distill", mutates_args=())
def _distill_fwd(
    xs: torch.Tensor, ws: torch.Tensor, bs: Optional[torch.Tensor], xt: torch.Tensor, wt: torch.Tensor,
    bt: Optional[torch.Tensor], ids: torch.Tensor, mask: torch.Tensor, objective: str, chunk_rows: int,
    need_grad_x: bool, need_grad_weight: bool, need_grad_bias: bool,
) -> list[torch.Tensor]:
    """xs (N, Hs), xt (N, Ht), ids/mask (N,). Returns [loss, soft, hard, grad_xs, grad_ws, grad_bs]."""
    obj = objective_from_key(objective)
    V = ws.shape[0]
    dev = xs.device
    rows_idx = mask.nonzero().squeeze(1)
    n = rows_idx.numel()
    xs2, xt2, ids1 = xs.index_select(0, rows_idx), xt.index_select(0, rows_idx), ids.index_select(0, rows_idx)
    n_valid = torch.tensor(float(max(n, 1)), device=dev)
    # the torch vjp of the divergence keeps ~16 fp32 (R, V) temporaries: 1/16 of the logits budget
    rows = chunk_rows if chunk_rows > 0 else max(16, chunk_rows_default(dev, max(V, wt.shape[0]), 4) // 16)
    loss, soft, hard = (torch.zeros((), device=dev) for _ in range(3))
    grad_x = torch.zeros(n, xs.shape[1], device=dev, dtype=xs.dtype) if need_grad_x else None
    grad_w = torch.zeros_like(ws) if need_grad_weight else None
    grad_b = torch.zeros(V, device=dev) if need_grad_bias else None
    Ls = torch.empty(min(rows, n), V, device=dev, dtype=xs.dtype)
    Lt = torch.empty(min(rows, n), wt.shape[0], device=dev, dtype=xt.dtype)
    for s in range(0, n, rows):
        e = min(s + rows, n)
        x_c = xs2[s:e]
        Lsc = _linear_chunk(x_c, ws, bs, Ls[: e - s])
        Ltc = _linear_chunk(xt2[s:e], wt, bt, Lt[: e - s])[:, :V]  # the student's vocabulary
        ids_c = ids1[s:e]
        with _func_enabled():
            l_c, vjp, aux = torch.func.vjp(
                lambda z: (lambda o: (o[0], (o[1], o[2])))(obj.terms(z, Ltc, ids_c, n_valid)), Lsc.float(),
                has_aux=True)
            g = vjp(torch.ones((), device=dev))[0] if (need_grad_x or need_grad_weight or need_grad_bias) else None
        loss += l_c.detach()
        soft += aux[0].detach()
        hard += aux[1].detach()
        if g is None:
            continue
        Lsc.copy_(g)  # in place: the chunk now holds dloss/dlogits
        if need_grad_x:
            torch.mm(Lsc, ws, out=grad_x[s:e])
        if need_grad_weight:
            grad_w.addmm_(Lsc.t(), x_c)
        if need_grad_bias:
            grad_b += Lsc.sum(0, dtype=torch.float32)
    out_x = (torch.zeros_like(xs).index_copy_(0, rows_idx, grad_x) if need_grad_x else xs.new_empty(0))
    out_w = grad_w if need_grad_weight else ws.new_empty(0)
    out_b = grad_b.to(bs.dtype) if need_grad_bias else ws.new_empty(0)
    return [loss, soft, hard, out_x, out_w, out_b]


@_distill_fwd.register_fake
def _(xs, ws, bs, xt, wt, bt, ids, mask, objective, chunk_rows, need_grad_x, need_grad_weight, need_grad_bias):
    f = lambda: xs.new_empty((), dtype=torch.float32)  # noqa: E731
    return [f(), f(), f(), torch.empty_like(xs) if need_grad_x else xs.new_empty(0),
            torch.empty_like(ws) if need_grad_weight else ws.new_empty(0),
            torch.empty_like(bs) if need_grad_bias else ws.new_empty(0)]


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[3], output[4], output[5])
    ctx.flags = inputs[10:13]


def _backward(ctx, grads):
    g = grads[0]
    gx, gw, gb = ctx.saved_tensors
    nx, nw, nb = ctx.flags
    return (gx * g if nx else None, gw * g if nw else None, gb * g if nb else None, *([None] * 10))


_distill_fwd.register_autograd(_backward, setup_context=_setup_context)


def distill_loss(objective, student_input, student_weight, teacher_input, teacher_weight, ids, mask,
                 student_bias=None, teacher_bias=None, chunk_rows: int = 0):
    """``(loss, soft, hard)`` of a distribution-level ``objective``; inputs (N, H*), ids/mask (N,)."""
    need = (student_input.requires_grad, student_weight.requires_grad,
            student_bias is not None and student_bias.requires_grad)
    if not torch.is_grad_enabled():
        need = (False, False, False)
    tb = None if teacher_bias is None else teacher_bias.detach()
    out = _distill_fwd(student_input, student_weight, student_bias, teacher_input.detach(), teacher_weight.detach(),
                       tb, ids.long(), mask.bool(), objective_key(objective), int(chunk_rows), *need)
    return out[0], out[1].detach(), out[2].detach()
