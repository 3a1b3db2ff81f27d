"""KV-cache distillation: one trainer for one teacher (``--teacher_model``) or several (``--teachers``).

    spec.py       teachers.yaml as typed dataclasses          config.py   the flags (typed configs -> CLI)
    teachers.py   loading teachers, their targets per batch   data.py     batches (answer position, tags)
    distiller.py  the loss: student + KV adapters + router    trainer.py  the run on the one loop
    compare.py    --compare: runs, table, plots               demo.py     the embedded demos' presets, teachers
    cli.py        latentfast-kv-distill                       cache.py    latentfast-kv-cache (offline targets)
"""
from .cli import build_parser, cli, main, parse_args
from .config import KVDistillConfig, KVLossConfig, MultiTeacherConfig
from .data import encode
from .distiller import KVDistiller
from .teachers import Teacher, check_same_tokenizer, load_teachers_from_config, online_teacher
from .trainer import KVDistill

__all__ = ["KVDistill", "KVDistillConfig", "KVDistiller", "KVLossConfig", "MultiTeacherConfig", "Teacher",
           "build_parser", "check_same_tokenizer", "cli", "encode", "load_teachers_from_config", "main",
           "online_teacher", "parse_args"]
