"""Path flags checked at parsing, torch-free (so a missing file is an argparse error in a blink):
``check_data_arg`` (a built-in data name or a well-formed JSONL file), ``check_resume_arg``
(``latest`` or a checkpoint folder; its manifest is verified, which loads torch, only when the
folder is there).
"""
from __future__ import annotations

import argparse
import pathlib

from latentfast.data import load_gsm8k
from latentfast.data.rows import DATA_NAMES


def check_data_arg(parser: argparse.ArgumentParser, flag: str, spec, allowed=()) -> None:
    """At argument parsing: ``spec`` names a built-in data set or an existing, well-formed
    JSONL file (every line parsed, the first bad one reported with its number)."""
    if spec is None or spec in DATA_NAMES or spec in allowed:
        return
    path = pathlib.Path(spec)
    if not path.is_file():
        names = ", ".join(repr(n) for n in (*DATA_NAMES, *allowed))
        parser.error(f"{flag} {spec!r}: no such file (expected a JSONL path or one of {names})")
    try:
        load_gsm8k(str(path))
    except (ValueError, UnicodeDecodeError) as exc:
        parser.error(f"{flag}: {exc}")


def check_resume_arg(parser: argparse.ArgumentParser, spec, flag: str = "--resume_from_checkpoint") -> None:
    """``latest`` or a directory written by ``checkpoint.save`` (has trainer_state.json)."""
    if spec is None or spec == "latest":
        return
    path = pathlib.Path(spec)
    if not path.is_dir():
        parser.error(f"{flag} {spec!r}: no such directory (expected a checkpoint-<step> directory or 'latest')")
    missing = [f for f in ("trainer_state.json", "model.safetensors") if not (path / f).is_file()]
    if missing:
        parser.error(f"{flag} {spec!r} is not a latentfast checkpoint: it has no {' or '.join(missing)} "
                     f"(expected a checkpoint-<step> directory written by a latentfast trainer)")
    from latentfast.files import CorruptFileError  # (torch: only for a checkpoint folder that is there)
    from latentfast.runtime.checkpoint import verify

    try:
        verify(path)  # sizes and blake2b against its manifest
    except CorruptFileError as e:
        parser.error(f"{flag} {spec!r}: {e}")
