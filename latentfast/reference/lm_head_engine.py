"""Any lm_head-engine objective on materialized logits: the ground truth of the fused engine.

Builds the full (B, T, V) logits in fp32, takes the per-token statistics with plain
``log_softmax``, and hands them to the *same* objective object the fused op runs, so
autograd differentiates the objective here while the engine uses ``torch.func`` on it.
Only for tests and small shapes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from latentfast.ops.lm_head_engine import Objective, Rows, gather_inputs, select_rows


def logits_stats(logits: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0, softcap: float | None = None):
    """Per-token statistics of ``z = softcap(logits) / temperature`` (fp32): log-prob of
    ``ids``, entropy, log-sum-exp and the sum of z over the vocabulary."""
    z = logits.float()
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    z = z / temperature
    logp_all = F.log_softmax(z, dim=-1)
    return {"logp": logp_all.gather(-1, ids.unsqueeze(-1)).squeeze(-1),
            "entropy": -(logp_all.exp() * logp_all).sum(-1),
            "lse": torch.logsumexp(z, dim=-1),
            "zsum": z.sum(-1)}


def objective_loss(objective: Objective, x, weight, bias, ids, mask, inputs: dict, *, temperature: float = 1.0,
                   softcap: float | None = None, seq_order=None):
    """``(loss, metrics)`` with the same meaning as ``latentfast.ops.lm_head_engine.objective_loss``."""
    logits = x @ weight.t()
    if bias is not None:
        logits = logits + bias
    B, T = ids.shape
    stats = logits_stats(logits, ids.long(), temperature, softcap)
    rows_idx, seq = select_rows(mask, seq_order)
    n = rows_idx.numel()
    flat = {k: v.reshape(-1)[rows_idx] for k, v in stats.items()}
    ins = [inputs.get(name) for name, _ in objective.inputs]
    ins = [None if t is None else t.detach() for t in ins]
    tok, per_seq, batch = gather_inputs(objective, ins, rows_idx, seq_order)
    seq_len = torch.zeros(B, device=x.device).index_add(0, seq, torch.ones(n, device=x.device))
    r = Rows(flat["logp"], flat["entropy"], flat["lse"], flat["zsum"], seq, B, seq_len, tok, per_seq, batch,
             torch.tensor(float(n), device=x.device), B, weight.shape[0])
    loss = objective.loss(r)
    with torch.no_grad():
        metrics = {k: torch.as_tensor(v).detach() for k, v in objective.metrics(r).items()}
    return loss, metrics


def distill_objective_loss(objective, xs, ws, bs, xt, wt, bt, ids, mask):
    """``(loss, soft, hard)`` of a distribution-level objective on full logits (teacher detached)."""
    keep = mask.bool()
    s = xs[keep] @ ws.t() + (bs if bs is not None else 0)
    with torch.no_grad():
        t = (xt[keep] @ wt.t() + (bt if bt is not None else 0))[:, : ws.shape[0]]
    n = torch.tensor(float(max(int(keep.sum()), 1)))
    return objective.terms(s, t, ids[keep].long(), n)
