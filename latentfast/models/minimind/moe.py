"""MiniMind's mixture of experts with a sorted dispatch.

Routing and the auxiliary loss are MiniMind's (a8455ca): softmax scores, top-k, top-k
weights renormalised when ``k > 1 and norm_topk_prob``, sequence- or token-level
balance loss scaled by ``aux_loss_alpha`` (training only), shared experts on the
un-routed input.

Dispatch differs: MiniMind repeats every token ``k`` times and, per expert, indexes the
whole repeated batch with a boolean mask (forward and backward). Here the (token, slot)
pairs are sorted by expert once, each expert runs one GEMM chain on its contiguous slice
with its routing weights folded in before ``down_proj`` (``row_scale``), and one inverse
permutation puts the outputs back for the sum over slots (values and gradients match the
per-expert loop in ``latentfast.reference.minimind_moe`` to fp32 rounding).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def route(x: torch.Tensor, gate_weight: torch.Tensor, top_k: int, norm_topk_prob: bool):
    """(scores N x E, top-k weights N x k, top-k expert ids N x k) for tokens ``x`` (N x H)."""
    scores = F.linear(x, gate_weight).softmax(dim=-1)
    topk_weight, topk_idx = torch.topk(scores, k=top_k, dim=-1, sorted=False)
    if top_k > 1 and norm_topk_prob:
        topk_weight = topk_weight / (topk_weight.sum(dim=-1, keepdim=True) + 1e-20)
    return scores, topk_weight, topk_idx


def balance_loss(scores: torch.Tensor, topk_idx: torch.Tensor, batch_size: int, alpha: float, seq_aux: bool):
    """MiniMind's load-balancing loss. ``scores`` N x E (N = batch_size * seq_len),
    ``topk_idx`` N x k. Expert loads are counts (no gradient); the gradient flows
    through the mean scores.

    seq_aux:   load[b, e] = count(topk == e in row b) / (L * k / E);  alpha * mean_b sum_e load * mean_t scores
    otherwise: load[e] = E * count(topk == e) / (N * k);              alpha * sum_e load * mean_n scores
    """
    n_experts, k = scores.shape[-1], topk_idx.shape[-1]
    if seq_aux:
        idx = topk_idx.reshape(batch_size, -1)
        seq_len = idx.shape[1] // k
        load = torch.zeros(batch_size, n_experts, device=scores.device, dtype=torch.float32)
        load.scatter_add_(1, idx, torch.ones_like(idx, dtype=torch.float32)).div_(seq_len * k / n_experts)
        mean_scores = scores.reshape(batch_size, seq_len, n_experts).mean(dim=1)
        return (load * mean_scores).sum(dim=1).mean() * alpha
    load = torch.bincount(topk_idx.reshape(-1), minlength=n_experts).to(torch.float32)
    load = load / topk_idx.numel() * n_experts
    return (scores.mean(0) * load).sum() * alpha


class _GatherSlots(torch.autograd.Function):
    """``x[order // k]``: each token copied to its ``k`` slots in expert order. Backward
    sums each token's ``k`` slot gradients through the inverse permutation (a gather and
    a sum) instead of autograd's ``index_add`` with repeated indices (slow on CPU)."""

    @staticmethod
    def forward(ctx, x, order, inverse, k):
        ctx.save_for_backward(inverse)
        ctx.k = k
        return x.index_select(0, order // k)

    @staticmethod
    def backward(ctx, g):
        (inverse,) = ctx.saved_tensors
        return g.index_select(0, inverse).view(-1, ctx.k, g.shape[-1]).sum(1), None, None, None


class _Permute(torch.autograd.Function):
    """``y[perm]`` for a permutation ``perm``; backward is the gather by its inverse."""

    @staticmethod
    def forward(ctx, y, perm, inverse):
        ctx.save_for_backward(inverse)
        return y.index_select(0, perm)

    @staticmethod
    def backward(ctx, g):
        (inverse,) = ctx.saved_tensors
        return g.index_select(0, inverse), None, None


def sorted_dispatch(x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor, experts) -> torch.Tensor:
    """sum_j topk_weight[n, j] * experts[topk_idx[n, j]](x[n]) for ``x`` (N x H); each
    expert is called as ``expert(rows, row_scale=weights)``."""
    N, H = x.shape
    k = topk_idx.shape[1]
    flat = topk_idx.reshape(-1)
    order = flat.argsort(stable=True)  # (token, slot) pairs grouped by expert
    counts = torch.bincount(flat, minlength=len(experts)).tolist()  # one host sync per layer
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    grouped = _GatherSlots.apply(x, order, inverse, k).split(counts)
    weights = _Permute.apply(topk_weight.reshape(-1), order, inverse).split(counts)
    # the routing weight rides into each expert (MiniMindMLP's row_scale): no weighted copy of the outputs is kept
    outs = [expert(xe, row_scale=we) for expert, xe, we in zip(experts, grouped, weights) if xe.shape[0]]
    out = _Permute.apply(torch.cat(outs), inverse, order).view(N, k, H).sum(dim=1)
    if torch.is_grad_enabled():  # DDP without find_unused_parameters needs a grad for every expert
        idle = [p for expert, c in zip(experts, counts) if c == 0 for p in expert.parameters() if p.requires_grad]
        if idle:
            out = out + 0 * sum(p.sum() for p in idle).to(out.dtype)
    return out


class MiniMindMoEGate(nn.Module):
    """The router: ``weight`` is E x H (MiniMind's ``mlp.gate.weight``)."""

    def __init__(self, config):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.alpha = config.aux_loss_alpha
        self.seq_aux = config.seq_aux
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, x: torch.Tensor, batch_size: int):
        """(top-k ids, top-k weights, aux loss) for ``x`` (N x H, N = batch_size * seq_len)."""
        scores, topk_weight, topk_idx = route(x, self.weight, self.top_k, self.norm_topk_prob)
        if self.training and self.alpha > 0.0:
            aux = balance_loss(scores, topk_idx, batch_size, self.alpha, self.seq_aux)
        else:
            aux = scores.new_zeros((), dtype=torch.float32)
        return topk_idx, topk_weight, aux


class MiniMindMoE(nn.Module):
    """Routed experts + shared experts; ``forward`` returns ``(y, aux_loss)``."""

    def __init__(self, config, make_expert):
        super().__init__()
        self.experts = nn.ModuleList([make_expert() for _ in range(config.n_routed_experts)])
        self.gate = MiniMindMoEGate(config)
        if config.n_shared_experts > 0:
            self.shared_experts = nn.ModuleList([make_expert() for _ in range(config.n_shared_experts)])
        self.dispatch = sorted_dispatch  # (x, topk_idx, topk_weight, experts) -> y; swappable for comparisons

    def forward(self, x: torch.Tensor):
        B, T, H = x.shape
        flat = x.reshape(-1, H)
        topk_idx, topk_weight, aux = self.gate(flat, B)
        y = self.dispatch(flat, topk_idx, topk_weight, self.experts).view(B, T, H)
        for expert in getattr(self, "shared_experts", ()):
            y = y + expert(x)
        return y, aux
