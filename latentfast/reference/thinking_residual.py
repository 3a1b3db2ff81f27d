"""Plain PyTorch ground truth for HRPO's thinking residual (seed notes 000/001).

    h' = p / (||p||_2 + 1e-8),  p = W_p h          (projection=True; else h' = h)
    r  = sigmoid(W_r e + b_r),  i = sigmoid(W_i e + b_i)
    a  = exp(-c * softplus(-Lambda) * r)
    out = a * e + sqrt(1 - a^2 + eps) * (i * h')

This is the recipe's code path written out op by op; every fused kernel is
tested against it.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F

NORM_EPS = 1e-8  # the recipe's ||p|| + 1e-8


def normalize_thinking_state(p: torch.Tensor) -> torch.Tensor:
    return p / (torch.norm(p, dim=-1, keepdim=True) + NORM_EPS)


def lambda_to_a(Lambda: torch.Tensor, r: torch.Tensor, c: float) -> torch.Tensor:
    # threshold=20 as in HRPO's ThinkingResidualLambda
    return torch.exp(-c * F.softplus(-Lambda, beta=1, threshold=20) * r)


def thinking_residual(e, h, W_p, W_r, b_r, W_i, b_i, Lambda, c: float = 8.0, eps: float = 1e-8):
    """Returns ``(out, a)``. ``W_p=None`` means ``h`` is already the normalised state."""
    h_prime = h if W_p is None else normalize_thinking_state(F.linear(h, W_p))
    r = torch.sigmoid(F.linear(e, W_r, b_r))
    i = torch.sigmoid(F.linear(e, W_i, b_i))
    a = lambda_to_a(Lambda, r, c)
    out = a * e + torch.sqrt(1 - a.pow(2) + eps) * (i * h_prime)
    return out, a


def lambda_init(r_min: float, r_max: float, c: float, size: int, generator=None) -> torch.Tensor:
    """HRPO's inverse mapping: draw a_max ~ U(r_min, r_max) and solve
    exp(-c * softplus(-Lambda)) = a_max  =>  Lambda = -log(a_max^(-1/c) - 1)."""
    u = torch.empty(size).uniform_(r_min, r_max, generator=generator)
    return -torch.log(u.pow(-1.0 / c) - 1)


__all__ = ["thinking_residual", "normalize_thinking_state", "lambda_to_a", "lambda_init", "NORM_EPS"]
