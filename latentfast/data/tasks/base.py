"""What a task is, and reading the files users point the loaders at.

A task turns source rows into canonical rows ``{"question": <user message>, "answer":
<gold>, ...}`` (the user message already holds options / contexts, so every task shares
one prompt builder, ``latentfast.data.prompts``), and scores completions with the recipe's
normaliser: ``rewards["hrpo"]`` (correct AND exactly one marker, the training reward),
``accuracy`` (the recipe's ``eval_*.py`` metric: the answer after the last marker matches).
"""
from __future__ import annotations

import json
import pathlib
from dataclasses import dataclass, field
from typing import Callable

from ..jsonl import DataFileError, iter_jsonl
from ..rewards import extract_from_response, marker_format_reward, match_reward


@dataclass
class Task:
    name: str
    doc: str                                 # the fields a source row needs (shown in errors and --help)
    to_row: Callable[[dict], dict]           # source row -> canonical row
    normalize: Callable[[str], str]          # the recipe's answer normaliser
    gold: Callable = lambda a: a             # canonical "answer" -> gold text or list of texts
    read: Callable | None = None             # (path, split) -> source rows; default: read_records
    correctness: Callable | None = None      # the split "correctness" reward (default: match, a marker needed)
    format: Callable = marker_format_reward  # the split "format" reward
    by_subject: bool = False                 # evaluation also reports accuracy per row["subject"]
    rewards: dict = field(init=False)
    accuracy: Callable = field(init=False)

    def __post_init__(self):
        self.accuracy = match_reward(self.normalize, self.gold, markers=None)
        self.rewards = {"hrpo": match_reward(self.normalize, self.gold, markers="one"),
                        "correctness": self.correctness or match_reward(self.normalize, self.gold, markers="any"),
                        "format": self.format}

    def load(self, path: str, split: str | None = None, limit: int | None = None) -> list[dict]:
        """Canonical rows from a user-given file or folder (``split`` picks inside a folder)."""
        src = (self.read or read_records)(path, split)
        rows = []
        for i, r in enumerate(src):
            try:
                rows.append(self.to_row(r))
            except (KeyError, TypeError, ValueError, IndexError) as e:
                raise DataFileError(f"{path}: row {i}: not a {self.name} row ({type(e).__name__}: {e}); "
                                 f"expected {self.doc}") from e
            if limit is not None and len(rows) >= limit:
                break
        if not rows:
            raise DataFileError(f"{path}: no {self.name} rows found (split {split!r}); expected {self.doc}")
        return rows

    def predictions(self, completions: list[str]) -> list[str]:
        """The normalised answers (for the generations file)."""
        return [self.normalize(extract_from_response(c)) for c in completions]


def read_records(path: str, split: str | None = None) -> list[dict]:
    """Rows of a ``.jsonl`` file (one object a line), a ``.json`` file (a list, or an object
    holding one under ``data``/``rows``), or a folder: ``<split>.jsonl`` / ``<split>.json`` /
    ``<split>/`` inside it, else a Hugging Face ``save_to_disk`` folder (needs ``datasets``),
    else every ``.jsonl``/``.json`` file in it."""
    p = pathlib.Path(path)
    if not p.exists():
        raise FileNotFoundError(f"data path {str(path)!r} does not exist (pass a local file or folder; "
                                f"nothing is downloaded)")
    if p.is_file():
        return _read_file(p)
    if split:
        for cand in (p / f"{split}.jsonl", p / f"{split}.json", p / split):
            if cand.exists():
                return read_records(str(cand))
    if (p / "dataset_info.json").exists() or (p / "state.json").exists() or (p / "dataset_dict.json").exists():
        return _read_hf_dataset(p, split)
    files = sorted(f for f in p.rglob("*") if f.suffix in (".jsonl", ".json") and f.is_file())
    if not files:
        raise FileNotFoundError(f"{path}: no .jsonl/.json files (and no {split!r} split) in this folder")
    return [r for f in files for r in _read_file(f)]


def _read_file(p: pathlib.Path) -> list[dict]:
    if p.suffix == ".jsonl":  # the one JSONL reader: UTF-8, JSON and line-length errors name the line
        return [row for _, row in iter_jsonl(p)]
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataFileError(f"{p}: not UTF-8 text (byte {e.start + 1}); re-encode the file as UTF-8") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataFileError(f"{p}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    if isinstance(obj, dict):
        obj = obj.get("data", obj.get("rows", [obj]))  # a MATH problem file is one object
    if not isinstance(obj, list):
        raise DataFileError(f"{p}: expected a JSON list of rows")
    return obj


def _read_hf_dataset(p: pathlib.Path, split: str | None):
    try:
        import datasets
    except ImportError as e:
        raise ImportError(f"{p} is a Hugging Face save_to_disk folder: reading it needs `pip install latentfast[datasets]` "
                          f"(or export it to JSONL)") from e
    ds = datasets.load_from_disk(str(p))
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataFileError(f"{p}: split {split!r} not in {list(ds)}")
        ds = ds[split]
    return list(ds)
