"""Question/answer rows by name: the synthetic sets, the shipped GSM8K sample, or a JSONL file."""
from __future__ import annotations

from .gsm8k import load_gsm8k
from .synthetic import SETS, make_two_mode_arithmetic, synthetic_rows

TRAIN_SAMPLE_NAMES = ("gsm8k_sample", "gsm8k_sample_train", "gsm8k")
TEST_SAMPLE_NAMES = ("gsm8k_sample_test", "gsm8k_test")
DATA_NAMES = (*SETS, "synthetic_two_mode", *TRAIN_SAMPLE_NAMES, *TEST_SAMPLE_NAMES)


def load_rows(spec: str, n: int | None = None, seed: int = 0) -> list[dict]:
    """``synthetic`` (1-3 operations) | ``synthetic_one_step`` | ``synthetic_two_mode`` (each one-step problem as an '[eq]' and an '[nl]' row) |
    ``gsm8k_sample`` / ``gsm8k`` (shipped train sample) | ``gsm8k_sample_test`` | a JSONL
    path with ``question``/``answer`` lines."""
    if spec in SETS:
        return synthetic_rows(spec, n or 20000, seed)
    if spec == "synthetic_two_mode":
        n = n or 20000
        # one operation per problem: the multi-teacher demo's tiny teachers learn it (each in its own
        # style) in a few hundred CPU steps; with 1-3 operations they stayed at ~10% accuracy
        return make_two_mode_arithmetic((n + 1) // 2, seed=seed, min_steps=1, max_steps=1)[:n]
    if spec in TRAIN_SAMPLE_NAMES:
        return load_gsm8k("train", n)
    if spec in TEST_SAMPLE_NAMES:
        return load_gsm8k("test", n)
    return load_gsm8k(spec, n)
