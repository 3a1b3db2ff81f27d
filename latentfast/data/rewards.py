"""Rewards: the answer follows the ``####`` marker.

A reward function takes ``(completions: list[str], answers: list)`` and returns one float
per completion; ``answers`` are the task's gold values (for GSM8K a full answer or a bare
number). Register new ones in ``REWARDS`` or pass callables to the trainer.

``hrpo`` is the recipe's reward (HRPO ``utils.py``, ``get_reward_func``): 1.0 iff the
normalised text after the last marker equals the normalised gold AND the completion holds
exactly one marker. Its GSM8K normaliser is ``process_gsm8k_answer`` (the recipe's, edge
cases included: ``a/b`` is divided out, ``12.50`` -> ``12.5``, the last number wins, and
because numbers are found before commas are dropped ``1,234`` reads as ``234``).
``correctness`` / ``format`` are the split rewards (this project's normaliser).
Other tasks' normalisers live in ``latentfast.data.tasks``.
"""
from __future__ import annotations

import re
from typing import Callable

MARKER = "####"
REWARD_SCALE = 3.0  # reward-model scores are clipped to +-3; SPO maps rewards to [0, 1] with it
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


# ----------------------------------------------------------------------------- the recipe's reward
def extract_from_response(text: str, marker: str = MARKER) -> str:
    """The text after the last marker (all of it when there is none), one trailing ``.`` dropped."""
    ans = text.split(marker)[-1].strip()
    return ans[:-1].strip() if ans.endswith(".") else ans


def one_marker(text: str, marker: str = MARKER) -> bool:
    """Exactly one marker: the recipe's ``^(?:(?!M).)*M(?:(?!M).)*$`` (DOTALL) is true exactly
    when no occurrence starts 4+ characters after the first, i.e. one non-overlapping count
    (the count ``match_reward`` checks)."""
    return text.count(marker) == 1


def _literal(s: str) -> int | float:
    """A Python int/float literal, as the recipe's ``eval`` of a fraction reads its parts
    (int / int is Python's correctly rounded true division, also past 2**53)."""
    if re.fullmatch(r"0+|[1-9]\d*", s):
        return int(s)
    if re.fullmatch(r"\d*\.\d+|\d+\.\d*", s):
        return float(s)
    raise ValueError(s)  # e.g. leading zeros: a SyntaxError for eval


def _to_float(s: str) -> float:
    """``float(s)``, else a fraction ``a/b`` (the recipe falls back to ``eval``)."""
    try:
        return float(s)
    except ValueError:
        neg = s.startswith("-")
        a, b = (s[1:] if neg else s).split("/")  # the regex admits at most one slash
        q = _literal(a) / _literal(b)  # ZeroDivisionError: left as written
        return -q if neg else q


def delete_extra_zero(s: str) -> str:
    """The recipe's number canonicalisation: ``12.50`` -> ``12.5``, ``3.0`` -> ``3``,
    ``3/4`` -> ``0.75``; what does not parse is returned unchanged."""
    try:
        x = _to_float(s)
    except (ValueError, ZeroDivisionError):
        return s
    t = str(x).rstrip("0")  # (str() of a huge float is ``1e+20``: ``1e+2`` -> "100.0", as the recipe)
    return str(int(t.rstrip("."))) if t.endswith(".") else str(float(t))


_GSM8K_NUMBER = re.compile(r"-?\d+/?\.?\d*")


def process_gsm8k_answer(pred: str) -> str:
    """The recipe's GSM8K normaliser: the last number in ``pred``, canonicalised ("" if none)."""
    pred = pred.strip("\n").rstrip(".").rstrip("/").strip(" ")
    nums = [delete_extra_zero(m.replace(",", "")) for m in _GSM8K_NUMBER.findall(pred)]
    return nums[-1].rstrip(".").rstrip("/") if nums else ""


def gsm8k_gold(answer: str, marker: str = MARKER) -> str:
    """Gold from a GSM8K answer field: the text after the (first) marker, or a bare answer."""
    return answer.split(marker)[1].strip() if marker in answer else answer


MARKER_RULES = ("one", "any", None)


def match_reward(normalize: Callable[[str], str], gold: Callable = lambda a: a, markers: str | None = "one",
                 marker: str = MARKER) -> RewardFn:
    """1.0 iff ``normalize(text after the last marker)`` equals a normalised gold value and the
    marker count passes ``markers``: ``"one"`` exactly one (the recipe's training reward),
    ``"any"`` at least one, ``None`` unchecked (the recipe's ``eval_*.py`` accuracy).
    ``gold(answer)`` gives the gold text, or a list of acceptable ones (open-domain QA)."""
    if markers not in MARKER_RULES:
        raise ValueError(f"markers must be one of {MARKER_RULES}, got {markers!r}")

    def reward(completions, answers) -> list[float]:
        out = []
        for c, a in zip(completions, answers):
            n = c.count(marker)
            if (markers == "one" and n != 1) or (markers == "any" and n == 0):
                out.append(0.0)
                continue
            golds = gold(a)
            golds = [golds] if isinstance(golds, str) else list(golds)
            pred = normalize(extract_from_response(c, marker))
            out.append(1.0 if any(pred == normalize(g) for g in golds) else 0.0)
        return out
    return reward


def marker_format_reward(completions, answers=None, marker: str = MARKER) -> list[float]:
    """1.0 when the completion holds exactly one marker (the format half of the recipe's reward)."""
    return [1.0 if one_marker(c, marker) else 0.0 for c in completions]


hrpo_gsm8k_reward = match_reward(process_gsm8k_answer, gsm8k_gold)

REWARDS: dict[str, RewardFn] = {"correctness": correctness_reward, "format": format_reward,
                                "hrpo": hrpo_gsm8k_reward}


def get_reward_funcs(names, task=None) -> list[RewardFn]:
    """Callables for names in ``task.rewards`` (a ``latentfast.data.tasks`` task), else in
    ``REWARDS`` (GSM8K); callables pass through."""
    table = task.rewards if task is not None else REWARDS
    funcs = []
    for n in names:
        if callable(n):
            funcs.append(n)
        elif n in table:
            funcs.append(table[n])
        else:
            raise ValueError(f"unknown reward {n!r}; known: {sorted(table)}")
    return funcs
