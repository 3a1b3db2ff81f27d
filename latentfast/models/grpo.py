"""The GRPO loss as the model layer calls it: final hidden states + lm_head weight
straight into the fused linear GRPO loss (no B x T x V logits tensor), plus a
chunked no-grad log-prob helper for the reference policy."""
from __future__ import annotations

import torch
import torch.nn.functional as F

LOSS_DEFAULTS = dict(beta=0.0, epsilon_low=0.2, epsilon_high=0.2, loss_type="grpo", max_completion_length=None,
                     temperature=1.0, chunk_size=1)


def grpo_loss(hidden, weight, ids, mask, advantages, bias=None, ref_per_token_logps=None,
              old_per_token_logps=None, **kw):
    """``(loss, metrics)`` for ``hidden`` (B x C x D) predicting ``ids`` (B x C)."""
    try:
        from latentfast.ops import fused_linear_grpo_loss as fused
    except ImportError:  # TODO(dev only): remove once the fused GRPO loss lands
        fused = _dev_fallback

    opts = {**LOSS_DEFAULTS, **kw}
    loss, metrics = fused(hidden, weight, ids, mask, advantages, bias=bias,
                          ref_per_token_logps=ref_per_token_logps, old_per_token_logps=old_per_token_logps, **opts)
    return loss, _metrics_dict(metrics, opts["beta"])


def _metrics_dict(metrics, beta) -> dict:
    if isinstance(metrics, dict):
        return {k: v.detach() if torch.is_tensor(v) else v for k, v in metrics.items()}
    metrics = list(metrics)
    out = {}
    if beta != 0.0 and metrics:
        out["kl"] = metrics.pop(0).detach()
    names = ["clip_ratio", "clip_ratio_low", "clip_ratio_high"]
    for name, m in zip(names, metrics):
        out[name] = m.detach() if torch.is_tensor(m) else torch.tensor(float(m))
    return out


@torch.no_grad()
def per_token_logps(hidden, weight, ids, bias=None, temperature: float = 1.0, chunk_size: int = 1024):
    """log softmax(hidden @ W^T / T)[ids], B x C, computed ``chunk_size`` rows at a time."""
    B, C, D = hidden.shape
    flat_h, flat_ids = hidden.reshape(-1, D), ids.reshape(-1)
    out = torch.empty(flat_ids.shape, dtype=torch.float32, device=hidden.device)
    for s in range(0, flat_h.shape[0], chunk_size):
        logits = F.linear(flat_h[s:s + chunk_size], weight, bias).float() / temperature
        out[s:s + chunk_size] = logits.gather(-1, flat_ids[s:s + chunk_size, None]).squeeze(-1) - logits.logsumexp(-1)
    return out.view(B, C)


def _dev_fallback(h, W, ids, mask, adv, bias=None, ref_per_token_logps=None, old_per_token_logps=None, beta=0.0,
                  epsilon_low=0.2, epsilon_high=0.2, loss_type="grpo", max_completion_length=None,
                  temperature=1.0, chunk_size=1):
    logits = F.linear(h, W, bias).float() / temperature
    logp = logits.gather(-1, ids[..., None]).squeeze(-1) - logits.logsumexp(-1)
    old = logp.detach() if old_per_token_logps is None else old_per_token_logps
    c1 = (logp - old).exp()
    c2 = c1.clamp(1 - epsilon_low, 1 + epsilon_high)
    A = adv[:, None]
    ptl = -torch.min(c1 * A, c2 * A)
    m = mask.float()
    metrics = []
    if beta != 0.0:
        d = ref_per_token_logps - logp
        kl = d.exp() - d - 1
        ptl = ptl + beta * kl
        metrics.append((kl * m).sum() / m.sum().clamp(min=1))
    if loss_type == "grpo":
        loss = ((ptl * m).sum(-1) / m.sum(-1).clamp(min=1)).mean()
    elif loss_type == "dr_grpo":
        loss = (ptl * m).sum() / (m.shape[0] * (max_completion_length or m.shape[1]))
    else:
        loss = (ptl * m).sum() / m.sum().clamp(min=1)
    clipped = ((c1 < 1 - epsilon_low) & (A < 0)) | ((c1 > 1 + epsilon_high) & (A > 0))
    metrics.append((clipped.float() * m).sum() / m.sum().clamp(min=1))
    return loss, metrics
