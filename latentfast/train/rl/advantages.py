"""Every advantage estimator of the RL trainers, named for whose maths it is.

    trl_group_zscore(r, G, scale_rewards="group")   TRL GRPOTrainer (and HRPO): r - mean_group, / (std + 1e-4)
    minimind_group_batch_zscore(r, G)               MiniMind GRPO: group z-score, clipped, then batch z-score
    rloo_baseline(r, G)                             RLOO (TRL RLOOTrainer): r - mean of the other G - 1 samples
    gae(token_rewards, values, gamma, lam)          PPO's generalised advantage estimation (MiniMind)
    SPOTracker                                      SPO's global KL-adaptive Beta baseline (MiniMind)

The MiniMind formulas live in ``latentfast.train.advantages`` (their tests pin them); this
module gives them the names the generic trainer (``latentfast.train.rl``) selects by.
"""
from __future__ import annotations

import torch

from latentfast.train.advantages import ValueTracker as SPOTracker
from latentfast.train.advantages import gae, group_advantages, last_token_rewards, whiten

SCALE_REWARDS = ("group", "batch", "none")


def trl_group_zscore(rewards: torch.Tensor, num_generations: int, scale_rewards: str = "group") -> torch.Tensor:
    """TRL ``GRPOTrainer``: ``A = r - mean(group)``, divided by ``std + 1e-4`` where the std is
    the group's (``"group"``), the whole batch's (``"batch"``) or none (``"none"``, Dr. GRPO).
    Sample std (TRL's ``nanstd``); NaN rewards (unscorable) are left out of the means and get
    advantage 0. A group of one has no spread: its advantage is 0, never NaN."""
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS}, got {scale_rewards!r}")
    if num_generations < 1 or rewards.numel() % num_generations:
        raise ValueError(f"num_generations must divide the {rewards.numel()} rewards, got {num_generations}")
    r = rewards.float().view(-1, num_generations)
    nan = r.isnan()
    mean = torch.nanmean(r, 1, keepdim=True)
    adv = r - mean
    if scale_rewards != "none":
        if scale_rewards == "group":
            std = _nanstd(r, 1) if num_generations > 1 else torch.zeros_like(mean)
        else:
            std = _nanstd(r.reshape(1, -1), 1) if r.numel() > 1 else torch.zeros_like(mean)
        adv = adv / (std.nan_to_num(0.0) + 1e-4)
    return adv.masked_fill(nan, 0.0).nan_to_num(0.0).reshape(-1)


def _nanstd(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Sample standard deviation ignoring NaNs (Bessel-corrected, as TRL's ``nanstd``)."""
    n = (~x.isnan()).sum(dim, keepdim=True).float()
    var = torch.nanmean((x - torch.nanmean(x, dim, keepdim=True)) ** 2, dim, keepdim=True) * n / (n - 1).clamp(min=1)
    return var.sqrt()


def minimind_group_batch_zscore(rewards: torch.Tensor, num_generations: int, clip: float = 10.0,
                                warn: bool = True) -> torch.Tensor:
    """MiniMind GRPO: per-group z-score clipped to +-``clip``, then a z-score over the batch."""
    return group_advantages(rewards, num_generations, clip=clip, warn=warn)


def rloo_baseline(rewards: torch.Tensor, num_generations: int) -> torch.Tensor:
    """REINFORCE leave-one-out: ``r_i - (sum_group - r_i) / (G - 1)`` (TRL ``RLOOTrainer``)."""
    if num_generations < 2 or rewards.numel() % num_generations:
        raise ValueError(f"RLOO needs num_generations >= 2 dividing the {rewards.numel()} rewards, "
                         f"got {num_generations}")
    r = rewards.float().view(-1, num_generations)
    return (r - (r.sum(1, keepdim=True) - r) / (num_generations - 1)).reshape(-1)


ESTIMATORS = {"trl_group_zscore": trl_group_zscore, "minimind_group_batch_zscore": minimind_group_batch_zscore,
              "rloo_baseline": rloo_baseline}

__all__ = ["ESTIMATORS", "SCALE_REWARDS", "SPOTracker", "gae", "last_token_rewards", "minimind_group_batch_zscore",
           "rloo_baseline", "trl_group_zscore", "whiten"]
