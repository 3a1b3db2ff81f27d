"""Hybrid-thinking generation with the KV cache.

A row is "thinking" until it emits the answer marker (``####``), detected on token
ids. While thinking, the next input embedding is ``thinking_residual(embed(token),
state)`` where ``state`` comes from the last hidden state (projection mode) or the
sampling distribution (soft-embedding mode). The hidden states (or soft states) at
thinking positions are kept, packed N_think x D, for the training forward.
"""
from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache


def _cache_kw(transformer) -> str:
    # transformers >= 5.2x renamed ``past_key_values`` to ``cache``; support both.
    return "cache" if "cache" in inspect.signature(type(transformer).forward).parameters else "past_key_values"


@dataclass
class Rollout:
    prompt_ids: torch.Tensor       # B x P, left-padded
    prompt_mask: torch.Tensor      # B x P
    completion_ids: torch.Tensor   # B x C, right-padded with pad_token_id
    completion_mask: torch.Tensor  # B x C, 1 up to and including EOS
    thinking_mask: torch.Tensor    # B x C bool: input embedding mixed with a thinking state
    thinking_hidden: torch.Tensor  # N x D, row-major over thinking_mask: raw hidden (projection) or state (soft)
    embeds_ratio: torch.Tensor     # N: a.mean(-1) at each thinking position

    def as_batch(self) -> dict:
        return {k: getattr(self, k) for k in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask",
                                               "thinking_mask", "thinking_hidden")}

    def to(self, device) -> "Rollout":
        return Rollout(**{k: v.to(device) for k, v in self.__dict__.items()})


def _sample(logits: torch.Tensor, temperature: float, top_p: float, do_sample: bool, generator=None):
    """Next tokens and the distribution they were drawn from (for the soft embedding)."""
    probs = torch.softmax(logits / max(temperature, 1e-6), -1)
    if not do_sample:
        return logits.argmax(-1), probs
    if top_p < 1.0:
        sp, si = probs.sort(-1, descending=True)
        drop = sp.cumsum(-1) - sp > top_p  # keep the smallest prefix reaching top_p
        sp = sp.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, si, sp)
        probs = probs / probs.sum(-1, keepdim=True)
    # exponential race (Gumbel-max): an exact categorical draw, no host sync, cheaper than multinomial
    race = torch.empty_like(probs).exponential_(generator=generator)
    return (probs / race).argmax(-1), probs


def _as_list(ids, name: str) -> list[int]:
    ids = [ids] if isinstance(ids, int) else list(ids)
    if not ids or not all(isinstance(i, int) for i in ids):
        raise ValueError(f"{name} must be an int or a non-empty sequence of ints, got {ids!r}")
    return ids


def eos_token_ids(tokenizer, model=None) -> list[int]:
    """Every id that ends a completion: the tokenizer's EOS plus the model's
    ``generation_config.eos_token_id`` (an int or a list in HF checkpoints)."""
    ids = [tokenizer.eos_token_id]
    gen_cfg = getattr(model, "generation_config", None) if model is not None else None
    extra = getattr(gen_cfg, "eos_token_id", None)
    ids += [extra] if isinstance(extra, int) else list(extra or [])
    return list(dict.fromkeys(i for i in ids if i is not None))


@torch.no_grad()
def generate(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, max_new_tokens: int, *,
             eos_token_id: int | Sequence[int], pad_token_id: int, marker_ids: list[int], temperature: float = 0.5,
             top_p: float = 1.0, do_sample: bool = True, generator=None, sync_ranks: bool = True,
             check_every: int = 8) -> Rollout:
    """Sample (or greedy-decode) completions from a ``HybridThinkingLM``.

    ``eos_token_id``: one id or several (chat models end turns with e.g. both
    ``<|im_end|>`` and ``<|endoftext|>``; see ``eos_token_ids``).
    ``marker_ids``: token ids of the answer marker; thinking ends once a row's last
    ``len(marker_ids)`` tokens equal them (the marker's last token is not mixed).
    ``check_every``: decoding steps between host synchronisations. A step queues its
    work without waiting for the device (every row is mixed and masked on device); only
    every ``check_every`` steps does the host look at whether all rows are done and pack
    that window's thinking states, so up to ``check_every - 1`` steps past the end may
    be decoded (as padding) and are trimmed from the result.
    ``sync_ranks``: when torch.distributed is initialised with several ranks, every
    rank keeps decoding (finished rows emit padding) until all ranks' rows are done,
    so sharded (FSDP) forwards stay collective; pass False when only this rank calls.
    """
    if check_every < 1:
        raise ValueError(f"check_every must be >= 1, got {check_every}")
    B, device = prompt_ids.shape[0], prompt_ids.device
    collective = (sync_ranks and torch.distributed.is_available() and torch.distributed.is_initialized()
                  and torch.distributed.get_world_size() > 1)
    thinking_mod, tf = model.thinking, model.transformer
    W, bias = model.lm_head_weight(), model.lm_head_bias()
    E = model.hf_model.get_input_embeddings().weight
    soft = not thinking_mod.uses_projection
    marker = torch.tensor(marker_ids, device=device)
    eos = torch.tensor(_as_list(eos_token_id, "eos_token_id"), device=device)
    recent = torch.full((B, len(marker_ids)), -1, dtype=torch.long, device=device)

    cache = DynamicCache()
    kv = {_cache_kw(tf): cache}
    attn = prompt_mask.long()
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    out = tf(inputs_embeds=model.embed(prompt_ids), attention_mask=attn, position_ids=pos,
             use_cache=True, **kv)
    h = out.last_hidden_state[:, -1]
    next_pos = pos[:, -1:] + 1

    thinking = torch.ones(B, dtype=torch.bool, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    toks, comp_mask, think_mask = [], [], []
    window = _StateWindow(max_new_tokens)
    for step in range(max_new_tokens):
        logits = F.linear(h, W, bias).float()
        tok, probs = _sample(logits, temperature, top_p, do_sample, generator)
        tok = torch.where(finished, torch.full_like(tok, pad_token_id), tok)
        recent = torch.cat([recent[:, 1:], tok[:, None]], 1)
        thinking &= ~(recent == marker).all(-1)
        is_eos = torch.isin(tok, eos)
        mix = thinking & ~finished & ~is_eos  # all False once every row is done
        toks.append(tok)
        comp_mask.append(~finished)
        finished = finished | is_eos
        last = step == max_new_tokens - 1
        if not last and (step + 1) % check_every == 0:  # the loop's only host synchronisation
            done = finished.all().to(torch.int32)
            if collective:  # stop only once every rank is done
                torch.distributed.all_reduce(done, op=torch.distributed.ReduceOp.MIN)
            last = bool(done)
        if last:
            think_mask.append(torch.zeros_like(mix))  # the last token's embedding feeds no prediction
            break
        think_mask.append(mix)
        e = model.embed(tok)
        if soft:  # the original HRPO state: probs @ E / ||probs||_2
            state = (probs.to(E.dtype) @ E) / probs.pow(2).sum(-1, keepdim=True).sqrt().to(E.dtype)
        else:
            state = h
        mixed, a = thinking_mod(e, state)
        e = torch.where(mix[:, None], mixed.to(e.dtype), e)
        window.add(step, mix, state.to(e.dtype), a.float().mean(-1))
        if (step + 1) % check_every == 0:
            window.pack()
        attn = torch.cat([attn, comp_mask[-1].long()[:, None]], 1)
        out = tf(inputs_embeds=e[:, None], attention_mask=attn, position_ids=next_pos, use_cache=True,
                 **kv)
        h = out.last_hidden_state[:, -1]
        next_pos = next_pos + 1

    comp = torch.stack(comp_mask, 1)
    steps = int(comp.any(0).nonzero().max()) + 1  # trim the padding-only steps decoded past the end
    thinking_hidden, embeds_ratio = window.result(like=h)
    return Rollout(prompt_ids, prompt_mask.long(), torch.stack(toks, 1)[:, :steps], comp[:, :steps].long(),
                   torch.stack(think_mask, 1)[:, :steps], thinking_hidden, embeds_ratio)


class _StateWindow:
    """Thinking states of the last few steps, (B, D) each, packed to the mixed rows
    only when the host synchronises anyway (one ``nonzero`` per window)."""

    def __init__(self, max_new_tokens: int):
        self.max_new_tokens = max_new_tokens
        self.steps, self.masks, self.states, self.ratios = [], [], [], []
        self.packed_states, self.packed_where, self.packed_ratios = [], [], []

    def add(self, step, mix, state, ratio):
        self.steps.append(step)
        self.masks.append(mix)
        self.states.append(state)
        self.ratios.append(ratio)

    def pack(self):
        if not self.steps:
            return
        rows, cols = torch.stack(self.masks, 1).nonzero(as_tuple=True)  # B x k window
        steps = torch.tensor(self.steps, device=rows.device)[cols]
        self.packed_states.append(torch.stack(self.states, 1)[rows, cols])
        self.packed_ratios.append(torch.stack(self.ratios, 1)[rows, cols])
        self.packed_where.append(rows * self.max_new_tokens + steps)
        self.steps, self.masks, self.states, self.ratios = [], [], [], []

    def result(self, like: torch.Tensor):
        """(N x D states, N ratios), row-major over the thinking mask."""
        self.pack()
        if not self.packed_where:
            return like.new_zeros(0, like.shape[-1]), like.new_zeros(0, dtype=torch.float32)
        order = torch.cat(self.packed_where).argsort()
        return torch.cat(self.packed_states)[order], torch.cat(self.packed_ratios)[order]
