"""HRPO's thinking policy: a ``HybridThinkingLM`` behind the RL trainer's policy protocol (``policy.py``).

    policy.rollout(prompt_ids, prompt_mask, sampling, generator) -> Rollout   the decode engine with hybrid
                                                thinking until the answer marker (thinking_mask / _hidden)
    policy.module        the HybridThinkingLM itself: forward(batch, recompute) -> (hidden (B, C, H), aux),
                         so the loop wraps, shards and checkpoints it under HRPO's parameter names
    policy.head()        its lm_head (weight, bias); also ``reference_head()`` (the adapters leave it alone)
    policy.reference()   the same weights with the adapters (LoRA and HRPO's modules_to_save copies)
                         disabled; None without LoRA (beta = 0)
"""
from __future__ import annotations

import contextlib

import torch

from latentfast.generation import Rollout, eos_token_ids, generate

from .policy import Sampling


class ThinkingLMPolicy:
    """``model``: a ``HybridThinkingLM`` (plain or with ``add_lora``)."""

    def __init__(self, model, tokenizer):
        self.module, self.tok = model, tokenizer
        self.eos = eos_token_ids(tokenizer, model.hf_model)
        self.pad = tokenizer.pad_token_id
        self.marker_ids = tokenizer.encode(model.cfg.answer_marker, add_special_tokens=False)

    @torch.no_grad()
    def rollout(self, prompt_ids, prompt_mask, sampling: Sampling, generator=None) -> Rollout:
        return generate(self.module, prompt_ids, prompt_mask, sampling.max_completion_length, eos_token_id=self.eos,
                        pad_token_id=self.pad, marker_ids=self.marker_ids, do_sample=sampling.do_sample,
                        temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p,
                        generator=generator)

    def head(self):
        return self.module.lm_head_weight(), self.module.lm_head_bias()

    reference_head = head

    def reference(self):
        """``with policy.reference() as ref: h, _ = ref(batch)`` (no grad); None: no adapters, no reference."""
        if not hasattr(self.module.lm, "disable_adapter"):
            return None
        return _adapters_off(self.module)


@contextlib.contextmanager
def _adapters_off(model):
    with torch.no_grad(), model.reference():
        yield model


__all__ = ["ThinkingLMPolicy"]
