"""GSM8K JSONL loading (``question``/``answer`` per line).

A small sample (first 200 train / 100 test problems of GSM8K, MIT licence in
``LICENSE.gsm8k``, Copyright (c) 2021 OpenAI) ships with the package for the demo
and the tests; pass the full files' paths for real runs.
"""
from __future__ import annotations

import pathlib

from .jsonl import DataFileError, check_text, iter_jsonl
from .prompts import PROMPT_TEMPLATE, format_prompt  # noqa: F401  (re-exported: the plain prompt)

HERE = pathlib.Path(__file__).resolve().parent
SPLITS = ("train", "test")


def sample_path(split: str = "train") -> str:
    """Path of the shipped GSM8K sample for ``split`` ("train" or "test")."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return str(HERE / f"gsm8k_sample_{split}.jsonl")


def load_jsonl(path: str, limit: int | None = None) -> list[dict]:
    """Rows of a JSONL file; each must carry a non-empty string ``question`` and an ``answer``
    (a string, or a finite number: made a string); anything else names file, line and field."""
    rows = []
    for n, row in iter_jsonl(path):
        if not isinstance(row, dict) or "question" not in row or "answer" not in row:
            raise DataFileError(f"{path}:{n}: each line needs 'question' and 'answer' fields")
        q = check_text(path, n, "question", row["question"])
        if not q.strip():
            raise DataFileError(f"{path}:{n}: field 'question' is empty")
        rows.append({**row, "question": q, "answer": check_text(path, n, "answer", row["answer"], numbers=True)})
        if limit is not None and len(rows) >= limit:
            break
    if not rows:
        raise DataFileError(f"{path}: no rows (an empty JSONL file; expected one JSON object per line)")
    return rows


def load_gsm8k(path_or_split: str = "train", limit: int | None = None) -> list[dict]:
    """``"train"``/``"test"`` reads the shipped sample; anything else is a path."""
    path = sample_path(path_or_split) if path_or_split in SPLITS else path_or_split
    return load_jsonl(path, limit)
