"""Advantage estimators of the RL stages (MiniMind's GRPO, SPO and PPO), each written once.

    A = group_advantages(rewards, num_generations)          GRPO: per-group z-score, then batch z-score
    tracker = ValueTracker(); A = tracker.advantages(r)     SPO: one global KL-adaptive Beta baseline
    A, returns = gae(token_rewards, values, mask, gamma, lam); A = whiten(A, mask)    token-level PPO

Formulas follow MiniMind (``../shared/notes/minimind.md``): the note-era code (a8455ca) by
default; where its GRPO divides by the standard deviation of a single sample (NaN with
``--num_generations 1``) the advantages are 0 instead, with a warning, as its newer code has.
"""
from __future__ import annotations

import math
import warnings

import torch

from latentfast.data.rewards import REWARD_SCALE


def group_advantages(rewards: torch.Tensor, num_generations: int, clip: float = 10.0,
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


class ValueTracker:
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
