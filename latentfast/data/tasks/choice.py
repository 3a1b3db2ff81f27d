"""Multiple choice, as the recipe asks it (``hrpo_mmlu.py``, ``eval_mmlust.py``, ``eval_arcc.py``):
``Question: {q}\\nOptions:\\nA. {c0}\\nB. {c1}...``; the answer a letter. ``process_mmlu_answer``
takes the last standalone letter A-J of the upper-cased answer (so a trailing English "a"
counts as A, as in the recipe), else the answer itself."""
from __future__ import annotations

import re

LETTERS = "ABCDEFGHIJ"
_LETTER = re.compile(r"\b(A|B|C|D|E|F|G|H|I|J)\b")


def choice_prompt(question: str, choices) -> str:
    lines = [f"Question: {question}", "Options:"] + [f"{chr(65 + i)}. {c}" for i, c in enumerate(choices)]
    return "\n".join(lines)


def process_mmlu_answer(pred: str) -> str:
    """The recipe's letter normaliser."""
    pred = pred.strip("\n").rstrip(".").rstrip("/").strip(" ")
    found = _LETTER.findall(pred.upper())
    last = found[-1] if found else pred.strip().strip(".")
    return last.rstrip(".").rstrip("/")


def letter(i: int, n_choices: int) -> str:
    if not 0 <= i < n_choices:
        raise ValueError(f"answer index {i} outside the {n_choices} choices")
    return chr(65 + i)
