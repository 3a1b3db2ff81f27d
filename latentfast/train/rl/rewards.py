"""Reward functions for the RL trainers, given as TRL gives them (``--reward_funcs``):

    module:function   a TRL-signature callable ``f(prompts, completions, completion_ids, **columns)
                      -> list[float | None]`` (every other dataset column arrives as a keyword list)
    a folder          a local reward model (``*ForSequenceClassification``): the score of prompt + completion
    accuracy          built in: 1.0 when the completion's answer equals the row's ``answer`` column

``None`` from a function marks a completion it cannot score (NaN, left out of the group
baselines, as TRL). ``score`` returns the (N, F) per-function rewards.
"""
from __future__ import annotations

import importlib
import pathlib
import re

import torch

from latentfast.data.rewards import normalize_number

_ANSWER_IS = re.compile(r"answer is\s*\$?\s*(-?[\d,]*\.?\d+)", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def first_answer(text: str) -> str | None:
    """The answer of the completion's first answer block (a base model continues with more
    'Question:' blocks): the number after 'answer is' / '####', else the last number."""
    block = re.split(r"\n\s*Question:|\n\n", text, maxsplit=1)[0]
    m = _ANSWER_IS.search(block)
    if m is None and "####" in block:
        m = _NUMBER.search(block.rsplit("####", 1)[1])
        return normalize_number(m.group(0)) if m else None
    if m is not None:
        return normalize_number(m.group(1))
    nums = _NUMBER.findall(block)
    return normalize_number(nums[-1]) if nums else None


def accuracy(prompts, completions, answer=None, **_) -> list[float]:
    """1.0 when the completion's first answer equals the gold ``answer`` column (a number)."""
    if answer is None:
        raise ValueError("the 'accuracy' reward needs an 'answer' column in the dataset")
    out = []
    for c, a in zip(completions, answer):
        text = c if isinstance(c, str) else c[-1]["content"]
        pred, gold = first_answer(text), normalize_number(str(a))
        out.append(1.0 if pred is not None and pred == gold else 0.0)
    return out


BUILTIN = {"accuracy": accuracy}


class RewardModelFn:
    """A local sequence-classification reward model as a reward function (logit 0 of prompt + completion)."""

    def __init__(self, path: str, device, dtype=torch.float32):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.__name__ = pathlib.Path(path).name
        self.tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModelForSequenceClassification.from_pretrained(path, local_files_only=True, dtype=dtype)
        self.model.to(device).eval().requires_grad_(False)
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        self.device = device

    @torch.no_grad()
    def __call__(self, prompts, completions, **_) -> list[float]:
        texts = [(p if isinstance(p, str) else "") + (c if isinstance(c, str) else c[-1]["content"])
                 for p, c in zip(prompts, completions)]
        out = []
        for i in range(0, len(texts), 8):
            enc = self.tok(texts[i:i + 8], return_tensors="pt", padding=True, truncation=True).to(self.device)
            out += self.model(**enc).logits[:, 0].float().tolist()
        return out


def resolve(spec: str, device=None):
    """One ``--reward_funcs`` entry -> a callable (errors name the entry and what was expected)."""
    if spec in BUILTIN:
        return BUILTIN[spec]
    if pathlib.Path(spec).is_dir():
        return RewardModelFn(spec, device or "cpu")
    if ":" in spec:
        mod, _, name = spec.partition(":")
        try:
            fn = getattr(importlib.import_module(mod), name)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"--reward_funcs {spec!r}: cannot import {name!r} from {mod!r} ({e})") from None
        if not callable(fn):
            raise ValueError(f"--reward_funcs {spec!r}: {name} is not callable")
        return fn
    raise ValueError(f"--reward_funcs {spec!r}: expected 'module:function', a local reward-model folder, or one of "
                     f"{sorted(BUILTIN)}")


def score(funcs, prompts: list, completions: list, completion_ids: list, columns: dict) -> torch.Tensor:
    """(N, F) float32 rewards, NaN where a function returned None."""
    cols = []
    for f in funcs:
        vals = f(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)
        if len(vals) != len(completions):
            raise ValueError(f"reward function {getattr(f, '__name__', f)!r} returned {len(vals)} rewards for "
                             f"{len(completions)} completions")
        cols.append([float("nan") if v is None else float(v) for v in vals])
    return torch.tensor(cols, dtype=torch.float32).T.reshape(len(completions), len(funcs))


__all__ = ["BUILTIN", "RewardModelFn", "accuracy", "first_answer", "resolve", "score"]
