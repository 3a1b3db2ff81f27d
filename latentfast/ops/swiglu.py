"""SwiGLU MLP that keeps two intermediate tensors for backward instead of four.

Autograd through ``down(silu(gate(x)) * up(x))`` saves ``gate(x)``, ``silu(gate(x))``,
``up(x)`` and their product (four rows x intermediate tensors: the largest activations
of a MiniMind step). This function saves ``gate(x)`` and ``up(x)`` and recomputes the
product in backward (elementwise work, no extra GEMM). ``row_scale`` (one factor per
row) folds the MoE routing weight in before ``down`` (``down`` is linear, so this is
``row_scale * down(h)``) and its gradient comes from the same backward, so the
dispatcher keeps no rows x hidden expert outputs for the weighted sum either.

Same GEMMs as autograd; values and gradients equal ``latentfast.reference.swiglu``
(tested).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w_gate, w_up, w_down, row_scale):
        g, u = F.linear(x, w_gate), F.linear(x, w_up)
        h = F.silu(g).mul_(u)
        if row_scale is not None:
            h.mul_(row_scale.unsqueeze(-1).to(h.dtype))
        ctx.save_for_backward(x, w_gate, w_up, w_down, g, u, row_scale)
        return F.linear(h, w_down)

    @staticmethod
    def backward(ctx, dy):
        x0, wg0, wu0, wd0, g, u, row_scale = ctx.saved_tensors
        cdt = g.dtype  # the compute dtype (bf16 under autocast while weights stay fp32)
        x, w_gate, w_up, w_down, dy = x0.to(cdt), wg0.to(cdt), wu0.to(cdt), wd0.to(cdt), dy.to(cdt)
        s = F.silu(g)
        h = s * u
        dh = dy @ w_down  # d loss / d (scaled h)
        d_scale = None
        if row_scale is not None:
            scale = row_scale.unsqueeze(-1).to(h.dtype)
            if ctx.needs_input_grad[4]:
                d_scale = torch.linalg.vecdot(dh, h).to(row_scale.dtype)
            d_down = dy.t() @ h.mul_(scale) if ctx.needs_input_grad[3] else None
            dh.mul_(scale)
        else:
            d_down = dy.t() @ h if ctx.needs_input_grad[3] else None
        du = dh * s
        dg = torch.ops.aten.silu_backward(dh.mul_(u), g)
        dx = (dg @ w_gate).addmm_(du, w_up).to(x0.dtype) if ctx.needs_input_grad[0] else None
        d_gate = (dg.t() @ x).to(wg0.dtype) if ctx.needs_input_grad[1] else None
        d_up = (du.t() @ x).to(wu0.dtype) if ctx.needs_input_grad[2] else None
        d_down = d_down.to(wd0.dtype) if d_down is not None else None
        return dx, d_gate, d_up, d_down, d_scale


def swiglu_mlp(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
               row_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``down(row_scale * silu(x @ w_gate.T) * (x @ w_up.T))`` for ``x`` (..., H);
    ``row_scale`` has ``x``'s leading shape (or is None)."""
    if x.shape[-1] != w_gate.shape[1] or w_gate.shape != w_up.shape or w_down.shape != w_gate.shape[::-1]:
        raise ValueError(f"swiglu_mlp: expected x (..., H), w_gate/w_up (I, H), w_down (H, I); got x "
                         f"{tuple(x.shape)}, w_gate {tuple(w_gate.shape)}, w_up {tuple(w_up.shape)}, "
                         f"w_down {tuple(w_down.shape)}")
    if row_scale is not None and row_scale.shape != x.shape[:-1]:
        raise ValueError(f"swiglu_mlp: row_scale must have shape {tuple(x.shape[:-1])}, got {tuple(row_scale.shape)}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    rs = row_scale.reshape(-1) if row_scale is not None else None
    return _SwiGLU.apply(x2, w_gate, w_up, w_down, rs).view(*lead, w_down.shape[0])
