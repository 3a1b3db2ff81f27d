"""Command-line plumbing shared by every entry point (torch-free, so ``--help`` is fast):
a parser that never abbreviates flags, a finite-float type, and the check that a path flag
names something that exists, worded as an argparse error."""
from __future__ import annotations

import argparse
import math
import pathlib

PATH_KINDS = {"file": "a file", "dir": "a folder", "path": "a file or folder",
              "model": "a local Hugging Face model folder (or a hub id already in the local cache)"}


def finite_float(text: str) -> float:
    """argparse ``type``: a float that is not inf or nan."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """argparse ``type``: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def is_local_model(name: str) -> bool:
    """A local model folder, or a hub id whose config is already in the local cache."""
    if pathlib.Path(name).is_dir():
        return True
    try:
        from huggingface_hub import try_to_load_from_cache  # light; only for names that are not folders

        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except Exception:  # not a valid repo id, no cache
        return False


def path_error(flag: str, value, kind: str, names=(), what: str = "") -> str | None:
    """The argparse message when ``value`` given to ``flag`` does not name an existing
    ``kind`` (``PATH_KINDS``) and is not one of ``names``; None when it does."""
    if value is None or value in names:
        return None
    p = pathlib.Path(str(value)).expanduser()
    ok = {"file": p.is_file, "dir": p.is_dir, "path": p.exists, "model": lambda: is_local_model(str(value))}[kind]()
    if ok:
        return None
    found = "is a folder, not a file" if kind == "file" and p.is_dir() else \
        "is a file, not a folder" if kind in ("dir", "model") and p.is_file() else "no such file or folder"
    expected = what or PATH_KINDS[kind]
    if names:
        expected += " or one of " + ", ".join(repr(n) for n in names)
    return f"{flag} {str(value)!r}: {found} (expected {expected})"


def check_path(parser: argparse.ArgumentParser, flag: str, value, kind: str, names=(), what: str = "") -> None:
    """``parser.error`` (exit 2) unless ``value`` names an existing ``kind`` or is one of ``names``."""
    msg = path_error(flag, value, kind, names, what)
    if msg:
        parser.error(msg)


def cli_parser(description: str | None = None) -> argparse.ArgumentParser:
    """The parser of every hand-written command line: no prefix matching of flags."""
    return argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                                   allow_abbrev=False)


__all__ = ["PATH_KINDS", "check_path", "cli_parser", "finite_float", "is_local_model", "path_error", "positive_int"]
