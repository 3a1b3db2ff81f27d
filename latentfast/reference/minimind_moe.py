"""Plain PyTorch ground truth for MiniMind's MoE (the a8455ca training path).

``moe_loop`` is the per-expert loop MiniMind trains with: every token repeated ``k``
times, each expert applied to the rows a boolean mask selects, outputs weighted and
summed over the ``k`` slots. ``balance_loss_plain`` spells the balance loss out with
Python loops. Both exist to test ``latentfast.models.minimind.moe`` and as the eager
baseline in the benchmark; nothing trains through them.
"""
from __future__ import annotations

import torch


def moe_loop(x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor, experts) -> torch.Tensor:
    """sum_j w[n, j] * experts[idx[n, j]](x[n]) the way MiniMind's training forward runs it."""
    N, H = x.shape
    k = topk_idx.shape[1]
    flat = topk_idx.reshape(-1)
    rep = x.repeat_interleave(k, dim=0)
    y = torch.empty_like(rep)
    for i, expert in enumerate(experts):
        sel = flat == i
        out = expert(rep[sel])
        if out.shape[0] > 0:
            y[sel] = out.to(y.dtype)
        else:  # keep the idle expert in the graph (DDP)
            y[sel] = out.to(y.dtype) + 0 * sum(p.sum() for p in expert.parameters())
    return (y.view(N, k, H) * topk_weight.unsqueeze(-1)).sum(dim=1)


def balance_loss_plain(scores: torch.Tensor, topk_idx: torch.Tensor, batch_size: int, alpha: float,
                       seq_aux: bool) -> torch.Tensor:
    """The balance loss with explicit loops (scores N x E, topk_idx N x k)."""
    N, E = scores.shape
    k = topk_idx.shape[1]
    if seq_aux:
        L = N // batch_size
        total = scores.new_zeros(())
        for b in range(batch_size):
            rows = slice(b * L, (b + 1) * L)
            for e in range(E):
                count = float((topk_idx[rows] == e).sum())
                load = count / (L * k / E)
                total = total + load * scores[rows, e].mean()
        return total / batch_size * alpha
    total = scores.new_zeros(())
    for e in range(E):
        f = float((topk_idx == e).sum()) / (N * k) * E
        total = total + f * scores[:, e].mean()
    return total * alpha
