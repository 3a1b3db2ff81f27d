"""Fused lm_head + paired preference losses (DPO family) without the logits tensor.

    loss, aux = fused_linear_dpo_loss(hidden, lm_head.weight, labels, ref_input=ref_hidden)
    chosen_logps, rejected_logps, chosen_logits_mean, rejected_logits_mean, nll, r_c, r_r = aux

Inputs are stacked chosen-first on the batch dim (Liger): ``_input`` (2B, T, H), ``target``
(2B, T) with ``ignore_index`` outside the responses. The formulas are
``latentfast.ops.objectives.preference`` (written once); the sweep is the lm_head engine's,
in pair order so each chunk holds whole pairs.
"""
from __future__ import annotations

import torch

from latentfast.ops._dispatch import check_shape, check_tensor
from latentfast.ops.lm_head_engine import autocast_head, check_head, lm_head_logps, objective_loss, row_sum_fp32
from latentfast.ops.objectives.preference import (DPOObjective, ORPOObjective, SimPOObjective,
                                                  check_dpo_options, pair_order)


def check_pairs(x, weight, bias, target, ignore_index):
    check_tensor("_input", x, ndim=3, float_=True)
    if x.shape[0] % 2:
        raise ValueError(f"_input must stack chosen then rejected on dim 0 (an even batch), got {x.shape[0]} rows")
    check_head(x, weight, bias, target, ids_name="target", check_range=False)
    mask = target != ignore_index
    ids = torch.where(mask, target, torch.zeros_like(target)).long()
    V = weight.shape[0]
    if not torch.compiler.is_compiling() and ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= V):
        raise ValueError(f"target must lie in [0, {V}) or equal ignore_index={ignore_index}")
    return ids, mask


def sequence_logps(token_logps: torch.Tensor, mask: torch.Tensor, average: bool) -> torch.Tensor:
    """(B, T) -> (B,): sum over the response tokens, or their mean."""
    s = (token_logps * mask).sum(-1)
    return s / mask.sum(-1).clamp(min=1) if average else s


def logits_mean(x, weight, bias) -> torch.Tensor:
    """Mean of ``x W^T + b`` over every position and the vocabulary (Liger's
    ``chosen_logits_mean``), as one GEMV: no logits."""
    with torch.no_grad():
        n = x.shape[0] * x.shape[1]
        s = row_sum_fp32(x.reshape(-1, x.shape[-1])) @ row_sum_fp32(weight)
        if bias is not None:
            s = s + n * bias.float().sum()
        return s / (n * weight.shape[0])


def reference_logps(ref_input, ref_weight, ref_bias, ids, mask, average, chunk_size=None):
    """Per-sequence reference log-probs (no grad) through the engine's stats sweep."""
    tok, _ = lm_head_logps(ref_input, ref_weight, ids, ref_bias, mask=mask, chunk_size=chunk_size)
    return sequence_logps(tok, mask, average)


def fused_linear_dpo_loss(
    _input: torch.Tensor,
    lin_weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    ref_input: torch.Tensor | None = None,
    ref_weight: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    *,
    ref_chosen_logps: torch.Tensor | None = None,
    ref_rejected_logps: torch.Tensor | None = None,
    ignore_index: int = -100,
    beta: float = 0.1,
    alpha: float = 1.0,
    compute_nll_loss: bool = False,
    use_ref_model: bool = True,
    average_log_prob: bool = False,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    discopop_tau: float = 0.05,
    chunk_size: int | None = None,
):
    """DPO-family loss (Liger's ``LigerFusedLinearDPOFunction`` semantics, plus TRL's ``ipo``).

    Reference log-probs: ``ref_chosen_logps``/``ref_rejected_logps`` (B,) as given, else
    computed from ``ref_input`` (+ ``ref_weight``/``ref_bias``, default this lm_head) under
    no_grad; ``use_ref_model=False`` uses none (ratios = policy log-probs).
    ``chunk_size``: pairs per chunk (None = the per-device default).
    Returns ``(loss, (chosen_logps, rejected_logps, chosen_logits_mean, rejected_logits_mean,
    nll_loss, chosen_rewards, rejected_rewards))``, the aux outputs detached.
    """
    check_dpo_options(loss_type, beta, label_smoothing)
    x, W, b = autocast_head(_input, lin_weight, bias)
    ids, mask = check_pairs(x, W, b, target, ignore_index)
    half = x.shape[0] // 2
    average = average_log_prob or loss_type == "ipo"
    ref = None
    if use_ref_model:
        if ref_chosen_logps is not None and ref_rejected_logps is not None:
            for name, t in (("ref_chosen_logps", ref_chosen_logps), ("ref_rejected_logps", ref_rejected_logps)):
                check_tensor(name, t, float_=True)
                check_shape(name, t, (half,), "(number of pairs,)")
            ref = torch.cat([ref_chosen_logps, ref_rejected_logps]).float()
        elif ref_input is not None:
            if ref_weight is None:
                ref_weight, ref_bias = W, b
            rx, rW, rb = autocast_head(ref_input, ref_weight, ref_bias)
            check_shape("ref_input", rx, tuple(x.shape), "same as _input")
            ref = reference_logps(rx, rW, rb, ids, mask, average, chunk_size)
        else:
            raise ValueError("use_ref_model=True needs ref_input or ref_chosen_logps + ref_rejected_logps")
    objective = DPOObjective(beta=float(beta), loss_type=loss_type, label_smoothing=float(label_smoothing),
                             discopop_tau=float(discopop_tau), average_log_prob=bool(average_log_prob),
                             compute_nll_loss=bool(compute_nll_loss), alpha=float(alpha))
    return _paired_loss(objective, x, W, b, ids, mask, ref, chunk_size)


def _paired_loss(objective, x, W, b, ids, mask, ref, chunk_size):
    """The engine call and Liger's aux tuple, shared by the paired losses."""
    B2, T, _ = x.shape
    half = B2 // 2
    inputs = {"ref_logps": ref, "n_chosen_tokens": mask[:half].sum().float()}
    loss, m = objective_loss(objective, x, W, b, ids, mask, inputs, seq_order=pair_order(B2, x.device),
                             chunk_rows=(chunk_size or 0) * 2 * T)
    aux = (m["chosen_logps"], m["rejected_logps"], logits_mean(x[:half], W, b), logits_mean(x[half:], W, b),
           m["nll_loss"], m["chosen_rewards"], m["rejected_rewards"], *(m[k] for k in objective.extra_metrics))
    return loss, aux


def fused_linear_simpo_loss(_input, lin_weight, target, bias=None, *, ignore_index: int = -100, beta: float = 0.1,
                            alpha: float = 1.0, label_smoothing: float = 0.0, compute_nll_loss: bool = False,
                            gamma: float = 0.5, chunk_size: int | None = None):
    """SimPO (Liger's ``LigerFusedLinearSimPOFunction``): reference-free, token-mean log-probs.
    Returns ``(loss, (chosen_logps, rejected_logps, chosen_logits_mean, rejected_logits_mean,
    nll_loss, chosen_rewards, rejected_rewards))``."""
    x, W, b = autocast_head(_input, lin_weight, bias)
    ids, mask = check_pairs(x, W, b, target, ignore_index)
    obj = SimPOObjective(beta=float(beta), gamma=float(gamma), label_smoothing=float(label_smoothing),
                         compute_nll_loss=bool(compute_nll_loss), alpha=float(alpha))
    return _paired_loss(obj, x, W, b, ids, mask, None, chunk_size)


def fused_linear_orpo_loss(_input, lin_weight, target, bias=None, *, ignore_index: int = -100, beta: float = 0.1,
                           compute_nll_loss: bool = True, nll_target=None, chunk_size: int | None = None):
    """ORPO (Liger's ``LigerFusedLinearORPOFunction``): odds-ratio term + the chosen NLL.
    Returns ``(loss, (chosen_logps, rejected_logps, chosen_logits_mean, rejected_logits_mean,
    nll_loss, chosen_rewards, rejected_rewards, log_odds_ratio, log_odds_chosen))``."""
    if nll_target is not None:
        raise NotImplementedError("nll_target (a separate NLL target) is not supported by the fused path")
    x, W, b = autocast_head(_input, lin_weight, bias)
    ids, mask = check_pairs(x, W, b, target, ignore_index)
    obj = ORPOObjective(beta=float(beta), compute_nll_loss=bool(compute_nll_loss))
    return _paired_loss(obj, x, W, b, ids, mask, None, chunk_size)
