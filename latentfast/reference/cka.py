"""Linear CKA from its definition (Kornblith et al. 2019), float64 Gram matrices.

    CKA(X, Y) = HSIC(K, L) / sqrt(HSIC(K, K) * HSIC(L, L)),  K = X X^T, L = Y Y^T,
    HSIC(K, L) = tr(K H L H),  H = I - 11^T / n.
"""
from __future__ import annotations

import torch


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x (n, p), y (n, q) -> scalar CKA in float64."""
    x, y = x.double(), y.double()
    n = x.shape[0]
    h = torch.eye(n, dtype=x.dtype, device=x.device) - 1.0 / n
    k, l = x @ x.T, y @ y.T
    hsic = lambda a, b: torch.trace(a @ h @ b @ h)  # noqa: E731
    return hsic(k, l) / torch.sqrt(hsic(k, k) * hsic(l, l))
