"""What a rollout returns, and which token ids end a completion."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


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


def as_id_list(ids, name: str) -> list[int]:
    ids = [ids] if isinstance(ids, int) else list(ids) if isinstance(ids, Sequence) else ids
    if not isinstance(ids, list) or not ids or not all(isinstance(i, int) for i in ids):
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
