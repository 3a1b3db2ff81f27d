"""GSM8K-style rewards: the answer follows the ``####`` marker.

A reward function takes ``(completions: list[str], answers: list[str])`` and returns
one float per completion; ``answers`` are gold strings (a full GSM8K answer or a bare
number). Register new ones in ``REWARDS`` or pass callables to the trainer.
"""
from __future__ import annotations

import re
from typing import Callable

MARKER = "####"
RewardFn = Callable[[list, list], list]

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def normalize_number(text: str) -> str | None:
    """Canonical number string: drop ``$``/commas/spaces, trailing ``.0``, leading ``+``."""
    if text is None:
        return None
    s = text.strip().replace("$", "").replace(",", "").replace(" ", "").rstrip(".")
    s = s.lstrip("+")
    m = _NUMBER.search(s)
    if m is None:
        return None
    s = m.group(0).replace(",", "")
    if "." in s:
        s = s.rstrip("0").rstrip(".") or "0"
    if s in ("-0", ""):
        s = "0"
    return s


def extract_answer(text: str, marker: str = MARKER) -> str | None:
    """Normalised number after the last ``marker`` (first number on that line)."""
    if text is None or marker not in text:
        return None
    tail = text.rsplit(marker, 1)[1].strip().split("\n", 1)[0]
    return normalize_number(tail)


def gold_answer(answer: str, marker: str = MARKER) -> str | None:
    """Gold number from a GSM8K answer field (or a bare number)."""
    return extract_answer(answer, marker) if marker in answer else normalize_number(answer)


def correctness_reward(completions, answers, marker: str = MARKER) -> list[float]:
    """1.0 when the number after the marker equals the gold number, else 0.0."""
    out = []
    for c, a in zip(completions, answers):
        pred, gold = extract_answer(c, marker), gold_answer(a, marker)
        out.append(1.0 if pred is not None and pred == gold else 0.0)
    return out


def format_reward(completions, answers=None, marker: str = MARKER) -> list[float]:
    """1.0 when the completion holds exactly one marker followed by a number."""
    return [1.0 if c.count(marker) == 1 and extract_answer(c, marker) is not None else 0.0 for c in completions]


REWARDS: dict[str, RewardFn] = {"correctness": correctness_reward, "format": format_reward}


def get_reward_funcs(names) -> list[RewardFn]:
    """Callables for names in ``REWARDS`` (callables pass through)."""
    funcs = []
    for n in names:
        if callable(n):
            funcs.append(n)
        elif n in REWARDS:
            funcs.append(REWARDS[n])
        else:
            raise ValueError(f"unknown reward {n!r}; known: {sorted(REWARDS)}")
    return funcs
