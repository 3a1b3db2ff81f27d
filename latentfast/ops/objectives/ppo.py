"""MiniMind's note-era PPO actor objective: the clipped ratio of *sequence* log-prob sums.

    lp   = sum of the response tokens' log-probs, per sequence      (old, ref: the same, given)
    pg   = -min(exp(lp - old) A, clamp(exp(lp - old), 1 - eps, 1 + eps) A)
    loss = mean_b(pg) + kl_coef * mean_b(lp - ref)

(``../shared/notes/minimind.md``, PPO; the critic's value loss is plain torch in the trainer.)
The token-level variant of MiniMind's newer code is ``GRPOObjective(loss_type="bnpo")`` on
per-token (GAE) advantages with ``beta = kl_coef``. Sequences are the chunking unit
(``row_local = False``); a sequence without response tokens contributes nothing.
"""
from __future__ import annotations

import dataclasses

import torch

from latentfast.ops.lm_head_engine import Objective, Rows, register_objective


@register_objective
@dataclasses.dataclass(frozen=True)
class PPOSequenceObjective(Objective):
    clip_epsilon: float = 0.1
    kl_coef: float = 0.02

    inputs = (("advantages", "seq"), ("old", "seq"), ("ref", "seq"))
    row_local = False
    metric_names = ("policy_loss", "kl_ref", "ratio_mean", "clip_frac")

    def __post_init__(self):
        if not 0.0 < self.clip_epsilon < 1.0:
            raise ValueError(f"clip_epsilon must be in (0, 1), got {self.clip_epsilon}")

    def _terms(self, r: Rows):
        lp = r.seq_sum(r.logp)
        old = r.per_seq.get("old")
        old = lp.detach() if old is None else old
        ref = r.per_seq.get("ref")
        adv = r.per_seq["advantages"]
        ratio = torch.exp(lp - old)
        clipped = torch.clamp(ratio, 1 - self.clip_epsilon, 1 + self.clip_epsilon)
        pg = -torch.minimum(ratio * adv, clipped * adv)
        kl = lp - ref if ref is not None else torch.zeros_like(lp)
        return pg, kl, ratio

    def loss(self, r: Rows) -> torch.Tensor:
        pg, kl, _ = self._terms(r)
        return (pg.sum() + self.kl_coef * kl.sum()) / max(1, r.n_seqs)

    def metrics(self, r: Rows) -> dict:
        pg, kl, ratio = self._terms(r)
        n = max(1, r.n_seqs)
        return dict(policy_loss=pg.sum() / n, kl_ref=kl.sum() / n, ratio_mean=ratio.sum() / n,
                    clip_frac=((ratio - 1).abs() > self.clip_epsilon).float().sum() / n)
