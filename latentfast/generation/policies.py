"""Decoding policies: what the engine feeds next and what it records.

A policy's ``head(eng, h)`` runs inside the (compiled) step: from the last hidden state
``h`` (B x D) it picks the next tokens, writes its outputs into preallocated buffers at
the step index ``eng.t`` and returns ``(next input embedding B x D, fed-token mask B)``.
It must keep shapes fixed and never synchronise with the host.
"""
from __future__ import annotations

import torch

from .rollout import Rollout, as_id_list
from .sampling import check_sampling, sample


def _write(buf: torch.Tensor, t: torch.Tensor, value: torch.Tensor) -> None:
    """``buf[:, t] = value`` with ``t`` a 1-element device tensor (no recompile per step)."""
    buf.index_copy_(1, t, value.unsqueeze(1).to(buf.dtype))


class SamplingPolicy:
    """Plain decoding: greedy or temperature / top-k / top-p sampling, stopping a row at
    any of several EOS ids (it then decodes ``pad_token_id`` with a zero mask)."""

    def __init__(self, eos_token_id, pad_token_id: int, do_sample: bool = False, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0):
        check_sampling(temperature, top_k, top_p)
        if not isinstance(pad_token_id, int):
            raise ValueError(f"pad_token_id must be an int, got {pad_token_id!r}")
        self.eos_ids = as_id_list(eos_token_id, "eos_token_id")
        self.pad_token_id, self.samples = pad_token_id, bool(do_sample)
        self.temperature, self.top_k, self.top_p = float(temperature), top_k, float(top_p)

    # -- engine hooks ---------------------------------------------------------
    def setup(self, eng) -> None:
        B, C = eng.B, eng.C
        self.eos = eng.buffer("eos", (len(self.eos_ids),), torch.long, torch.tensor(self.eos_ids))
        self.finished = eng.buffer("finished", (B,), torch.bool, False)
        self.tokens = eng.buffer("tokens", (B, C), torch.long, self.pad_token_id)
        self.mask = eng.buffer("mask", (B, C), torch.bool, False)

    def buffers(self) -> list[torch.Tensor]:
        return [self.eos, self.finished, self.tokens, self.mask]

    def prompt_embeds(self, eng, input_ids):
        return eng.parts.embedding(input_ids)

    def head(self, eng, h):
        tok, probs = sample(eng.parts.logits(h), eng.noise, self.temperature, self.top_k, self.top_p)
        finished = self.finished
        tok = torch.where(finished, torch.full_like(tok, self.pad_token_id), tok)
        is_eos = torch.isin(tok, self.eos)
        alive = ~finished
        _write(self.tokens, eng.t, tok)
        _write(self.mask, eng.t, alive)
        e = self.next_embeds(eng, tok, h, probs, alive & ~is_eos)
        finished.logical_or_(is_eos)
        return e, alive

    def next_embeds(self, eng, tok, h, probs, live):
        """Input embedding of the next step (``live``: rows whose token is neither padding nor EOS)."""
        return eng.parts.embedding(tok)

    def all_done(self, eng) -> torch.Tensor:
        return self.finished.all()

    def finish(self, eng, steps: int) -> Rollout:
        """Trim the padding-only steps decoded past the end; pack once (copies: the
        buffers may be the engine's pooled ones, rewritten by the next call)."""
        mask = self.mask[:, :steps]
        used = mask.any(0)
        n = int(used.nonzero().max()) + 1 if bool(used.any()) else 1
        D = eng.parts.config.hidden_size
        think = torch.zeros(eng.B, n, dtype=torch.bool, device=eng.device)
        return Rollout(None, None, self.tokens[:, :n].clone(), mask[:, :n].long(), think,
                       torch.zeros(0, D, dtype=eng.dtype, device=eng.device),
                       torch.zeros(0, dtype=torch.float32, device=eng.device))


class ThinkingPolicy(SamplingPolicy):
    """HRPO's hybrid thinking (a ``HybridThinkingLM``): a row thinks until its last
    ``len(marker_ids)`` tokens equal the answer marker; while it thinks, the next input
    is ``thinking_residual(embed(token), state)`` with ``state`` the last hidden state
    (projection mode) or ``probs @ E / ||probs||_2`` (soft-embedding mode). States and
    ``a.mean(-1)`` are recorded at the mixed positions (packed N x D at the end)."""

    def __init__(self, marker_ids, eos_token_id, pad_token_id: int, **kw):
        super().__init__(eos_token_id, pad_token_id, **kw)
        self.marker_ids = as_id_list(marker_ids, "marker_ids")

    def setup(self, eng) -> None:
        super().setup(eng)
        B, C, D = eng.B, eng.C, eng.parts.config.hidden_size
        model = eng.parts.model
        if not hasattr(model, "thinking"):
            raise TypeError(f"ThinkingPolicy needs a HybridThinkingLM, got {type(model).__name__}")
        self.thinking_mod = model.thinking
        self.soft = not self.thinking_mod.uses_projection
        M = len(self.marker_ids)
        self.marker = eng.buffer("marker", (M,), torch.long, torch.tensor(self.marker_ids))
        self.recent = eng.buffer("recent", (B, M), torch.long, -1)
        self.thinking = eng.buffer("thinking", (B,), torch.bool, True)
        self.think = eng.buffer("think", (B, C), torch.bool, False)
        self.states = eng.buffer("states", (B, C, D), eng.dtype, 0)
        self.ratios = eng.buffer("ratios", (B, C), torch.float32, 0)

    def buffers(self):
        return super().buffers() + [self.marker, self.recent, self.thinking, self.think, self.states, self.ratios]

    def next_embeds(self, eng, tok, h, probs, live):
        self.recent.copy_(torch.cat([self.recent[:, 1:], tok[:, None]], 1))
        self.thinking.logical_and_(~(self.recent == self.marker).all(-1))
        mix = self.thinking & live
        e = eng.parts.embedding(tok)
        if self.soft:  # the original HRPO state: probs @ E / ||probs||_2
            E = eng.parts.embedding.weight
            state = (probs.to(E.dtype) @ E) / probs.pow(2).sum(-1, keepdim=True).sqrt().to(E.dtype)
        else:
            state = h
        mixed, a = self.thinking_mod(e, state)
        _write(self.think, eng.t, mix)
        _write(self.states, eng.t, state.to(e.dtype))
        _write(self.ratios, eng.t, a.float().mean(-1))
        return torch.where(mix[:, None], mixed.to(e.dtype), e)

    def finish(self, eng, steps: int) -> Rollout:
        ro = super().finish(eng, steps)
        n = ro.completion_ids.shape[1]
        think = self.think[:, :n].clone()
        if n == steps:
            think[:, steps - 1] = False  # the last token's embedding feeds no prediction
        ro.thinking_mask = think
        ro.thinking_hidden = self.states[:, :n][think]
        ro.embeds_ratio = self.ratios[:, :n][think]
        return ro
