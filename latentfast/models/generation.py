"""HRPO rollouts: the decode engine (``latentfast.generation``) with the thinking policy.

A row is "thinking" until it emits the answer marker (``####``), detected on token
ids. While thinking, the next input embedding is ``thinking_residual(embed(token),
state)`` where ``state`` comes from the last hidden state (projection mode) or the
sampling distribution (soft-embedding mode). The hidden states (or soft states) at
thinking positions are kept, packed N_think x D, for the training forward.
"""
from __future__ import annotations

from collections.abc import Sequence

from latentfast.generation import Rollout, ThinkingPolicy, eos_token_ids
from latentfast.generation import generate as decode_with

__all__ = ["Rollout", "eos_token_ids", "generate"]


def generate(model, prompt_ids, prompt_mask, max_new_tokens: int, *, eos_token_id: int | Sequence[int],
             pad_token_id: int, marker_ids: list[int], temperature: float = 0.5, top_p: float = 1.0, top_k: int = 0,
             do_sample: bool = True, generator=None, sync_ranks: bool = True, check_every: int = 8,
             compile: bool | None = None) -> Rollout:
    """Sample (or greedy-decode) completions from a ``HybridThinkingLM``: the one decode engine,
    ``latentfast.generation.generate``, with HRPO's ``ThinkingPolicy``.

    ``eos_token_id``: one id or several (chat models end turns with e.g. both
    ``<|im_end|>`` and ``<|endoftext|>``; see ``eos_token_ids``).
    ``marker_ids``: token ids of the answer marker; thinking ends once a row's last
    ``len(marker_ids)`` tokens equal them (the marker's last token is not mixed).
    ``check_every``: decoding steps between host synchronisations (all rows done?); up to
    ``check_every - 1`` padding steps past the end may be decoded, and are trimmed.
    ``sync_ranks``: when torch.distributed is initialised with several ranks, every
    rank keeps decoding (finished rows emit padding) until all ranks' rows are done,
    so sharded (FSDP) forwards stay collective; pass False when only this rank calls.
    ``compile``: see ``latentfast.generation.generate``.
    """
    return decode_with(model, prompt_ids, prompt_mask, max_new_tokens, eos_token_id=eos_token_id,
                       pad_token_id=pad_token_id, generator=generator, sync_ranks=sync_ranks, check_every=check_every,
                       compile=compile, policy=ThinkingPolicy(marker_ids, eos_token_id, pad_token_id,
                                                              do_sample=do_sample, temperature=temperature,
                                                              top_k=top_k, top_p=top_p))
