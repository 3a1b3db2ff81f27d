"""GSM8K: ``{"question": str, "answer": str}`` per row, the answer a worked solution ending
``#### <number>`` (or a bare number). The recipe's normaliser ``process_gsm8k_answer``."""
from __future__ import annotations

from ..rewards import correctness_reward, format_reward, gsm8k_gold, process_gsm8k_answer
from .base import Task


def to_row(r: dict) -> dict:
    return {"question": str(r["question"]), "answer": str(r["answer"])}


TASK = Task("gsm8k", doc='JSONL rows {"question": str, "answer": "<solution> #### <number>"}', to_row=to_row,
            normalize=process_gsm8k_answer, gold=gsm8k_gold,
            correctness=correctness_reward, format=format_reward)  # the split rewards as before
