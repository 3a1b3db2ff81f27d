"""One JSONL reader for every data format: yields ``(line_number, object)`` per non-blank
line. A line that is not UTF-8, not JSON, or longer than ``MAX_LINE_BYTES`` is an error
naming the file and the line; ``check_text`` / ``check_messages`` validate the fields a
loader uses (type, emptiness) with the same file:line:field prefix."""
from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator

# a line longer than this is an error, never a multi-GB tokenisation: 4 MiB is about a million
# tokens, far past any --max_seq_len here (the texts are truncated to it anyway)
MAX_LINE_BYTES = 4 * 2**20


class DataFileError(ValueError):
    """A data file the user gave is unreadable or malformed: the message names the file (and
    line / field). Entry points report it as one ``error:`` line, exit 2, like a bad flag."""


def iter_jsonl(path: str | os.PathLike, max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[tuple[int, object]]:
    with open(path, "rb") as f:
        n = 0
        while raw := f.readline(max_line_bytes + 1):
            n += 1
            if len(raw) > max_line_bytes and not raw.endswith(b"\n"):
                raise DataFileError(f"{path}:{n}: line longer than {max_line_bytes} bytes (the limit per JSONL row); "
                                 f"split the text into several rows")
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise DataFileError(f"{path}:{n}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at byte {exc.start + 1} "
                                 f"of the line); re-encode the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataFileError(f"{path}:{n}: not valid JSON ({exc.msg} at column {exc.colno})") from None


def _kind(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, float) and not math.isfinite(v):
        return f"the number {v}"
    return {bool: "a boolean", int: "a number", float: "a number", dict: "an object", list: "a list"}.get(
        type(v), type(v).__name__) + (f" ({json.dumps(v)[:40]})" if not isinstance(v, (dict, list)) else "")


def check_text(path, n: int, field: str, value, numbers: bool = False) -> str:
    """``value`` as a string; anything else (null, NaN, an object, a list; a number unless
    ``numbers``) is an error naming file, line and field."""
    if isinstance(value, str):
        return value
    if numbers and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return str(value)
    raise DataFileError(f"{path}:{n}: field {field!r} must be a string, got {_kind(value)}")


def check_messages(path, n: int, field: str, value) -> list:
    """A non-empty list of ``{"role": str, "content": str}`` (content may be null on a turn
    that carries ``tool_calls``)."""
    if not (isinstance(value, list) and value):
        raise DataFileError(f"{path}:{n}: field {field!r} must be a non-empty list of {{'role', 'content'}} objects, "
                         f"got {_kind(value) if not isinstance(value, list) else 'an empty list'}")
    for i, turn in enumerate(value):
        where = f"{field}[{i}]"
        if not (isinstance(turn, dict) and "role" in turn and "content" in turn):
            raise DataFileError(f"{path}:{n}: {where} must be a {{'role', 'content'}} object")
        check_text(path, n, f"{where}.role", turn["role"])
        if not (turn["content"] is None and turn.get("tool_calls")):
            check_text(path, n, f"{where}.content", turn["content"])
    return value


__all__ = ["MAX_LINE_BYTES", "check_messages", "check_text", "iter_jsonl"]
