"""``teachers.yaml``: the teachers of a multi-teacher KV distillation run, as typed dataclasses.

    teachers:
      - name: eq                      # default: teacher<i>
        model: /models/teacher-eq     # local Hugging Face directory (nothing is downloaded)
        mode: eq                      # optional reasoning-mode tag; tasks: optional list of task tags
        tasks: [arithmetic]
        layer_map: relative_depth     # or explicit [[student, teacher], ...] pairs
        kv_adapter: linear            # identity | linear | mlp (per layer pair, trained with the student)
        dtype: auto                   # auto (bf16 on CUDA, fp32 on CPU) | float32 | bfloat16 | float16
        source: online                # online (no-grad forward each step) | offline:<dir> (latentfast-kv-cache)
        weight: 1.0                   # static weight (normalised over the teachers)
      - name: nl
        model: /models/teacher-nl
        mode: nl
    per_task:                         # optional: tag -> {teacher name: weight}; 'default' for other tags
      eq: {eq: 1.0}

``per_task`` weighting reads this table; without one, a tag goes uniformly to the teachers
whose ``mode``/``tasks`` list it, and other tags to the static weights. A top-level list
is read as ``teachers:``. Errors name the file, the field and what was expected.
"""
from __future__ import annotations

import dataclasses
import pathlib
from dataclasses import dataclass, field

import yaml

from latentfast.choices import DTYPE_NAMES
from latentfast.choices import KV_ADAPTERS as ADAPTERS
from latentfast.cli import path_error

DTYPES = DTYPE_NAMES
COMPRESSIONS = ("none", "rkv")
_TOP_KEYS = ("teachers", "per_task")


class TeachersConfigError(ValueError):
    pass


@dataclass
class TeacherSpec:
    model: str
    name: str = ""
    mode: str | None = None
    tasks: tuple[str, ...] = ()
    layer_map: str | list = "relative_depth"
    kv_adapter: str = "linear"
    dtype: str = "auto"
    source: str = "online"
    weight: float = 1.0

    @property
    def offline_dir(self) -> str | None:
        return self.source.split(":", 1)[1] if self.source.startswith("offline:") else None

    @property
    def tags(self) -> tuple[str, ...]:
        return ((self.mode,) if self.mode else ()) + tuple(self.tasks)

    def torch_dtype(self, device):
        import torch  # (only when a teacher loads: the command line reads this file torch-free)

        if self.dtype == "auto":
            return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
        return getattr(torch, self.dtype)


@dataclass
class TeachersConfig:
    teachers: list[TeacherSpec]
    per_task: dict[str, dict[str, float]] | None = None
    path: str | None = field(default=None, compare=False)

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.teachers]

    @property
    def static_weights(self) -> list[float]:
        return [t.weight for t in self.teachers]

    def task_table(self) -> dict[str, list[float]]:
        """tag -> one weight per teacher (``per_task`` weighting); 'default' = static."""
        table = {"default": self.static_weights}
        tags = {tag for t in self.teachers for tag in t.tags}
        for tag in sorted(tags):
            table[tag] = [1.0 if tag in t.tags else 0.0 for t in self.teachers]
        for tag, row in (self.per_task or {}).items():
            table[tag] = [float(row.get(n, 0.0)) for n in self.names]
        return table

    def to_dict(self) -> dict:
        d = {"teachers": [dataclasses.asdict(t) for t in self.teachers]}
        for t in d["teachers"]:
            t["tasks"] = list(t["tasks"])
        if self.per_task:
            d["per_task"] = self.per_task
        return d


def teacher_paths_error(cfg: TeachersConfig, writing_cache: bool = False) -> str | None:
    """Training: an online teacher's model must be local, an offline one's cache folder must
    exist. ``writing_cache`` (latentfast-kv-cache): every teacher's model must be local."""
    for i, t in enumerate(cfg.teachers):
        where = f"--teachers {cfg.path}: teachers[{i}]"
        if t.offline_dir is None or writing_cache:
            msg = path_error(f"{where}.model", t.model, "model")
        else:
            msg = path_error(f"{where}.source", t.offline_dir, "dir",
                             what="a cache folder written by latentfast-kv-cache")
        if msg:
            return msg
    return None


def _err(where: str, msg: str):
    raise TeachersConfigError(f"{where}: {msg}")


def _teacher(raw, i: int, where: str) -> TeacherSpec:
    at = f"{where}: teachers[{i}]"
    if not isinstance(raw, dict):
        _err(at, f"expected a mapping with at least 'model', got {type(raw).__name__}")
    fields = {f.name for f in dataclasses.fields(TeacherSpec)}
    unknown = sorted(set(raw) - fields)
    if unknown:
        _err(at, f"unknown field(s) {unknown}; allowed: {sorted(fields)}")
    if not isinstance(raw.get("model"), str) or not raw["model"]:
        _err(f"{at}.model", f"expected a local model path (string), got {raw.get('model')!r}")
    kw = dict(raw)
    kw["name"] = str(kw.get("name") or f"teacher{i}")
    if kw.get("mode") is not None and not isinstance(kw["mode"], str):
        _err(f"{at}.mode", f"expected a string tag, got {kw['mode']!r}")
    tasks = kw.get("tasks", ())
    if isinstance(tasks, str):
        tasks = [tasks]
    if not isinstance(tasks, (list, tuple)) or not all(isinstance(x, str) for x in tasks):
        _err(f"{at}.tasks", f"expected a list of string tags, got {tasks!r}")
    kw["tasks"] = tuple(tasks)
    lm = kw.get("layer_map", "relative_depth")
    if isinstance(lm, str):
        if lm != "relative_depth":
            _err(f"{at}.layer_map", f"expected 'relative_depth' or a list of [student, teacher] pairs, got {lm!r}")
    elif not (isinstance(lm, list) and lm and all(
            isinstance(p, list) and len(p) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in p)
            for p in lm)):
        _err(f"{at}.layer_map", f"expected 'relative_depth' or a non-empty list of [student, teacher] int pairs, "
             f"got {lm!r}")
    if kw.get("kv_adapter", "linear") not in ADAPTERS:
        _err(f"{at}.kv_adapter", f"expected one of {ADAPTERS}, got {kw['kv_adapter']!r}")
    if kw.get("dtype", "auto") not in DTYPES:
        _err(f"{at}.dtype", f"expected one of {DTYPES}, got {kw['dtype']!r}")
    src = kw.get("source", "online")
    if not isinstance(src, str) or not (src == "online" or (src.startswith("offline:") and len(src) > 8)):
        _err(f"{at}.source", f"expected 'online' or 'offline:<dir>' (a cache written by latentfast-kv-cache), "
             f"got {src!r}")
    w = kw.get("weight", 1.0)
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not w >= 0 or w == float("inf"):
        _err(f"{at}.weight", f"expected a finite number >= 0, got {w!r}")
    kw["weight"] = float(w)
    return TeacherSpec(**kw)


def parse_teachers(data, where: str = "teachers") -> TeachersConfig:
    """A ``TeachersConfig`` from parsed YAML/JSON (a mapping with ``teachers:`` or a list)."""
    if isinstance(data, list):
        data = {"teachers": data}
    if not isinstance(data, dict):
        _err(where, f"expected a mapping with a 'teachers' list (or a list of teachers), got {type(data).__name__}")
    unknown = sorted(set(data) - set(_TOP_KEYS))
    if unknown:
        _err(where, f"unknown top-level key(s) {unknown}; allowed: {list(_TOP_KEYS)}")
    raw = data.get("teachers")
    if not isinstance(raw, list) or not raw:
        _err(f"{where}: teachers", f"expected a non-empty list of teachers, got {raw!r}")
    teachers = [_teacher(t, i, where) for i, t in enumerate(raw)]
    names = [t.name for t in teachers]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        _err(f"{where}: teachers", f"duplicate teacher name(s) {dup}")
    if sum(t.weight for t in teachers) <= 0:
        _err(f"{where}: teachers[*].weight", "all static weights are 0")
    per_task = data.get("per_task")
    if per_task is not None:
        if not isinstance(per_task, dict):
            _err(f"{where}: per_task", f"expected a mapping tag -> {{teacher name: weight}}, got {per_task!r}")
        for tag, row in per_task.items():
            if not isinstance(row, dict) or not row:
                _err(f"{where}: per_task.{tag}", f"expected a mapping {{teacher name: weight}}, got {row!r}")
            bad = sorted(set(row) - set(names))
            if bad:
                _err(f"{where}: per_task.{tag}", f"unknown teacher name(s) {bad}; teachers: {names}")
            for n, w in row.items():
                if isinstance(w, bool) or not isinstance(w, (int, float)) or not w >= 0:
                    _err(f"{where}: per_task.{tag}.{n}", f"expected a number >= 0, got {w!r}")
            if sum(row.values()) <= 0:
                _err(f"{where}: per_task.{tag}", "all weights are 0")
        per_task = {str(k): {n: float(w) for n, w in v.items()} for k, v in per_task.items()}
    return TeachersConfig(teachers, per_task)


def load_teachers(path) -> TeachersConfig:
    """Read ``teachers.yaml`` (YAML; JSON is YAML too)."""
    p = pathlib.Path(path)
    if not p.is_file():
        raise TeachersConfigError(f"--teachers {str(path)!r}: no such file (expected a teachers.yaml)")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise TeachersConfigError(f"{p}: not valid YAML: {e}") from None
    cfg = parse_teachers(data, str(p))
    cfg.path = str(p)
    return cfg


def save_teachers(cfg: TeachersConfig, path) -> None:
    pathlib.Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
