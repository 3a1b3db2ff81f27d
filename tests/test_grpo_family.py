"""GRPO-family extras (TRL's cispo, sapo, luspo, vespo, off-policy sequence mask, entropy
bonus; PPO on per-token advantages; MiniMind's SPO) vs TRL's ``_compute_loss`` written out
in plain PyTorch on full logits (an independent formula, not the shared objective)."""
import math

import pytest
import torch

from latentfast.nn import FusedLinearGRPOLoss
from latentfast.ops import fused_linear_grpo_loss

B, T, H, V = 4, 6, 16, 173


@pytest.fixture(autouse=True)
def _no_interpreter(monkeypatch):
    """These check the objective: the CPU backend instead of the Triton interpreter
    (tests/test_grpo_loss.py covers the kernels)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def _data(full=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, H, generator=g)
    W = torch.randn(V, H, generator=g) * 0.3
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T)
    if not full:
        mask[0, 4:] = 0
        mask[1, 2:] = 0
    adv = torch.tensor([1.0, -0.7, 0.4, -1.2])
    with torch.no_grad():
        lp = torch.log_softmax(x @ W.t(), -1).gather(-1, ids[..., None])[..., 0]
    old = lp + 0.3 * torch.randn(lp.shape, generator=g)
    ref = lp + 0.2 * torch.randn(lp.shape, generator=g)
    sampling = lp + 0.5 * torch.randn(lp.shape, generator=g)
    return x, W, ids, mask, adv, old, ref, sampling


def trl_loss(x, W, ids, mask, advantages, old, ref, *, loss_type, beta=0.0, epsilon_low=0.2, epsilon_high=0.2,
             importance_sampling_level="token", sapo_temperature_pos=1.0, sapo_temperature_neg=1.05,
             vespo_k_pos=2.0, vespo_lambda_pos=3.0, vespo_k_neg=3.0, vespo_lambda_neg=2.0,
             off_policy_mask_threshold=None, sampling=None, entropy_coef=0.0, max_completion_length=None):
    """TRL GRPOTrainer._compute_loss (one process, no accumulation), written out."""
    logp_all = torch.log_softmax(x @ W.t(), -1)
    per_token_logps = logp_all.gather(-1, ids[..., None])[..., 0]
    entropies = -(logp_all.exp() * logp_all).sum(-1)
    adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    old = per_token_logps.detach() if old is None else old
    if off_policy_mask_threshold is not None:
        s = old if sampling is None else sampling
        kl_div = s - per_token_logps.detach()
        avg = (kl_div * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp(min=1.0)
        opm = ((adv >= 0) | (avg <= off_policy_mask_threshold)).float()
    log_ratio = per_token_logps - old
    if importance_sampling_level == "token":
        liw = log_ratio
    else:
        liw = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    coef_1 = torch.exp(liw)
    if beta != 0.0:
        kl = torch.exp(ref - per_token_logps) - (ref - per_token_logps) - 1
    if loss_type == "cispo":
        ptl = -torch.clamp(coef_1, max=epsilon_high).detach() * adv * per_token_logps
    elif loss_type in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo"):
        coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)
        ptl = -torch.min(coef_1 * adv, coef_2 * adv)
    elif loss_type == "sapo":
        tau = torch.where(adv > 0, sapo_temperature_pos, sapo_temperature_neg)
        ptl = -torch.sigmoid(tau * (coef_1 - 1)) * 4 / tau * adv
    elif loss_type == "vespo":
        with torch.no_grad():
            lrc = torch.clamp(log_ratio, -20.0, 20.0)
            lw = torch.clamp((lrc * mask).sum(-1, keepdim=True), math.log(1e-8), 20.0)
            pos = adv >= 0
            k = torch.where(pos, vespo_k_pos, vespo_k_neg)
            lam = torch.where(pos, vespo_lambda_pos, vespo_lambda_neg).clamp(min=1e-4)
            phi = torch.exp(lam + k * lw - lam * torch.exp(lw)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
        ptl = -phi * adv * per_token_logps
    if off_policy_mask_threshold is not None:
        ptl = ptl * opm
    if beta != 0.0:
        ptl = ptl + beta * kl
    if loss_type in ("grpo", "sapo"):
        loss = ((ptl * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = (ptl * mask).sum() / mask.sum().clamp(min=1.0)
    elif loss_type in ("cispo", "dapo", "vespo"):
        normalizer = mask.sum().clamp(min=1.0)
        loss = (ptl * mask).sum() / normalizer
    elif loss_type == "luspo":  # TRL 1.16; a (B, 1) ptl broadcasts over the mask
        loss = (ptl * mask).sum(-1).mean()
    if entropy_coef:
        if loss_type in ("cispo", "dapo", "vespo"):
            ent = (entropies * mask).sum() / normalizer
        else:
            ent = (entropies * mask).sum() / mask.sum().clamp(min=1.0)
        loss = loss - entropy_coef * ent
    return loss


def _check(trl_kw, ours_kw=None, data=None, atol=2e-5):
    x, W, ids, mask, adv, old, ref, sampling = data or _data()
    outs = []
    for fn in ("trl", "ours"):
        xx, WW = x.clone().requires_grad_(), W.clone().requires_grad_()
        if fn == "trl":
            loss = trl_loss(xx, WW, ids, mask, adv, old, ref, sampling=sampling, **trl_kw)
        else:
            kw = {"beta": 0.0, **(ours_kw if ours_kw is not None else trl_kw)}
            loss, _ = fused_linear_grpo_loss(xx, WW, ids, mask, adv, None, ref if kw.get("beta") else None, old,
                                             sampling_per_token_logps=sampling, chunk_size=1, **kw)
        loss.backward()
        outs.append((loss.detach(), xx.grad, WW.grad))
    for name, w, g in zip(("loss", "grad_x", "grad_W"), *outs):
        torch.testing.assert_close(g, w, atol=atol, rtol=1e-4, msg=lambda s: f"{name}: {s}")
    return outs


@pytest.mark.parametrize("kw", [
    dict(loss_type="cispo", epsilon_high=1.1, beta=0.05),
    dict(loss_type="sapo", sapo_temperature_pos=1.3, sapo_temperature_neg=0.8),
    dict(loss_type="sapo", importance_sampling_level="sequence", beta=0.1),
    dict(loss_type="luspo", importance_sampling_level="sequence"),
    dict(loss_type="vespo", vespo_k_pos=1.5, vespo_lambda_neg=2.5),
    dict(loss_type="dapo", off_policy_mask_threshold=0.05),
    dict(loss_type="grpo", importance_sampling_level="sequence", off_policy_mask_threshold=0.05, beta=0.1),
    dict(loss_type="dapo", entropy_coef=0.1),
    dict(loss_type="grpo", entropy_coef=0.05, beta=0.1),
])
def test_trl_loss_types_and_options(kw):
    _check(kw)


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("full", [False, True])
def test_luspo_levels_and_kl(level, beta, full):
    """luspo = (per_token_loss * mask).sum(-1).mean() (TRL 1.16), with the per-sequence loss
    (B, 1) or, once KL or token-level ratios enter, (B, T): padded and unpadded batches."""
    _check(dict(loss_type="luspo", importance_sampling_level=level, beta=beta), data=_data(full=full))


def _trl_compute_loss(x, W, ids, mask, adv, old, ref, **cfg):
    """TRL's own GRPOTrainer._compute_loss on a stand-in trainer: the model's log-probs and
    entropies come from x @ W.T, one process, no accumulation, no vLLM."""
    import collections
    import types

    grpo_trainer = pytest.importorskip("trl.trainer.grpo_trainer")

    def logps_and_entropies(model, *a, **k):
        logp_all = torch.log_softmax(x @ W.t(), -1)
        return logp_all.gather(-1, ids[..., None])[..., 0], -(logp_all.exp() * logp_all).sum(-1), None

    acc = types.SimpleNamespace(reduce=lambda t, reduction="sum": t, gather=lambda t: t,
                                gather_for_metrics=lambda t: t, num_processes=1, sync_gradients=True)
    fake = types.SimpleNamespace(
        _get_per_token_logps_and_entropies=logps_and_entropies, top_entropy_quantile=1.0,
        off_policy_mask_threshold=None, importance_sampling_level=cfg.get("importance_sampling_level", "token"),
        beta=cfg.get("beta", 0.0), loss_type=cfg["loss_type"], epsilon_low=0.2, epsilon_high=0.2,
        args=types.SimpleNamespace(use_bias_correction_kl=False, delta=None), use_vllm=False,
        model=types.SimpleNamespace(training=True), current_gradient_accumulation_steps=1,
        _entropy_bonus_enabled=False, aux_loss_enabled=False, accelerator=acc,
        _metrics={"train": collections.defaultdict(list)})
    inputs = dict(prompt_ids=ids[:, :0], prompt_mask=mask[:, :0], completion_ids=ids, completion_mask=mask,
                  advantages=adv, old_per_token_logps=old, ref_per_token_logps=ref)
    return grpo_trainer.GRPOTrainer._compute_loss(fake, None, inputs)


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_luspo_matches_trl_compute_loss(level, beta):
    """The installed TRL's _compute_loss itself (skipped without trl): B=4, T=7, padded rows."""
    g = torch.Generator().manual_seed(3)
    b, t = 4, 7
    x, W = torch.randn(b, t, H, generator=g), torch.randn(V, H, generator=g) * 0.3
    ids = torch.randint(0, V, (b, t), generator=g)
    mask = torch.ones(b, t)
    mask[0, 3:] = 0
    mask[2, 5:] = 0
    adv = torch.tensor([0.9, -0.4, 1.3, -1.1])
    with torch.no_grad():
        lp = torch.log_softmax(x @ W.t(), -1).gather(-1, ids[..., None])[..., 0]
    old = lp + 0.3 * torch.randn(lp.shape, generator=g)
    ref = lp + 0.2 * torch.randn(lp.shape, generator=g)
    kw = dict(loss_type="luspo", importance_sampling_level=level, beta=beta)
    outs = []
    for side in ("trl", "ours"):
        xx, WW = x.clone().requires_grad_(), W.clone().requires_grad_()
        if side == "trl":
            loss = _trl_compute_loss(xx, WW, ids, mask, adv, old, ref, **kw)
        else:
            loss, _ = fused_linear_grpo_loss(xx, WW, ids, mask, adv, None, ref if beta else None, old, **kw)
        loss.backward()
        outs.append((loss.detach(), xx.grad, WW.grad))
    for name, w, got in zip(("loss", "grad_x", "grad_W"), *outs):
        torch.testing.assert_close(got, w, atol=2e-6, rtol=1e-5, msg=lambda s: f"{name}: {s}")


def test_off_policy_mask_drops_something():
    x, W, ids, mask, adv, old, ref, sampling = _data()
    kw = dict(loss_type="dapo", beta=0.0)
    a, _ = fused_linear_grpo_loss(x, W, ids, mask, adv, None, None, old, **kw)
    far = old + 1.0  # the rollout engine far from the policy: sequences with A < 0 are dropped
    b, _ = fused_linear_grpo_loss(x, W, ids, mask, adv, None, None, old, sampling_per_token_logps=far,
                                  off_policy_mask_threshold=0.5, **kw)
    keep = torch.tensor([1.0, 0.0, 1.0, 0.0])
    c, _ = fused_linear_grpo_loss(x, W, ids, mask, adv, None, None, old, vllm_is_ratio=keep, **kw)
    assert not torch.allclose(a, b)
    torch.testing.assert_close(b, c)


def test_ppo_clipped_term_with_per_token_advantages():
    """PPO (GAE advantages per token): max(-A r, -A clamp(r)) token mean, + k3 KL."""
    x, W, ids, mask, _, old, ref, _ = _data(seed=4)
    adv = torch.randn(B, T)
    beta, eps = 0.02, 0.1

    def ppo(xx, WW):
        lp = torch.log_softmax(xx @ WW.t(), -1).gather(-1, ids[..., None])[..., 0]
        r = torch.exp(lp - old)
        pg = torch.max(-adv * r, -adv * torch.clamp(r, 1 - eps, 1 + eps))
        k3 = torch.exp(ref - lp) - (ref - lp) - 1
        return ((pg + beta * k3) * mask).sum() / mask.sum()

    outs = []
    for fn in (ppo, lambda xx, WW: fused_linear_grpo_loss(xx, WW, ids, mask, adv, None, ref, old, beta=beta,
                                                          epsilon_low=eps, epsilon_high=eps, loss_type="bnpo")[0]):
        xx, WW = x.clone().requires_grad_(), W.clone().requires_grad_()
        loss = fn(xx, WW)
        loss.backward()
        outs.append((loss.detach(), xx.grad, WW.grad))
    for w, g in zip(*outs):
        torch.testing.assert_close(g, w, atol=2e-5, rtol=1e-4)


def test_minimind_spo():
    """MiniMind SPO: per_token_loss = -lp A + beta k3, token mean per sequence, mean over sequences."""
    x, W, ids, mask, adv, _, ref, _ = _data(seed=5)
    beta = 0.02

    def spo(xx, WW):
        lp = torch.log_softmax(xx @ WW.t(), -1).gather(-1, ids[..., None])[..., 0]
        k3 = torch.exp(ref - lp) - (ref - lp) - 1
        ptl = -lp * adv[:, None] + beta * k3
        return ((ptl * mask).sum(1) / mask.sum(1)).mean()

    mod = FusedLinearGRPOLoss(beta=beta, loss_type="spo")
    outs = []
    for fn in (spo, lambda xx, WW: mod(xx, WW, ids, mask, adv, ref_per_token_logps=ref)[0]):
        xx, WW = x.clone().requires_grad_(), W.clone().requires_grad_()
        loss = fn(xx, WW)
        loss.backward()
        outs.append((loss.detach(), xx.grad, WW.grad))
    for w, g in zip(*outs):
        torch.testing.assert_close(g, w, atol=2e-5, rtol=1e-4)


def test_module_takes_trl_config_names():
    mod = FusedLinearGRPOLoss(loss_type="vespo", vespo_k_pos=1.0, off_policy_mask_threshold=0.1, entropy_coef=0.01,
                              beta=0.0)
    x, W, ids, mask, adv, old, _, _ = _data()
    loss, metrics = mod(x, W, ids, mask, adv, old_per_token_logps=old)
    assert torch.isfinite(loss) and torch.isfinite(metrics.entropy)
    with pytest.raises(TypeError):
        FusedLinearGRPOLoss(vespo_bogus=1.0)
