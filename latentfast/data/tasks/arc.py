"""ARC-Challenge, OpenBookQA and QASC (the recipe's ``eval_arcc.py``): Hugging Face rows
``{"question" | "question_stem": str, "choices": {"text": [...], "label": [...]}, "answerKey": str}``,
or AI2's original ``{"question": {"stem", "choices": [{"text", "label"}]}, "answerKey"}``.

The prompt letters the choices A, B, ...; the gold is the letter at ``answerKey``'s position
among the labels. (The recipe compares the raw ``answerKey``, so its rows labelled
``1``-``4`` -- a few percent of ARC -- can never be scored right; here they can.)
"""
from __future__ import annotations

from .base import Task
from .choice import choice_prompt, letter, process_mmlu_answer


def to_row(r: dict) -> dict:
    q = r["question_stem"] if "question_stem" in r else r["question"]
    choices = r.get("choices")
    if isinstance(q, dict):  # AI2's original JSONL
        q, choices = q["stem"], q["choices"]
    if isinstance(choices, dict):
        texts, labels = list(choices["text"]), list(choices["label"])
    else:
        texts, labels = [c["text"] for c in choices], [c["label"] for c in choices]
    key = str(r["answerKey"]).strip()
    if key not in labels:
        raise ValueError(f"answerKey {key!r} not among the labels {labels}")
    return {"question": choice_prompt(q, texts), "answer": letter(labels.index(key), len(texts))}


DOC = 'rows {"question" | "question_stem": str, "choices": {"text": [...], "label": [...]}, "answerKey": str}'
TASKS = [Task(name, doc=DOC, to_row=to_row, normalize=process_mmlu_answer) for name in ("arc_c", "openbookqa", "qasc")]
