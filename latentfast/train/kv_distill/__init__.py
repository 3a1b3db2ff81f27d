"""KV-cache distillation: one trainer for one teacher (``--teacher_model``) or several (``--teachers``).

    spec.py       teachers.yaml as typed dataclasses          config.py   the flags (typed configs -> CLI)
    teachers.py   loading teachers, their targets per batch   data.py     batches (answer position, tags)
    distiller.py  the loss: student + KV adapters + router    trainer.py  the run on the one loop
    compare.py    --compare: runs, table, plots               demo.py     the embedded demos' presets, teachers
    cli.py        latentfast-kv-distill (parsing; run.py      cache.py    latentfast-kv-cache (offline targets)
                  the run)
"""
import importlib

from .cli import build_parser, cli, main, parse_args
from .config import KVDistillConfig, KVLossConfig, MultiTeacherConfig

# the torch side loads on first use: the command lines (latentfast-kv-distill / -kv-cache --help) import this
# package, and parse before anything needs torch
_LAZY = {"encode": "data", "KVDistiller": "distiller", "Teacher": "teachers", "check_same_tokenizer": "teachers",
         "load_teachers_from_config": "teachers", "online_teacher": "teachers", "KVDistill": "trainer"}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["KVDistill", "KVDistillConfig", "KVDistiller", "KVLossConfig", "MultiTeacherConfig", "Teacher",
           "build_parser", "check_same_tokenizer", "cli", "encode", "load_teachers_from_config", "main",
           "online_teacher", "parse_args"]
