"""The policy protocol the RL trainer drives, and its implementation for any Hugging Face
causal LM (plain or PEFT-wrapped).

    policy.rollout(prompt_ids, prompt_mask, sampling, generator) -> Rollout   the one decode engine
    policy.module                                        nn.Module the loop wraps (DDP/FSDP) and trains;
                                                         its forward(batch) -> (hidden (B, C, H), aux)
    policy.head() -> (weight, bias)                      the lm_head for the fused losses (no logits)
    policy.reference_head() -> (weight, bias)            the reference's lm_head (a frozen copy has its own)
    policy.reference() -> context | None                 where ``module`` computes the reference: the base
                                                         with the LoRA adapter disabled (no second copy, as
                                                         TRL), a frozen copy without LoRA, None for beta = 0

``hidden`` returns the final hidden states at the positions that *predict* each completion
token, so ``fused_linear_*_loss(hidden, *head(), completion_ids, ...)`` never builds the
(B, C, V) logits; a batch with ``input_ids`` gets every position's hidden states (B, T, H).
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import torch
from torch import nn

from latentfast.generation import Rollout, eos_token_ids, generate
from latentfast.hf.adapter import decoder, lm_head_bias, lm_head_weight, run_decoder, unwrap


@dataclass
class Sampling:
    """Rollout sampling (TRL GRPOConfig's names)."""

    max_completion_length: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    do_sample: bool = True


def completion_hidden(lm: nn.Module, prompt_ids, prompt_mask, completion_ids, completion_mask):
    """One decoder pass over prompt (left-padded) + completion (right-padded), positions from
    the joined mask; the hidden states predicting each completion token (B, C, H) and the
    MoE aux loss (0 for dense models)."""
    tf = decoder(lm)
    ids = torch.cat([prompt_ids, completion_ids], 1)
    mask = torch.cat([prompt_mask, completion_mask], 1)
    out = run_decoder(None, tf.get_input_embeddings()(ids), mask, transformer=tf)
    P = prompt_ids.shape[1]
    h = out.last_hidden_state[:, P - 1:-1]
    aux = getattr(out, "aux_loss", None)
    return h, (aux if aux is not None else h.new_zeros(()))


class CompletionHidden(nn.Module):
    """The trained module: ``forward(batch)`` -> completion hidden states (+ aux)."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, batch: dict):
        if "input_ids" in batch:  # whole sequences (losses on spans inside them, e.g. multi-turn DPO)
            out = decoder(self.lm)(input_ids=batch["input_ids"])
            aux = getattr(out, "aux_loss", None)
            h = out.last_hidden_state
            return h, (aux if aux is not None else h.new_zeros(()))
        return completion_hidden(self.lm, batch["prompt_ids"], batch["prompt_mask"], batch["completion_ids"],
                                 batch["completion_mask"])


class CausalLMPolicy:
    """Any HF causal LM accepting ``inputs_embeds`` (Qwen2, Llama, Gemma3, MiniMind, ...).
    ``reference``: ``"adapter"`` (a PEFT model: disable the adapter), ``"copy"`` (a frozen
    deep copy of the starting weights) or ``None`` (no reference: beta = 0)."""

    def __init__(self, lm: nn.Module, tokenizer, reference: str | None = "adapter"):
        if reference == "adapter" and not hasattr(lm, "disable_adapter"):
            reference = "copy"
        self.lm, self.tok = lm, tokenizer
        self.module = CompletionHidden(lm)
        self.eos = eos_token_ids(tokenizer, unwrap(lm))
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos[0]
        self.ref_kind = reference
        self._ref = None
        if reference == "copy":
            self._ref = CompletionHidden(copy.deepcopy(unwrap(lm))).eval().requires_grad_(False)

    @torch.no_grad()
    def rollout(self, prompt_ids, prompt_mask, sampling: Sampling, generator=None) -> Rollout:
        lm = unwrap(self.lm) if not hasattr(self.lm, "disable_adapter") else self.lm
        was = lm.training
        lm.eval()  # no dropout while sampling
        try:
            return generate(lm, prompt_ids, prompt_mask, sampling.max_completion_length, eos_token_id=self.eos,
                            pad_token_id=self.pad, do_sample=sampling.do_sample, temperature=sampling.temperature,
                            top_k=sampling.top_k, top_p=sampling.top_p, generator=generator)
        finally:
            lm.train(was)

    def head(self):
        return lm_head_weight(self.lm), lm_head_bias(self.lm)

    @property
    def reference_lm(self):
        """The frozen copy of the starting model (``reference="copy"``), else None."""
        return None if self._ref is None else self._ref.lm

    def reference_head(self):
        """The reference's lm_head: the frozen copy's own (the policy's head moves when it trains), else ``head()``."""
        if self.ref_kind == "copy":
            return lm_head_weight(self._ref.lm), lm_head_bias(self._ref.lm)
        return self.head()

    def reference(self):
        """``with policy.reference() as ref: h, _ = ref(batch)`` (no grad); None: no reference."""
        if self.ref_kind is None:
            return None
        if self.ref_kind == "copy":
            return _frozen(self._ref)
        return _adapter_off(self.lm, self.module)

    def truncated(self, ro: Rollout) -> torch.Tensor:
        """(B,) rows that ended without an EOS (TRL's ``mask_truncated_completions``)."""
        eos = torch.tensor(self.eos, device=ro.completion_ids.device)
        return ~(torch.isin(ro.completion_ids, eos) & ro.completion_mask.bool()).any(1)


@contextlib.contextmanager
def _frozen(module):
    with torch.no_grad():
        yield module


@contextlib.contextmanager
def _adapter_off(peft_model, module):
    was = module.training
    module.eval()  # the reference is deterministic (no LoRA dropout anyway: the adapter is off)
    try:
        with torch.no_grad(), peft_model.disable_adapter():
            yield module
    finally:
        module.train(was)


__all__ = ["CausalLMPolicy", "CompletionHidden", "Sampling", "completion_hidden"]
