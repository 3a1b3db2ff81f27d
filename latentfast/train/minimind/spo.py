"""MiniMind SPO (``train_spo.py``): one sample per prompt against a global KL-adaptive value
baseline, through the fused lm_head (no logits).

    latentfast-minimind spo                           # demo: tiny MiniMind, GSM8K prompts, rule rewards
    torchrun --nproc_per_node 2 -m latentfast.train.minimind.spo --reward_model_path internlm2-1_8b-reward ...

The baseline is ``train.rl.advantages.SPOTracker`` (MiniMind's ``AutoAdaptiveValueTracker``, one
Beta(alpha, beta) over rewards mapped to [0, 1]): ``A = clamp(r - baseline, -5, 5)``, not
normalised in the batch; after each optimizer step ``rho = clip(2^(-|m_old - m| / D_half),
clip_lower, clip_upper)`` from the step's mean response log-prob ``m`` and
``alpha <- rho alpha + mean((r + 3) / 6)``, ``beta <- rho beta + 1 - mean(...)``. Under DDP the
step's means are averaged over ranks first, so every rank holds the same tracker (MiniMind
keeps one per rank). Its state is saved with checkpoints and restored by ``--from_resume 1``.
Loss: ``-lp A + beta k3`` token mean per response, then the mean (``train.rl``'s ``GRPOLoss("spo")``).
"""
from __future__ import annotations

import math

from latentfast.train.rl.advantages import SPOTracker
from .args import SPOArgs
from .common import cli_of, stage_main
from .rl import MiniMindRL


class SPO(MiniMindRL):
    stage = "spo"
    config_class = SPOArgs
    wandb_name = "SPO"

    def setup(self):
        super().setup()
        c = self.cfg
        self.tracker = SPOTracker(c.rho_mode, c.rho_const, c.D_half, c.clip_lower, c.clip_upper)
        self.loss_fn = c.objective()

    def advantages(self, b):
        return {"advantages": self.tracker.advantages(b["rewards"]), "baseline": self.tracker.baseline()}

    def loss(self, b):
        h, aux = self.policy_hidden(b)
        W, bias = self.policy.head()
        loss, m, lp = self.loss_fn(h, W, bias, b["completion_ids"], b["completion_mask"], b["advantages"],
                                   ref=b["ref_logps"], return_logps=True)
        mask = b["completion_mask"].float()
        return loss + aux, {"kl": m["kl"], "aux": aux.detach(), "baseline": b["baseline"],
                            "logp_mean": (lp * mask).sum() / mask.sum().clamp(min=1.0),
                            "reward_norm": self.tracker.normalise(b["rewards"]).mean(),
                            **self.reward_metrics(b)}

    def step_metrics(self, row):
        r_bar, m = row["reward_norm"], row["logp_mean"]  # averaged over micro-batches and ranks
        if math.isfinite(r_bar) and math.isfinite(m):
            row["rho"] = self.tracker.step(r_bar, m)

    def state_dict(self):
        return {**super().state_dict(), "value_tracker": self.tracker.state_dict()}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        if "value_tracker" in state:
            self.tracker.load_state_dict(state["value_tracker"])


main = stage_main(SPO, __doc__)
cli = cli_of(main)

if __name__ == "__main__":
    cli()
