"""Paired preference objectives, written once: the DPO family (Liger's chunked DPO semantics,
``LigerFusedLinearDPOFunction.preference_loss_fn``, plus TRL's ``ipo``) and the
reference-free SimPO and ORPO (Liger's ``LigerFusedLinearSimPOLoss`` / ``...ORPOLoss``).

Rows come sequence by sequence in pair order (chosen 0, rejected 0, chosen 1, ...: the
engine's ``seq_order``), so a chunk holds whole pairs and local sequence 2k is a chosen
response, 2k + 1 its rejected one. Per sequence, ``logps`` is the sum of the response
tokens' log-probs, or their mean with ``average_log_prob`` (MiniMind's DPO; TRL's ipo
always averages). With ``ratio = logps - ref_logps`` and ``d = beta (ratio_c - ratio_r)``:

  sigmoid  -logsigmoid(d)          hinge   relu(1 - d)          ipo  (d/beta - 1/(2 beta))^2
  robust   (-(1-s) logsigmoid(d) + s logsigmoid(-d)) / (1 - 2s)  (s = label_smoothing)
  exo_pair sigmoid(d)(logsigmoid(d) - log(1-s)) + sigmoid(-d)(logsigmoid(-d) - log s)
  nca_pair -logsigmoid(r_c) - logsigmoid(-r_c)/2 - logsigmoid(-r_r)/2   (r = beta ratio)
  bco_pair -logsigmoid(r_c) - logsigmoid(-r_r)
  sppo_hard (ratio_c - 1/(2 beta))^2 + (ratio_r + 1/(2 beta))^2
  apo_zero 1 - sigmoid(r_c) + sigmoid(r_r)      apo_down sigmoid(r_c) + 1 - sigmoid(d)
  discopop -logsigmoid(d)(1 - sigmoid(d/tau)) + exp(-d) sigmoid(d/tau)
averaged over pairs, plus ``alpha`` x the chosen responses' token-mean NLL (RPO) when
``compute_nll_loss``.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from latentfast.choices import DPO_LOSS_TYPES, check_dpo_options  # noqa: F401  (torch-free: the CLIs' choices)
from latentfast.ops.lm_head_engine import Objective, Rows, register_objective


def dpo_pair_losses(ratio_c, ratio_r, *, loss_type: str, beta: float, label_smoothing: float = 0.0,
                    discopop_tau: float = 0.05):
    """Per-pair losses from the policy-minus-reference log-ratios of chosen and rejected."""
    d = beta * (ratio_c - ratio_r)
    r_c, r_r = beta * ratio_c, beta * ratio_r
    s = label_smoothing
    if loss_type == "sigmoid":
        return -F.logsigmoid(d)
    if loss_type == "hinge":
        return torch.relu(1 - d)
    if loss_type == "ipo":
        return (ratio_c - ratio_r - 1 / (2 * beta)) ** 2
    if loss_type == "robust":
        return (-(1 - s) * F.logsigmoid(d) + s * F.logsigmoid(-d)) / (1 - 2 * s)
    if loss_type == "exo_pair":
        return (torch.sigmoid(d) * (F.logsigmoid(d) - math.log1p(-s))
                + torch.sigmoid(-d) * (F.logsigmoid(-d) - math.log(s)))
    if loss_type == "nca_pair":
        return -F.logsigmoid(r_c) - 0.5 * F.logsigmoid(-r_c) - 0.5 * F.logsigmoid(-r_r)
    if loss_type == "bco_pair":
        return -F.logsigmoid(r_c) - F.logsigmoid(-r_r)
    if loss_type == "sppo_hard":
        return (ratio_c - 0.5 / beta) ** 2 + (ratio_r + 0.5 / beta) ** 2
    if loss_type == "apo_zero":
        return 1 - torch.sigmoid(r_c) + torch.sigmoid(r_r)
    if loss_type == "apo_down":
        return torch.sigmoid(r_c) + 1 - torch.sigmoid(d)
    if loss_type == "discopop":
        mod = torch.sigmoid(d / discopop_tau)
        return -F.logsigmoid(d) * (1 - mod) + torch.exp(-d) * mod
    raise ValueError(f"loss_type must be one of {DPO_LOSS_TYPES}, got {loss_type!r}")


class PairedObjective(Objective):
    """Shared by the paired objectives: per-sequence log-probs (sum, or mean with
    ``average_log_prob``), pairs (local sequences 2k, 2k + 1), the chosen responses'
    token-mean NLL times ``alpha`` when ``compute_nll_loss``. Subclasses define
    ``pair_terms(lp_seq, r) -> (per-pair losses, rewards (n_seq,), extra metrics)``."""

    inputs = (("ref_logps", "seq"), ("n_chosen_tokens", "batch"))
    row_local = False
    seqs_per_group = 2
    base_metrics = ("chosen_logps", "rejected_logps", "nll_loss", "chosen_rewards", "rejected_rewards")
    extra_metrics: tuple = ()

    @property
    def metric_names(self):
        return self.base_metrics + self.extra_metrics

    def metric_shapes(self, n_seqs):
        half = n_seqs // 2
        shapes = {"chosen_logps": (half,), "rejected_logps": (half,), "nll_loss": (), "chosen_rewards": (half,),
                  "rejected_rewards": (half,)}
        return {**shapes, **{k: () for k in self.extra_metrics}}

    def _averaged(self) -> bool:
        return self.average_log_prob

    def _terms(self, r: Rows):
        lp_seq = r.seq_sum(r.logp)
        if self._averaged():
            lp_seq = lp_seq / r.seq_len.clamp(min=1.0)
        pair, rewards, extra = self.pair_terms(lp_seq, r)
        pref = pair.sum() / (r.n_seqs // 2)
        chosen_tok = (r.seq % 2 == 0).float()
        nll = -(r.logp * chosen_tok).sum() / r.batch["n_chosen_tokens"].clamp(min=1.0)
        return pref, nll, lp_seq, rewards, extra

    def loss(self, r: Rows) -> torch.Tensor:
        pref, nll, *_ = self._terms(r)
        return pref + self.alpha * nll if self.compute_nll_loss else pref

    def metrics(self, r: Rows) -> dict:
        _, nll, lp_seq, rewards, extra = self._terms(r)
        return {"chosen_logps": lp_seq[0::2], "rejected_logps": lp_seq[1::2],
                "nll_loss": nll if self.compute_nll_loss else torch.zeros(()),
                "chosen_rewards": rewards[0::2], "rejected_rewards": rewards[1::2], **extra}


@register_objective
@dataclasses.dataclass(frozen=True)
class DPOObjective(PairedObjective):
    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    discopop_tau: float = 0.05
    average_log_prob: bool = False
    compute_nll_loss: bool = False
    alpha: float = 1.0

    def __post_init__(self):
        check_dpo_options(self.loss_type, self.beta, self.label_smoothing)

    def _averaged(self):
        return self.average_log_prob or self.loss_type == "ipo"

    def pair_terms(self, lp_seq, r):
        ref = r.per_seq.get("ref_logps")
        ratio = lp_seq - ref if ref is not None else lp_seq
        pair = dpo_pair_losses(ratio[0::2], ratio[1::2], loss_type=self.loss_type, beta=self.beta,
                               label_smoothing=self.label_smoothing, discopop_tau=self.discopop_tau)
        return pair, self.beta * ratio, {}


@register_objective
@dataclasses.dataclass(frozen=True)
class SimPOObjective(PairedObjective):
    """SimPO (Liger): ``-(1-s) logsigmoid(beta (lp_c - lp_r) - gamma) - s logsigmoid(-...)``
    on token-mean log-probs, no reference model."""

    beta: float = 0.1
    gamma: float = 0.5
    label_smoothing: float = 0.0
    average_log_prob: bool = True
    compute_nll_loss: bool = True
    alpha: float = 1.0

    def pair_terms(self, lp_seq, r):
        logits = self.beta * (lp_seq[0::2] - lp_seq[1::2]) - self.gamma
        s = self.label_smoothing
        return -F.logsigmoid(logits) * (1 - s) - F.logsigmoid(-logits) * s, self.beta * lp_seq, {}


@register_objective
@dataclasses.dataclass(frozen=True)
class ORPOObjective(PairedObjective):
    """ORPO (Liger): ``-beta logsigmoid(log odds(c) - log odds(r))``, odds = p / (1 - p) of the
    token-mean log-prob, plus the chosen NLL."""

    beta: float = 0.1
    average_log_prob: bool = True
    compute_nll_loss: bool = True
    alpha: float = 1.0
    extra_metrics = ("log_odds_ratio", "log_odds_chosen")

    def pair_terms(self, lp_seq, r):
        c, j = lp_seq[0::2], lp_seq[1::2]
        log_odds = (c - j) - (torch.log1p(-torch.exp(c)) - torch.log1p(-torch.exp(j)))
        ratio = F.logsigmoid(log_odds)
        half = r.n_seqs // 2
        return -self.beta * ratio, self.beta * lp_seq, {"log_odds_ratio": ratio.sum() / half,
                                                         "log_odds_chosen": log_odds.sum() / half}


def pair_order(n_seqs: int, device) -> torch.Tensor:
    """Sweep order chosen 0, rejected 0, chosen 1, ... for inputs stacked chosen-first."""
    half = n_seqs // 2
    return torch.stack([torch.arange(half, device=device), torch.arange(half, n_seqs, device=device)], 1).reshape(-1)
