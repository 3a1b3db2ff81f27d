"""Plain PyTorch ground truth for the decode engine: the loop latentfast used before
``latentfast.generation`` (``DynamicCache``, the attention mask grown with ``torch.cat``,
one eager forward per step, the host checking every step whether all rows are done).

``hybrid_generate`` is HRPO's rollout (a ``HybridThinkingLM``; ``marker_ids=None`` turns
thinking off: plain decoding of any HF causal LM that accepts ``inputs_embeds``). The
engine is tested against it: same tokens, masks, states and ratios.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from latentfast.hf import adapter


def reference_sample(logits: torch.Tensor, temperature: float, top_p: float, do_sample: bool, generator=None):
    """Next tokens and their distribution: greedy argmax, or top-p + exponential race."""
    probs = torch.softmax(logits / max(temperature, 1e-6), -1)
    if not do_sample:
        return logits.argmax(-1), probs
    if top_p < 1.0:
        sp, si = probs.sort(-1, descending=True)
        drop = sp.cumsum(-1) - sp > top_p
        sp = sp.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, si, sp)
        probs = probs / probs.sum(-1, keepdim=True)
    race = torch.empty_like(probs).exponential_(generator=generator)
    return (probs / race).argmax(-1), probs


@torch.no_grad()
def hybrid_generate(model, prompt_ids, prompt_mask, max_new_tokens: int, *, eos_token_id, pad_token_id: int,
                    marker_ids=None, temperature: float = 1.0, top_p: float = 1.0, do_sample: bool = False,
                    generator=None) -> dict:
    """dict of completion_ids, completion_mask, thinking_mask, thinking_hidden, embeds_ratio."""
    hf = adapter.unwrap(model.hf_model if hasattr(model, "hf_model") else model)
    tf, embed, head = adapter.decoder(hf), hf.get_input_embeddings(), hf.get_output_embeddings()
    thinking_mod = model.thinking if marker_ids is not None else None
    B, device = prompt_ids.shape[0], prompt_ids.device
    eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id), device=device)
    kw = {adapter.cache_kwarg(tf): DynamicCache()}
    attn = prompt_mask.long()
    pos = adapter.positions_from_mask(attn)
    h = tf(inputs_embeds=embed(prompt_ids), attention_mask=attn, position_ids=pos, use_cache=True,
           **kw).last_hidden_state[:, -1]
    next_pos = pos[:, -1:] + 1
    marker = torch.tensor(marker_ids or [-2], device=device)
    recent = torch.full((B, marker.numel()), -1, dtype=torch.long, device=device)
    thinking = torch.full((B,), thinking_mod is not None, dtype=torch.bool, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    toks, comp, think, states, ratios = [], [], [], [], []
    for step in range(max_new_tokens):
        logits = F.linear(h, head.weight, getattr(head, "bias", None)).float()
        tok, probs = reference_sample(logits, temperature, top_p, do_sample, generator)
        tok = torch.where(finished, torch.full_like(tok, pad_token_id), tok)
        recent = torch.cat([recent[:, 1:], tok[:, None]], 1)
        thinking &= ~(recent == marker).all(-1)
        is_eos = torch.isin(tok, eos)
        mix = thinking & ~finished & ~is_eos
        toks.append(tok)
        comp.append(~finished)
        finished = finished | is_eos
        if step == max_new_tokens - 1 or bool(finished.all()):
            think.append(torch.zeros_like(mix))  # the last token's embedding feeds no prediction
            break
        think.append(mix)
        e = embed(tok)
        if thinking_mod is not None:
            if thinking_mod.uses_projection:
                state = h
            else:
                E = embed.weight
                state = (probs.to(E.dtype) @ E) / probs.pow(2).sum(-1, keepdim=True).sqrt().to(E.dtype)
            mixed, a = thinking_mod(e, state)
            e = torch.where(mix[:, None], mixed.to(e.dtype), e)
            states.append(state.to(e.dtype))
            ratios.append(a.float().mean(-1))
        attn = torch.cat([attn, comp[-1].long()[:, None]], 1)
        h = tf(inputs_embeds=e[:, None], attention_mask=attn, position_ids=next_pos, use_cache=True,
               **kw).last_hidden_state[:, -1]
        next_pos = next_pos + 1
    think_mask = torch.stack(think, 1)
    if states:  # row-major over the thinking mask (the last step has no state)
        keep = think_mask[:, :len(states)]
        hidden, ratio = torch.stack(states, 1)[keep], torch.stack(ratios, 1)[keep]
    else:
        hidden, ratio = h.new_zeros(0, h.shape[-1]), h.new_zeros(0, dtype=torch.float32)
    return dict(completion_ids=torch.stack(toks, 1), completion_mask=torch.stack(comp, 1).long(),
                thinking_mask=think_mask, thinking_hidden=hidden, embeds_ratio=ratio)
