"""Every advantage estimator of the RL trainers, named for whose maths it is.

    trl_group_zscore(r, G, scale_rewards="group")   TRL GRPOTrainer (and HRPO): r - mean_group, / (std + 1e-4)
    minimind_group_batch_zscore(r, G)               MiniMind GRPO: group z-score, clipped, then batch z-score
    rloo_baseline(r, G)                             RLOO (TRL RLOOTrainer): r - mean of the other G - 1 samples
    gae(token_rewards, values, gamma, lam)          PPO's generalised advantage estimation (MiniMind's newer PPO),
                                                    with whiten(A, mask) and last_token_rewards(r, mask)
    SPOTracker                                      SPO's global KL-adaptive Beta baseline (MiniMind)

MiniMind's formulas follow its note-era code (a8455ca, ``../shared/notes/minimind.md``); where
its GRPO divides by the standard deviation of one sample (NaN with ``--num_generations 1``)
the advantages are 0 instead, with a warning, as its newer code has.
"""
from __future__ import annotations

import math
import warnings

import torch

from latentfast.data.rewards import REWARD_SCALE

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
    """MiniMind GRPO: ``clamp((r - mean_g) / (std_g + 1e-4), -clip, clip)`` per group of
    ``num_generations`` consecutive samples, then ``(A - mean) / (std + 1e-8)`` over the batch.
    One generation per prompt has no group spread: the advantages are 0 (only the KL term
    trains), with a warning pointing to SPO, instead of the NaN of ``std`` of one sample."""
    if num_generations < 1 or rewards.numel() % num_generations:
        raise ValueError(f"num_generations must divide the {rewards.numel()} rewards, got {num_generations}")
    if num_generations == 1:
        if warn:
            warnings.warn("num_generations=1: GRPO's group advantages are all 0 (only the KL term trains); "
                          "use the spo stage for one sample per prompt", stacklevel=2)
        return torch.zeros_like(rewards, dtype=torch.float32)
    r = rewards.float().view(-1, num_generations)
    a = (r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)
    a = a.clamp(-clip, clip).reshape(-1)
    if a.numel() < 2:
        return a
    return (a - a.mean()) / (a.std() + 1e-8)


def rloo_baseline(rewards: torch.Tensor, num_generations: int) -> torch.Tensor:
    """REINFORCE leave-one-out: ``r_i - (sum_group - r_i) / (G - 1)`` (TRL ``RLOOTrainer``)."""
    if num_generations < 2 or rewards.numel() % num_generations:
        raise ValueError(f"RLOO needs num_generations >= 2 dividing the {rewards.numel()} rewards, "
                         f"got {num_generations}")
    r = rewards.float().view(-1, num_generations)
    return (r - (r.sum(1, keepdim=True) - r) / (num_generations - 1)).reshape(-1)


class SPOTracker:
    """SPO's global value baseline (MiniMind ``AutoAdaptiveValueTracker``): a Beta(alpha, beta)
    over rewards mapped to [0, 1]; after each step both decay by ``rho`` and take the batch's
    mean normalised reward. ``rho = clip(2^(-|m_old - m| / D_half), clip_lower, clip_upper)``
    with ``m`` the step's mean log-prob of the response tokens (``rho_const`` on the first step
    or with ``rho_mode='constant'``). The state is JSON-able (saved with checkpoints)."""

    def __init__(self, rho_mode: str = "kl", rho_const: float = 0.9, D_half: float = 0.06, clip_lower: float = 0.5,
                 clip_upper: float = 0.96, scale: float = REWARD_SCALE):
        if rho_mode not in ("kl", "constant"):
            raise ValueError(f"rho_mode must be 'kl' or 'constant', got {rho_mode!r}")
        if not 0.0 <= clip_lower < clip_upper <= 1.0:
            raise ValueError(f"need 0 <= clip_lower < clip_upper <= 1, got {clip_lower}, {clip_upper}")
        if D_half <= 0:
            raise ValueError(f"D_half must be positive, got {D_half}")
        self.rho_mode, self.rho_const, self.D_half = rho_mode, float(rho_const), float(D_half)
        self.clip_lower, self.clip_upper, self.scale = float(clip_lower), float(clip_upper), float(scale)
        n_init = 1.0 / (1.0 - self.clip_lower)
        self.alpha = self.beta = 0.5 * n_init
        self.old_mean_logprob: float | None = None

    def normalise(self, rewards: torch.Tensor) -> torch.Tensor:
        """Rewards mapped to [0, 1] (on the +-scale range): ``(r + scale) / (2 scale)``."""
        return (rewards.float() + self.scale) / (2 * self.scale)

    def baseline(self) -> float:
        """The baseline on the reward's own scale: ``alpha / (alpha + beta) * 2 scale - scale``."""
        return self.alpha / (self.alpha + self.beta) * 2 * self.scale - self.scale

    def advantages(self, rewards: torch.Tensor, clip: float = 5.0) -> torch.Tensor:
        """``clamp(r - baseline, -clip, clip)``; not normalised within the batch."""
        return (rewards.float() - self.baseline()).clamp(-clip, clip)

    def rho(self, mean_logprob: float | None) -> float:
        if self.rho_mode == "constant" or mean_logprob is None or self.old_mean_logprob is None:
            return self.rho_const
        rho = 2.0 ** (-abs(self.old_mean_logprob - mean_logprob) / self.D_half)
        return max(min(rho, self.clip_upper), self.clip_lower)

    def update(self, rewards: torch.Tensor, logps: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> float:
        """One step's update from the step's rewards and (B, T) response log-probs (after the
        backward, as MiniMind); returns the ``rho`` used."""
        mean_lp = None
        if logps is not None and mask is not None:
            m = mask.float()
            mean_lp = float((logps.detach().float() * m).sum() / m.sum().clamp(min=1.0))
        return self.step(float(self.normalise(rewards).mean()), mean_lp)

    def step(self, mean_normalised_reward: float, mean_logprob: float | None = None) -> float:
        """The update from the step's means (what the trainers average over ranks first)."""
        rho = self.rho(mean_logprob)
        if mean_logprob is not None:
            self.old_mean_logprob = float(mean_logprob)
        r_bar = float(mean_normalised_reward)
        self.alpha = rho * self.alpha + r_bar
        self.beta = rho * self.beta + (1.0 - r_bar)
        return rho

    def state_dict(self) -> dict:
        return {"alpha": self.alpha, "beta": self.beta, "old_mean_logprob": self.old_mean_logprob}

    def load_state_dict(self, state: dict) -> None:
        self.alpha, self.beta = float(state["alpha"]), float(state["beta"])
        old = state.get("old_mean_logprob")
        self.old_mean_logprob = None if old is None else float(old)
        if not (math.isfinite(self.alpha) and math.isfinite(self.beta)):
            raise ValueError(f"value tracker state is not finite: {state}")


def gae(token_rewards: torch.Tensor, values: torch.Tensor, gamma: float = 1.0, lam: float = 0.95):
    """Generalised advantage estimation over response positions (MiniMind's newer PPO):
    ``delta_t = r_t + gamma V_{t+1} - V_t`` (V past the end = 0), ``A_t = delta_t + gamma lam A_{t+1}``;
    returns ``(advantages, returns = A + V)``. ``values`` should be 0 past each response's end."""
    B, T = values.shape
    adv = torch.zeros_like(values, dtype=torch.float32)
    last = torch.zeros(B, device=values.device, dtype=torch.float32)
    v = values.float()
    for t in reversed(range(T)):
        nv = v[:, t + 1] if t < T - 1 else torch.zeros_like(last)
        last = token_rewards[:, t].float() + gamma * nv - v[:, t] + gamma * lam * last
        adv[:, t] = last
    return adv, adv + v


def whiten(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked z-score (mean and biased variance over ``mask``), 0 outside the mask."""
    m = mask.float()
    n = m.sum().clamp(min=1.0)
    mean = (values * m).sum() / n
    var = ((values - mean) ** 2 * m).sum() / n
    return (values - mean) * torch.rsqrt(var + 1e-8) * m


def last_token_rewards(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) sequence rewards placed on each response's last token (B, T); empty responses get none."""
    out = torch.zeros(mask.shape, device=mask.device, dtype=torch.float32)
    lengths = mask.ne(0).sum(1)
    valid = lengths > 0
    rows = torch.arange(mask.shape[0], device=mask.device)[valid]
    out[rows, lengths[valid] - 1] = rewards.float()[valid]
    return out


ESTIMATORS = {"trl_group_zscore": trl_group_zscore, "minimind_group_batch_zscore": minimind_group_batch_zscore,
              "rloo_baseline": rloo_baseline}

__all__ = ["ESTIMATORS", "SCALE_REWARDS", "SPOTracker", "gae", "last_token_rewards", "minimind_group_batch_zscore",
           "rloo_baseline", "trl_group_zscore", "whiten"]
