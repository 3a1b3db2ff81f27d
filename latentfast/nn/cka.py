"""Linear CKA loss between student and teacher hidden states (widths may differ).

    cka = CKALoss(cka_layers="middle")
    loss = cka(student_out.hidden_states, teacher_out.hidden_states, attention_mask)

``1 - CKA`` averaged over the selected layer pairs; CKA is invariant to scale and
rotation, so no projection is needed between a 1536-wide student and a 3584-wide
teacher. Computed in fp32 on the valid tokens, after centering and scaling each
side to unit norm, which keeps the fourth-power HSIC terms in range.
"""
from __future__ import annotations

import torch
from torch import nn

from latentfast.nn.layer_pairs import layer_pairs


def _tokens(h: torch.Tensor, mask) -> torch.Tensor:
    h = h.float()
    if h.dim() == 3:
        h = h[mask.bool()] if mask is not None else h.reshape(-1, h.shape[-1])
    elif h.dim() != 2:
        raise ValueError(f"hidden states must be (batch, seq, dim) or (tokens, dim), got {tuple(h.shape)}")
    return h


def linear_cka(x: torch.Tensor, y: torch.Tensor, attention_mask=None, eps: float = 1e-12) -> torch.Tensor:
    """Linear CKA in [0, 1] between x (B, T, Dx) and y (B, T, Dy) (or (N, Dx), (N, Dy)),
    over the tokens where ``attention_mask`` (B, T) is nonzero. Differentiable in both."""
    x, y = _tokens(x, attention_mask), _tokens(y, attention_mask)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must hold the same tokens, got {x.shape[0]} and {y.shape[0]}")
    x = x - x.mean(0, keepdim=True)
    y = y - y.mean(0, keepdim=True)
    x = x / x.norm().clamp_min(eps)
    y = y / y.norm().clamp_min(eps)
    n = x.shape[0]
    if n < max(x.shape[1], y.shape[1]):  # token Gram matrices are the smaller ones
        kx, ky = x @ x.T, y @ y.T
        xy, xx, yy = (kx * ky).sum(), kx.pow(2).sum(), ky.pow(2).sum()
    else:  # feature cross-covariances: ||Y^T X||^2, ||X^T X||^2, ||Y^T Y||^2
        xy, xx, yy = (y.T @ x).pow(2).sum(), (x.T @ x).pow(2).sum(), (y.T @ y).pow(2).sum()
    return xy / (xx * yy).sqrt().clamp_min(eps)


class CKALoss(nn.Module):
    """Mean over layer pairs of ``1 - CKA(student, teacher)``.

    Args:
        cka_layers: 'middle' | 'last' | 'all' | int | list of ints | "i,j" (student
            blocks; each is paired with the teacher block at the same relative depth).
        includes_embedding: the hidden-state tuples start with the embedding output,
            as HF's ``output_hidden_states=True`` returns them.
    """

    def __init__(self, cka_layers="middle", includes_embedding: bool = True):
        super().__init__()
        self.cka_layers = cka_layers
        self.includes_embedding = includes_embedding

    def forward(self, student_hidden, teacher_hidden, attention_mask=None) -> torch.Tensor:
        off = 1 if self.includes_embedding else 0
        pairs = layer_pairs(len(student_hidden) - off, len(teacher_hidden) - off, self.cka_layers)
        losses = [1.0 - linear_cka(student_hidden[s + off], teacher_hidden[t + off], attention_mask)
                  for s, t in pairs]
        return torch.stack(losses).mean()

    def extra_repr(self) -> str:
        return f"cka_layers={self.cka_layers!r}"
