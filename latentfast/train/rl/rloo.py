"""RLOO (TRL ``RLOOTrainer``) as a configuration of the GRPO trainer: the trainer (leave-one-out
advantages, the KL as a reward penalty, PPO's clipped sequence-ratio loss). What differs from GRPO
and TRL RLOOConfig's flags are described once, in ``rloo_config.py`` (the ``--help`` text of
``latentfast-rloo``); ``python -m latentfast.train.rl.rloo`` parses them and trains.
"""
from __future__ import annotations

import torch

from latentfast.ops.lm_head_engine import lm_head_logps
from latentfast.ops.ppo_loss import fused_linear_ppo_sequence_loss

from .advantages import rloo_baseline
from .grpo import GRPO
from .rloo_config import RLOOConfig, parse_args
from ..entry import console_entry


class RLOO(GRPO):
    name = "rloo"
    token_reference = False

    def sequence_logps(self, b, reference: bool) -> torch.Tensor:
        W, bias = self.policy.reference_head() if reference else self.policy.head()
        with torch.no_grad():
            if reference:
                h = self.reference_hidden(b)
            else:
                with self.amp():
                    h = self.model(b)[0]
            lp = lm_head_logps(h, W, b["completion_ids"], bias, self.cfg.temperature, b["completion_mask"])[0]
        return lp.sum(1)

    def advantages(self, b):
        r = b["rewards"]
        if self.cfg.beta:  # KL as a reward penalty: sum over tokens of old - ref (first order)
            kl = self.sequence_logps(b, False) - self.sequence_logps(b, True)
            r = r - self.cfg.beta * kl
            b["kl"] = kl
        nan = r.isnan()
        a = rloo_baseline(r.nan_to_num(0.0), self.cfg.num_generations)
        if self.cfg.normalize_advantages:
            a = (a - a.mean()) / (a.std() + 1e-4)
        return a.masked_fill(nan, 0.0)

    def loss(self, mb):
        h, aux = self.model(mb)
        W, bias = self.policy.head()
        mask = mb["completion_mask"]
        old = (mb["old"] * mask).sum(1) if "old" in mb else None
        loss, m = fused_linear_ppo_sequence_loss(h, W, mb["completion_ids"], mask, mb["advantages"], bias,
                                                 old_logps=old, clip_epsilon=self.cfg.epsilon, kl_coef=0.0,
                                                 temperature=self.cfg.temperature)
        return loss + aux, {**mb["stats"], "ratio_mean": m["ratio_mean"], "clip_ratio": m["clip_frac"]}


def run(cfg: RLOOConfig) -> dict:
    """Train a parsed config (``latentfast-rloo``: ``latentfast.scripts.train``)."""
    return RLOO(cfg).fit()


def main(argv=None) -> dict:
    """``python -m latentfast.train.rl.rloo`` (and torchrun): parse, train."""
    return run(parse_args(argv))


cli = console_entry(main)


__all__ = ["RLOO", "RLOOConfig", "cli", "main", "run"]

if __name__ == "__main__":
    cli()
