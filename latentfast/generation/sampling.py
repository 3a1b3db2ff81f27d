"""Next-token choice from logits: greedy, or temperature / top-k / top-p sampling.

Sampling is the exponential race (Gumbel-max): ``argmax(probs / noise)`` with
``noise ~ Exp(1)`` is an exact categorical draw from ``probs``, needs no host sync and
no ``multinomial``. The noise is drawn by the caller (``draw_noise``) outside any
compiled region, so a ``torch.Generator`` never has to be traced and compiled and eager
steps consume the same random stream.
"""
from __future__ import annotations

import torch


def draw_noise(buf: torch.Tensor, generator=None) -> torch.Tensor:
    """Fill ``buf`` (B x V, fp32) with Exp(1) noise in place (the draw of one step)."""
    return buf.exponential_(generator=generator)


def check_sampling(temperature: float, top_k: int, top_p: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0 = off), got {top_k!r}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def sample(logits: torch.Tensor, noise: torch.Tensor | None, temperature: float = 1.0, top_k: int = 0,
           top_p: float = 1.0):
    """Next tokens (B) and the distribution they were drawn from (B x V, for HRPO's soft
    embedding). ``noise=None``: greedy (``argmax`` of the logits; the distribution is the
    plain tempered softmax). Otherwise top-k, then top-p, then the race against ``noise``."""
    logits = logits.float()
    if noise is None:
        return logits.argmax(-1), torch.softmax(logits / max(temperature, 1e-6), -1)
    logits = logits / max(temperature, 1e-6)
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, -1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, -1)
    if top_p < 1.0:
        sp, si = probs.sort(-1, descending=True)
        drop = sp.cumsum(-1) - sp > top_p  # keep the smallest prefix reaching top_p
        sp = sp.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, si, sp)
        probs = probs / probs.sum(-1, keepdim=True)
    return (probs / noise).argmax(-1), probs
