"""MiniMind's RL formulas (../shared/notes/minimind.md, PPO / GRPO / SPO) against the fused
lm_head engine and latentfast.train.rl.advantages. Each reference below is written the way
MiniMind's trainers write it, on full logits."""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from latentfast.ops.grpo_loss import fused_linear_grpo_loss
from latentfast.ops.ppo_loss import fused_linear_ppo_sequence_loss
from latentfast.train.rl.advantages import SPOTracker as ValueTracker
from latentfast.train.rl.advantages import gae, last_token_rewards, whiten
from latentfast.train.rl.advantages import minimind_group_batch_zscore as group_advantages

B, T, H, V = 6, 7, 16, 37


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, H, generator=g, dtype=torch.float64).float().requires_grad_()
    W = (0.3 * torch.randn(V, H, generator=g)).requires_grad_()
    ids = torch.randint(0, V, (B, T), generator=g)
    lengths = torch.tensor([7, 5, 1, 3, 6, 2])
    mask = (torch.arange(T)[None] < lengths[:, None]).float()
    return x, W, ids, mask, g


def _token_logps(x, W, ids):
    return F.log_softmax((x @ W.t()).float(), -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)


def _grads(loss, *ts):
    return torch.autograd.grad(loss, ts)


def test_ppo_sequence_objective_matches_minimind():
    x, W, ids, mask, g = _batch()
    with torch.no_grad():
        lp0 = (_token_logps(x, W, ids) * mask).sum(1)
    old = lp0 + 0.2 * torch.randn(B, generator=g)  # some ratios outside 1 +- eps
    ref = lp0 - 0.3 * torch.randn(B, generator=g).abs()
    A = torch.randn(B, generator=g)
    eps, kl_coef = 0.1, 0.02
    # MiniMind train_ppo.py (a8455ca): sequence sums, clipped ratio, kl_ref on the sums
    actor_logp = (_token_logps(x, W, ids) * mask).sum(1)
    ratio = torch.exp(actor_logp - old)
    want = -torch.min(ratio * A, torch.clamp(ratio, 1 - eps, 1 + eps) * A).mean() + kl_coef * (actor_logp - ref).mean()
    gx, gW = _grads(want, x, W)
    for chunk in (None, 1, 4):
        loss, m = fused_linear_ppo_sequence_loss(x, W, ids, mask, A, old_logps=old, ref_logps=ref, clip_epsilon=eps,
                                                 kl_coef=kl_coef, chunk_size=chunk)
        fx, fW = _grads(loss, x, W)
        torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(fx, gx, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(fW, gW, rtol=1e-4, atol=1e-6)
    assert 0 < float(m["clip_frac"]) < 1
    torch.testing.assert_close(m["kl_ref"], (actor_logp - ref).mean().detach(), rtol=1e-5, atol=1e-6)


def test_ppo_sequence_errors_name_the_argument():
    x, W, ids, mask, _ = _batch()
    with pytest.raises(ValueError, match="advantages"):
        fused_linear_ppo_sequence_loss(x, W, ids, mask, torch.zeros(B, T))
    with pytest.raises(ValueError, match="clip_epsilon"):
        fused_linear_ppo_sequence_loss(x, W, ids, mask, torch.zeros(B), clip_epsilon=1.5)


def _minimind_group_adv(rewards, G):
    grouped = rewards.view(-1, G)
    mean_r = grouped.mean(dim=1).repeat_interleave(G)
    std_r = grouped.std(dim=1).repeat_interleave(G)
    a = torch.clamp((rewards - mean_r) / (std_r + 1e-4), -10, 10)
    return (a - a.mean()) / (a.std() + 1e-8)


def test_group_advantages_match_minimind_and_one_generation_is_finite():
    r = torch.tensor([0.0, 1.0, 3.0, 2.5, -1.0, -1.0, 4.5, 0.5])
    for G in (2, 4, 8):
        torch.testing.assert_close(group_advantages(r, G), _minimind_group_adv(r, G))
    assert torch.isnan(_minimind_group_adv(r, 1)).all()  # the note-era bug this avoids
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        a = group_advantages(r, 1)
    assert torch.equal(a, torch.zeros(8)) and any("spo" in str(x.message) for x in w)
    with pytest.raises(ValueError, match="num_generations"):
        group_advantages(r, 3)


def test_grpo_objective_is_minimind_grpo_and_spo():
    """MiniMind GRPO: -(exp(lp - lp.detach()) A - beta k3), token mean per sequence, then
    the sequence mean; SPO: -lp A + beta k3, same masking: loss_type grpo / spo."""
    x, W, ids, mask, g = _batch(1)
    with torch.no_grad():
        ref = _token_logps(x, W, ids) + 0.1 * torch.randn(B, T, generator=g)
    A = torch.randn(B, generator=g)
    beta = 0.02
    for loss_type in ("grpo", "spo"):
        lp = _token_logps(x, W, ids)
        kl = ref - lp
        per_token_kl = torch.exp(kl) - kl - 1
        if loss_type == "grpo":
            per_token = -(torch.exp(lp - lp.detach()) * A[:, None] - beta * per_token_kl)
        else:
            per_token = -lp * A[:, None] + beta * per_token_kl
        want = ((per_token * mask).sum(1) / mask.sum(1)).mean()
        gx, gW = _grads(want, x, W)
        loss, _, lps = fused_linear_grpo_loss(x, W, ids, mask, A, ref_per_token_logps=ref, beta=beta,
                                              loss_type=loss_type, return_logps=True)
        torch.testing.assert_close(lps, (lp * mask).detach(), rtol=1e-5, atol=1e-6)  # what SPO's tracker reads
        fx, fW = _grads(loss, x, W)
        torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(fx, gx, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(fW, gW, rtol=1e-4, atol=1e-6)


def test_token_level_ppo_is_bnpo_with_kl():
    """MiniMind's newer PPO policy loss: masked token mean of max(-A r, -A clip(r)) + kl_coef k3."""
    x, W, ids, mask, g = _batch(2)
    with torch.no_grad():
        lp0 = _token_logps(x, W, ids)
    old = lp0 + 0.15 * torch.randn(B, T, generator=g)
    ref = lp0 + 0.1 * torch.randn(B, T, generator=g)
    A = whiten(torch.randn(B, T, generator=g), mask)
    eps, kl_coef = 0.2, 0.02
    lp = _token_logps(x, W, ids)
    ratio = torch.exp(lp - old)
    n = mask.sum().clamp(min=1)
    kl_ref = ((torch.exp(ref - lp) - (ref - lp) - 1.0) * mask).sum() / n
    want = (torch.max(-A * ratio, -A * torch.clamp(ratio, 1 - eps, 1 + eps)) * mask).sum() / n + kl_coef * kl_ref
    gx, gW = _grads(want, x, W)
    loss, _ = fused_linear_grpo_loss(x, W, ids, mask, A, old_per_token_logps=old, ref_per_token_logps=ref,
                                     beta=kl_coef, epsilon_low=eps, epsilon_high=eps, loss_type="bnpo")
    fx, fW = _grads(loss, x, W)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fx, gx, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(fW, gW, rtol=1e-4, atol=1e-6)


class _MiniMindTracker:
    """AutoAdaptiveValueTracker as MiniMind's train_spo.py writes it."""

    def __init__(self, rho_const=0.9, D_half=0.06, clip_lower=0.5, clip_upper=0.96):
        self.rho_const, self.D_half, self.lo, self.hi = rho_const, D_half, clip_lower, clip_upper
        self.alpha = self.beta = 0.5 * (1.0 / (1.0 - clip_lower))
        self.old = None

    def update(self, rewards, logps, masks):
        m = ((logps * masks).sum() / masks.sum()).item()
        rho = self.rho_const if self.old is None else max(min(2 ** (-abs(self.old - m) / self.D_half), self.hi), self.lo)
        self.old = m
        avg = ((rewards + 3.0) / 6.0).mean().item()
        self.alpha = rho * self.alpha + avg
        self.beta = rho * self.beta + (1 - avg)
        return rho


def test_value_tracker_matches_minimind_and_round_trips():
    g = torch.Generator().manual_seed(3)
    ours, theirs = ValueTracker(), _MiniMindTracker()
    assert ours.alpha == ours.beta == 1.0 and ours.baseline() == 0.0
    rhos = []
    for step in range(6):
        r = 4.5 * torch.rand(4, generator=g) - 1.5  # rewards may exceed 3 (RM + format + tags)
        lp = -torch.rand(4, 5, generator=g) * (1 + 0.02 * step)
        mk = (torch.rand(4, 5, generator=g) > 0.3).float()
        mk[:, 0] = 1
        base = theirs.alpha / (theirs.alpha + theirs.beta) * 6 - 3
        torch.testing.assert_close(ours.advantages(r), (r - base).clamp(-5, 5))
        rhos.append(ours.update(r, lp, mk))
        assert rhos[-1] == pytest.approx(theirs.update(r, lp, mk))
        assert (ours.alpha, ours.beta) == pytest.approx((theirs.alpha, theirs.beta))
    assert rhos[0] == 0.9 and all(0.5 <= r <= 0.96 for r in rhos)
    clone = ValueTracker()
    clone.load_state_dict(ours.state_dict())
    assert clone.state_dict() == ours.state_dict() and clone.baseline() == ours.baseline()
    with pytest.raises(ValueError, match="rho_mode"):
        ValueTracker(rho_mode="median")


def test_gae_and_whiten_match_the_loop():
    g = torch.Generator().manual_seed(4)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]]).float()
    values = torch.randn(3, 4, generator=g) * mask
    rewards = torch.tensor([1.0, -0.5, 2.0])
    tr = last_token_rewards(rewards, mask)
    assert tr.sum(1).tolist() == rewards.tolist() and tr[0, 2] == 1.0 and tr[2, 0] == 2.0
    gamma, lam = 0.9, 0.95
    adv, ret = gae(tr, values, gamma, lam)
    last, want = torch.zeros(3), []
    for t in reversed(range(4)):  # MiniMind's newer train_ppo.py
        nv = values[:, t + 1] if t < 3 else 0.0
        delta = tr[:, t] + gamma * nv - values[:, t]
        last = delta + gamma * lam * last
        want.append(last)
    want = torch.stack(want[::-1], 1)
    torch.testing.assert_close(adv, want)
    torch.testing.assert_close(ret, want + values)
    w = whiten(adv, mask)
    sel = w[mask.bool()]
    assert abs(float(sel.mean())) < 1e-5 and math.isclose(float(sel.var(unbiased=False)), 1.0, rel_tol=1e-4)
    assert torch.all(w[~mask.bool()] == 0)
