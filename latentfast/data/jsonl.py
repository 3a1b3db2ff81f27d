"""One JSONL reader for every data format: yields ``(line_number, object)`` per non-blank
line, and a line that is not JSON is an error naming the file and the line."""
from __future__ import annotations

import json
import os
from collections.abc import Iterator


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, object]]:
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            try:
                yield i + 1, json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{i + 1}: not valid JSON ({exc.msg} at column {exc.colno})") from None
