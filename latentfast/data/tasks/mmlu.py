"""MMLU / MMLU-STEM: ``{"question": str, "choices": [str, ...], "answer": int | "A".."J",
"subject": str (optional)}`` per row (the recipe's ``cais/mmlu``-style and ``TIGER-Lab/MMLU-STEM``
fields). ``mmlu_stem`` also reports accuracy per subject."""
from __future__ import annotations

from .base import Task
from .choice import LETTERS, choice_prompt, letter, process_mmlu_answer


def to_row(r: dict) -> dict:
    choices = list(r["choices"])
    a = r["answer"]
    gold = letter(int(a), len(choices)) if not (isinstance(a, str) and a.strip() in LETTERS[:len(choices)]) \
        else a.strip()
    row = {"question": choice_prompt(r["question"], choices), "answer": gold}
    if "subject" in r:
        row["subject"] = r["subject"]
    return row


DOC = 'rows {"question": str, "choices": [str, ...], "answer": int or letter, "subject": str}'
TASK = Task("mmlu", doc=DOC, to_row=to_row, normalize=process_mmlu_answer)
STEM = Task("mmlu_stem", doc=DOC, to_row=to_row, normalize=process_mmlu_answer, by_subject=True)
