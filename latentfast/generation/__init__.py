"""``latentfast.generation``: one decode engine for every rollout and evaluation.

    from latentfast.generation import generate
    ro = generate(model, input_ids, attention_mask, 256, eos_token_id=[im_end, eot], pad_token_id=pad,
                  do_sample=True, temperature=0.7, top_p=0.95, generator=g)
    ro.completion_ids, ro.completion_mask

    ro = generate(hybrid_lm, input_ids, attention_mask, 256, eos_token_id=eos, pad_token_id=pad,
                  marker_ids=tok.encode("####", add_special_tokens=False), do_sample=True)  # HRPO
    ro.thinking_mask, ro.thinking_hidden, ro.embeds_ratio

``model``: any HF causal LM that accepts ``inputs_embeds`` (Qwen2, Llama, MiniMind, ...),
under PEFT, or a latentfast wrapper (``HybridThinkingLM``, ``CODIModel``). ``marker_ids``
selects HRPO's ``ThinkingPolicy``; see ``engine.py`` for the design and ``policies.py``.
"""
from __future__ import annotations

from .engine import DecoderParts, decode
from .policies import SamplingPolicy, ThinkingPolicy
from .rollout import Rollout, eos_token_ids

__all__ = ["generate", "decode", "DecoderParts", "Rollout", "SamplingPolicy", "ThinkingPolicy", "eos_token_ids"]


def generate(model, input_ids, attention_mask, max_new_tokens: int, *, eos_token_id, pad_token_id: int,
             do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, generator=None,
             marker_ids=None, policy=None, sync_ranks: bool = True, check_every: int = 8,
             compile: bool | None = None) -> Rollout:
    """Decode up to ``max_new_tokens`` per row from left-padded prompts; returns a ``Rollout``
    (``completion_ids`` right-padded with ``pad_token_id``, ``completion_mask`` 1 up to and
    including the first of the ``eos_token_id`` ids).

    ``marker_ids``: the answer marker's token ids: hybrid thinking (``ThinkingPolicy``, ``model`` a
    ``HybridThinkingLM``) until a row's last ``len(marker_ids)`` tokens equal them; the marker's
    last token is not mixed. ``policy``: ``None`` = ``SamplingPolicy`` (or ``ThinkingPolicy``
    with ``marker_ids``) with the sampling arguments above (greedy unless ``do_sample``); a
    policy object overrides them. ``check_every``: steps between host
    syncs (up to ``check_every - 1`` padding steps past the end are decoded, then trimmed).
    ``sync_ranks``: under torch.distributed every rank steps until all are done.
    ``compile``: compile the one-token step (``None``: on unless ``LATENTFAST_COMPILE=0`` or
    the model is FSDP-sharded; falls back to eager, logged once, if compiling fails).
    """
    if policy is None:
        sampling = dict(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p)
        policy = SamplingPolicy(eos_token_id, pad_token_id, **sampling) if marker_ids is None else \
            ThinkingPolicy(marker_ids, eos_token_id, pad_token_id, **sampling)
    ro = decode(model, input_ids, attention_mask, max_new_tokens, policy, generator=generator, sync_ranks=sync_ranks,
                check_every=check_every, compile=compile)
    ro.prompt_ids, ro.prompt_mask = input_ids, attention_mask.long()
    return ro
