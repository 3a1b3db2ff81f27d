"""The HRPO recipe's tasks, one file each, and the registry the trainer's ``--task`` and
``latentfast-hrpo-eval --task`` select from.

=============  ===========================================================================
``gsm8k``      ``{"question", "answer": "... #### 72"}``; also the shipped sample and ``synthetic``
``math``       ``{"problem", "solution"}`` (MATH folder ``<root>/<split>/<subject>/*.json`` or MATH-500 JSONL)
``mmlu``       ``{"question", "choices": [...], "answer": int | letter, "subject"}``
``mmlu_stem``  as ``mmlu``; accuracy per subject too
``arc_c``      ``{"question" | "question_stem", "choices": {"text", "label"}, "answerKey"}``
``openbookqa`` ``qasc``: as ``arc_c``
``rag``        ``{"question", "contexts": [...], "golden_answers": [...]}``
=============  ===========================================================================

A data argument is a ``.jsonl``/``.json`` file or a folder (``<split>.jsonl``, ``<split>/``, a
Hugging Face ``save_to_disk`` folder); ``--dataset_root`` is a folder holding the splits.
"""
from __future__ import annotations

from ..synthetic import SETS as SYNTHETIC_SETS, synthetic_rows
from . import arc, gsm8k, math, mmlu, rag
from .base import Task, read_records

TASKS: dict[str, Task] = {t.name: t for t in [gsm8k.TASK, math.TASK, mmlu.TASK, mmlu.STEM, *arc.TASKS, rag.TASK]}
# data names the gsm8k task reads without a path
BUILTIN = {"gsm8k_sample": "train", "gsm8k_sample_train": "train", "gsm8k": "train", "gsm8k_sample_test": "test",
           "gsm8k_test": "test"}


def get_task(name: str | Task) -> Task:
    if isinstance(name, Task):
        return name
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known: {sorted(TASKS)}")
    return TASKS[name]


def load_task_rows(task: str | Task, data: str | None, split: str, limit: int | None = None, seed: int = 0,
                   dataset_root: str | None = None) -> list[dict]:
    """Canonical rows of ``task``: from ``data`` (a path, or for gsm8k a synthetic set / the shipped
    sample's names), else from ``dataset_root``'s ``split``."""
    task = get_task(task)
    if data is None and dataset_root is None:
        if task.name != "gsm8k":
            raise ValueError(f"task {task.name!r} needs data: pass a data path or --dataset_root")
        data = "gsm8k_sample_test" if split == "test" else "gsm8k_sample"
    if data is not None and task.name == "gsm8k":
        if data in SYNTHETIC_SETS:
            return [gsm8k.to_row(r) for r in synthetic_rows(data, limit or 20000, seed)]
        if data in BUILTIN:
            from ..gsm8k import sample_path

            return task.load(sample_path(BUILTIN[data]), None, limit)
    if data in BUILTIN or data in SYNTHETIC_SETS:
        raise ValueError(f"{data!r} is gsm8k data; task {task.name!r} needs a path (or --dataset_root)")
    return task.load(data if data is not None else dataset_root, split if data is None else None, limit)


__all__ = ["TASKS", "Task", "get_task", "load_task_rows", "read_records"]
