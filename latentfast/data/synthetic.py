"""Synthetic multi-step arithmetic in GSM8K format (no downloads).

Each item is ``{"question", "answer"}`` where ``answer`` holds one worked step per
line and ends with ``#### <number>``, exactly like GSM8K, so every loader, reward
and trainer treats both the same. Numbers stay small so a tiny model learns the
task in minutes on a CPU.
"""
from __future__ import annotations

import random

NAMES = ["Tom", "Ann", "Sam", "Mia", "Ben", "Lily", "Max", "Zoe"]
ITEMS = ["apples", "coins", "books", "pens", "cards", "eggs", "toys", "cookies"]


def _step(rng: random.Random, total: int, item: str) -> tuple[str, str, int]:
    """One operation on the running total: (sentence, worked line, new total)."""
    ops = ["add", "sub", "mul"] if total <= 10 else ["add", "sub"]
    op = rng.choice(ops)
    if op == "sub" and total < 2:
        op = "add"
    if op == "add":
        k = rng.randint(1, 9)
        return f"Then they get {k} more {item}.", f"{total}+{k}={total + k}", total + k
    if op == "sub":
        k = rng.randint(1, min(9, total - 1))
        return f"Then they lose {k} {item}.", f"{total}-{k}={total - k}", total - k
    k = rng.randint(2, 3)
    word = {2: "double", 3: "triple"}[k]
    return f"Then they {word} their {item}.", f"{total}*{k}={total * k}", total * k


def make_arithmetic(n: int, seed: int = 0, min_steps: int = 1, max_steps: int = 3) -> list[dict]:
    """``n`` deterministic word problems with ``min_steps..max_steps`` operations."""
    if not 1 <= min_steps <= max_steps:
        raise ValueError(f"need 1 <= min_steps <= max_steps, got {min_steps}, {max_steps}")
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        name, item = rng.choice(NAMES), rng.choice(ITEMS)
        total = rng.randint(1, 9)
        sentences, lines = [f"{name} has {total} {item}."], []
        for _ in range(rng.randint(min_steps, max_steps)):
            sentence, line, total = _step(rng, total, item)
            sentences.append(sentence)
            lines.append(line)
        sentences.append(f"How many {item} does {name} have?")
        out.append({"question": " ".join(sentences), "answer": "\n".join(lines + [f"#### {total}"])})
    return out


# the named synthetic sets: data name -> operations per problem (min, max)
SETS = {"synthetic": (1, 3), "synthetic_one_step": (1, 1)}


def synthetic_rows(name: str, n: int, seed: int = 0) -> list[dict]:
    """``n`` problems of the named set (``SETS``): ``synthetic`` (1-3 operations) or
    ``synthetic_one_step`` (one operation: a tiny model learns it in ~150 CPU steps)."""
    if name not in SETS:
        raise ValueError(f"unknown synthetic set {name!r}; known: {sorted(SETS)}")
    lo, hi = SETS[name]
    return make_arithmetic(n, seed=seed, min_steps=lo, max_steps=hi)


MODES = ("eq", "nl")
_NL_OPS = {"+": "plus", "-": "minus", "*": "times"}


def _nl_line(line: str) -> str:
    """'5+3=8' -> '5 plus 3 makes 8.' (the same step as a natural-language sentence)."""
    lhs, res = line.split("=")
    for sym, word in _NL_OPS.items():
        if sym in lhs:
            a, b = lhs.split(sym)
            return f"{a} {word} {b} makes {res}."
    raise ValueError(f"not an arithmetic step: {line!r}")


def make_two_mode_arithmetic(n: int, seed: int = 0, min_steps: int = 1, max_steps: int = 3,
                             modes=MODES) -> list[dict]:
    """``n`` problems, each written in every reasoning mode of ``modes``: ``eq`` (equation
    chain '5+3=8') and ``nl`` (natural-language chain '5 plus 3 makes 8.'). The question
    starts with its mode tag ('[eq] ...'), rows carry ``mode``; the answer line is the same."""
    bad = sorted(set(modes) - set(MODES))
    if bad:
        raise ValueError(f"modes must be among {MODES}, got {bad}")
    out = []
    for row in make_arithmetic(n, seed=seed, min_steps=min_steps, max_steps=max_steps):
        *lines, final = row["answer"].split("\n")
        for mode in modes:
            steps = lines if mode == "eq" else [_nl_line(x) for x in lines]
            out.append({"question": f"[{mode}] {row['question']}", "answer": "\n".join(steps + [final]),
                        "mode": mode})
    return out
