"""Typed trainer configs: dataclasses that generate the command line.

    @dataclass
    class MyConfig(TrainConfig):
        lr: float = option(5e-6, "peak learning rate", aliases=("learning_rate",))
        group_size: int = option(4, "completions per prompt")

        def __post_init__(self):
            super().__post_init__()
            check(self.group_size > 0, "group_size", "a positive integer", self.group_size)

    cfg = MyConfig.parse(argv)                 # --lr 1e-5 / --learning_rate 1e-5, --group_size 8
    cfg = cfg.with_preset(DEMO_PRESET)         # a demo's values for the fields the user did not type

Each field is one flag, ``--<name>`` plus ``--<alias>`` for every alias (the recipes
spell some options differently: ``--lr``/``--learning_rate``,
``--model_name``/``--model_name_or_path``); its type comes from the annotation
(``int``, ``float``, ``str``, ``bool`` -> ``--x`` / ``--x True|False`` / ``--no-x``, ``X | None``,
``list[str]`` -> ``nargs="+"``). Validation lives in ``__post_init__`` and a failure is a
``ValueError`` naming the argument, which ``parse`` turns into an argparse error (exit 2).
Generic checks from the field's ``option``: every float finite (``finite=False`` to allow
inf/nan), ``min``/``max`` bounds, and ``path="file"|"dir"|"path"|"model"`` flags that must
name something that exists (``names``: other accepted values, e.g. ``'tiny'``), checked by
``parse`` before anything is built or created. Flags are never abbreviated (``--max_step``
is an error, not ``--max_steps``).
Presets are plain dicts applied only to the fields the command line did not set (after
parsing with ``with_preset``, or during it, before validation, from a ``preset`` classmethod);
``to_dict`` is what a checkpoint stores, and ``Config(**saved)`` reproduces the run.
A demo has two presets: the no-argument run (<= 5 min on a 2-core CPU at one thread) and,
with ``--full``, that preset updated by a longer, more convincing one (``demo_preset``).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field

from latentfast.cli import PATH_KINDS, cli_parser, finite_float, path_error

from . import resume
from .checks import check_resume_arg

_MISSING = dataclasses.MISSING


class PlanFlagError(ValueError):
    """``--plan`` reached a trainer's ``fit``: only the console scripts plan (``latentfast.scripts``)."""



def option(default=_MISSING, help: str = "", *, aliases: tuple = (), choices=None, cli: bool = True,
           path: str | None = None, names: tuple = (), min=None, max=None, finite: bool = True):
    """A config field: its default, help text, extra flag spellings, allowed values.
    ``cli=False`` keeps a field out of the command line (set by code only). ``path``: the
    value must name an existing file / dir / either / a local model (``PATH_KINDS``) unless
    it is one of ``names`` (or None); ``min``/``max``: inclusive bounds; ``finite=False``
    lets a float be inf or nan."""
    if path is not None and path not in PATH_KINDS:
        raise ValueError(f"path must be one of {sorted(PATH_KINDS)}, got {path!r}")
    meta = {"help": help, "aliases": tuple(aliases), "choices": choices, "cli": cli, "path": path,
            "names": tuple(names), "min": min, "max": max, "finite": finite}
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


def check(ok: bool, name: str, expected: str, got) -> None:
    """``ValueError('--name: expected ..., got ...')`` unless ``ok``."""
    if not ok:
        raise ValueError(f"--{name}: expected {expected}, got {got!r}")


class ConfigError(ValueError):
    pass


def demo_preset(preset: dict, full: dict, use_full) -> dict:
    """A demo's preset: ``preset`` (the no-argument run), updated by ``full`` when ``use_full``
    (``--full``: the longer run the README times)."""
    return {**preset, **full} if use_full else dict(preset)


def _base_type(tp):
    """(python type, optional, is_list) from an annotation."""
    optional = False
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        tp = args[0]
        origin = typing.get_origin(tp)
    if origin in (list, tuple):
        return typing.get_args(tp)[0], optional, True
    return tp, optional, False


def _bool_flag(text: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "yes", "y", "on"):
        return True
    if low in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


@dataclass
class Config:
    """Base of every config: command-line generation, aliases, presets, serialisation."""

    def __post_init__(self):  # subclasses validate here (and call super().__post_init__())
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value, meta = getattr(self, f.name), self.meta(f.name)
            if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if meta["finite"] and _base_type(hints[f.name])[0] is float:
                check(math.isfinite(value), f.name, "a finite number", value)
            if meta["min"] is not None:
                check(value >= meta["min"], f.name, f"a number >= {meta['min']}", value)
            if meta["max"] is not None:
                check(value <= meta["max"], f.name, f"a number <= {meta['max']}", value)

    @classmethod
    def meta(cls, name: str) -> dict:
        """A field's help / aliases / choices, merged over the class hierarchy: a subclass that
        only changes a default (``lr: float = 2e-5``) keeps the base field's help and aliases."""
        out = {"help": "", "aliases": (), "choices": None, "cli": True, "path": None, "names": (), "min": None,
               "max": None, "finite": True}
        for klass in reversed(cls.__mro__):
            f = getattr(klass, "__dataclass_fields__", {}).get(name)
            if f is None:
                continue
            m = f.metadata
            out["aliases"] = tuple(dict.fromkeys(out["aliases"] + tuple(m.get("aliases", ()))))
            for k in ("help", "choices", "path", "names", "min", "max"):
                if m.get(k) is not None and m.get(k) != "" and m.get(k) != ():
                    out[k] = m[k]
            for k in ("cli", "finite"):
                if k in m:
                    out[k] = m[k]
        return out

    @classmethod
    def cli_fields(cls):
        hints = typing.get_type_hints(cls)
        return [(f, hints[f.name]) for f in dataclasses.fields(cls) if cls.meta(f.name)["cli"]]

    @classmethod
    def aliases(cls) -> dict:
        """alias -> field name."""
        return {a: f.name for f in dataclasses.fields(cls) for a in cls.meta(f.name)["aliases"]}

    @classmethod
    def narrow(cls, obj):
        """This config from the same-named attributes of a wider config / namespace."""
        return cls(**{f.name: getattr(obj, f.name) for f in dataclasses.fields(cls) if hasattr(obj, f.name)})

    @classmethod
    def build_parser(cls, description: str | None = None, suppress_defaults: bool = False) -> argparse.ArgumentParser:
        p = cli_parser(description or cls.__doc__)
        for f, tp in cls.cli_fields():
            meta = cls.meta(f.name)
            flags = [f"--{f.name}"] + [f"--{a}" for a in meta["aliases"]]
            default = f.default if f.default is not _MISSING else (
                f.default_factory() if f.default_factory is not _MISSING else None)
            kw = dict(dest=f.name, help=meta["help"] or None,
                      default=argparse.SUPPRESS if suppress_defaults else default)
            base, _, many = _base_type(tp)
            if base is bool and not many:  # --x, --x True|False (HF's parser), --no-x / --no_x
                kw.update(type=_bool_flag, nargs="?", const=True, metavar="BOOL")
            else:
                kw["type"] = _bool_flag if base is bool else finite_float if base is float and meta["finite"] else base
                if many:
                    kw["nargs"] = "+"
                if meta["choices"]:
                    kw["choices"] = meta["choices"]
            if kw.get("help") and not suppress_defaults and default is not None:
                kw["help"] += f" (default: {default})"
            p.add_argument(*flags, **kw)
            if base is bool and not many:
                p.add_argument(*[f"--no{sep}{n}" for n in [f.name, *meta["aliases"]] for sep in "-_"], dest=f.name,
                               action="store_false", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        return p

    @classmethod
    def parse(cls, argv=None, description: str | None = None):
        """The config from ``argv`` (``sys.argv[1:]`` when None); ``explicit`` on the result
        names the fields the command line set."""
        parser = cls.build_parser(description, suppress_defaults=True)
        typed = vars(parser.parse_args(argv))
        alias = cls.aliases()
        preset = {alias.get(k, k): v for k, v in cls.preset(typed).items()}
        try:
            cfg = cls(**{**preset, **typed})
        except ValueError as e:
            parser.error(str(e))
        object.__setattr__(cfg, "_explicit", frozenset(typed))
        cfg.check_cli(parser)
        return cfg

    @classmethod
    def typed(cls, **fields):
        """The config as if ``fields`` were typed on its command line (aliases accepted;
        ``explicit`` names them, so a demo preset leaves them): one run starting another
        calls this, not a command line of strings."""
        alias = cls.aliases()
        fields = {alias.get(k, k): v for k, v in fields.items()}
        cfg = cls(**fields)
        object.__setattr__(cfg, "_explicit", frozenset(fields))
        return cfg

    @classmethod
    def preset(cls, typed: dict) -> dict:
        """Values ``parse`` gives the fields the command line did not set (``typed``: those it
        did), before validation; a demo's preset (``{}``: none)."""
        return {}

    def check_cli(self, parser: argparse.ArgumentParser) -> None:
        """Checks that only make sense for a command line (files exist, ...): ``parser.error``.
        Here: every ``path`` field names something that exists (``path_error``)."""
        for f in dataclasses.fields(self):
            meta = self.meta(f.name)
            if meta["path"] is None or not meta["cli"]:
                continue
            values = getattr(self, f.name)
            for value in values if isinstance(values, (list, tuple)) else [values]:
                flag = "/".join(f"--{n}" for n in (f.name, *meta["aliases"]))  # as argparse names it
                msg = path_error(flag, value, meta["path"], meta["names"])
                if msg:
                    parser.error(msg)

    @property
    def explicit(self) -> frozenset:
        return getattr(self, "_explicit", frozenset())

    def with_preset(self, preset: dict):
        """A copy with ``preset``'s values for the fields the command line did not set."""
        names = {f.name for f in dataclasses.fields(self)}
        alias = self.aliases()
        upd = {}
        for k, v in preset.items():
            k = alias.get(k, k)
            if k not in names:
                raise ConfigError(f"preset names {k!r}, which is not a field of {type(self).__name__}")
            if k not in self.explicit:
                upd[k] = v
        return self.replace(**upd)

    def replace(self, **changes):
        """``dataclasses.replace`` that keeps the record of explicitly set fields (aliases accepted)."""
        alias = self.aliases()
        new = dataclasses.replace(self, **{alias.get(k, k): v for k, v in changes.items()})
        object.__setattr__(new, "_explicit", self.explicit)
        return new

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: dict):
        """From ``to_dict`` output (aliases accepted; unknown keys are an error)."""
        alias = cls.aliases()
        names = {f.name for f in dataclasses.fields(cls)}
        d = {alias.get(k, k): v for k, v in d.items()}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"{cls.__name__}: unknown fields {unknown}")
        return cls(**d)

    def __getattr__(self, name):  # an alias reads its field (cfg.learning_rate == cfg.lr)
        if not name.startswith("_"):
            target = type(self).aliases().get(name)
            if target is not None:
                return getattr(self, target)
        raise AttributeError(f"{type(self).__name__} has no field {name!r}")


__all__ = ["Config", "ConfigError", "PlanFlagError", "check", "cli_parser", "demo_preset", "finite_float", "option", "path_error"]


SCHEDULES = ("cosine", "linear", "constant", "minimind", "minimind_rl")


@dataclass
class TrainConfig(Config):
    """The loop's options; every trainer's config extends this one (and may change defaults)."""

    output_dir: str = option("runs/train", "where checkpoints, metrics.jsonl and the config go")
    seed: int = option(42, "seed of weights init, data order and sampling")
    device: str | None = option(None, "cpu / cuda (default: cuda when available)")
    bf16: bool | None = option(None, "bf16 autocast (default: on for CUDA)")
    fsdp: bool = option(False, "shard with PyTorch FSDP2 (under torchrun)")
    lr: float = option(5e-5, "peak learning rate", aliases=("learning_rate",))
    weight_decay: float = option(0.0, "AdamW weight decay (matrices only)", min=0.0)
    warmup_ratio: float = option(0.03, "share of the steps with a linear learning-rate warm-up")
    lr_scheduler_type: str = option("cosine", "schedule after the warm-up", choices=SCHEDULES)
    max_grad_norm: float = option(1.0, "gradient clipping norm")
    num_train_epochs: float = option(1.0, "epochs over the training data", aliases=("epochs",), min=0.0)
    max_steps: int = option(-1, "> 0 overrides --num_train_epochs", min=-1)
    per_device_train_batch_size: int = option(8, "examples per device per micro-batch", aliases=("batch_size",))
    gradient_accumulation_steps: int = option(1, "micro-batches per optimizer step")
    logging_steps: int = option(10, "console line every N steps (0: none)")
    save_steps: int = option(500, "checkpoint every N steps (0: only at the end)")
    eval_steps: int = option(0, "evaluate every N steps (0: only at the end)")
    resume_from_checkpoint: str | None = option(None, "checkpoint dir, or 'latest' in --output_dir (the newest "
                                                      "intact one)")
    save_total_limit: int | None = option(None, "keep only the newest N checkpoints (default: all)")
    allow_config_change: list[str] = option([], "on resume, flags that may differ from the checkpoint's run "
                                                "(model shape, tokenizer, data, batch size, seed, ...)")
    max_nonfinite_steps: int = option(10, "stop after this many consecutive non-finite steps")
    wandb_project: str | None = option(None, "also log to this Weights & Biases project")
    ddp_timeout: int = option(600, "seconds a collective waits for the other ranks before the job fails naming it "
                                   "(torchrun; HF's default is 1800)")
    full: bool = option(False, "demos only: the longer, more convincing run instead of the <= 5 min one")
    plan: bool = option(False, "print the memory / step-time plan of these flags on --plan_device (fake tensors: "
                               "nothing loaded, no GPU needed) and exit (the console scripts: latentfast-<x> --plan)")
    plan_device: str = option("4090", "GPU the plan is for: 4090, a100-40, a100-80, h100, h200")
    plan_device_memory: float | None = option(None, "GiB; overrides --plan_device's memory")

    @classmethod
    def parse(cls, argv=None, description=None):
        """``Config.parse``; with ``--plan`` the file checks are skipped (a plan reads no files):
        the console script (``latentfast.scripts``) then plans instead of training."""
        import sys

        args = sys.argv[1:] if argv is None else list(argv)
        if not any(a == "--plan" or a.startswith("--plan=") for a in args):
            return super().parse(args, description)
        own = "check_cli" in cls.__dict__
        orig = cls.check_cli
        cls.check_cli = lambda self, parser: None
        try:
            return super().parse(args, description)
        finally:
            if own:
                cls.check_cli = orig
            else:
                del cls.check_cli

    def check_cli(self, parser):
        super().check_cli(parser)
        check_resume_arg(parser, self.resume_from_checkpoint)

    def __post_init__(self):
        super().__post_init__()
        for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "max_nonfinite_steps",
                     "ddp_timeout"):
            check(getattr(self, name) >= 1, name, "an integer >= 1", getattr(self, name))
        own = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(resume.allowed_names(self, self.allow_config_change) - own)
        check(not unknown, "allow_config_change", "flags of this trainer", unknown)
        check(self.save_total_limit is None or self.save_total_limit >= 1, "save_total_limit",
              "an integer >= 1 (or leave it unset to keep every checkpoint)", self.save_total_limit)
        for name in ("logging_steps", "save_steps", "eval_steps"):
            check(getattr(self, name) >= 0, name, "an integer >= 0", getattr(self, name))
        check(0.0 <= self.warmup_ratio <= 1.0, "warmup_ratio", "a number in [0, 1]", self.warmup_ratio)
        check(self.lr >= 0, "lr", "a learning rate >= 0", self.lr)
        check(self.max_grad_norm > 0, "max_grad_norm", "a norm > 0", self.max_grad_norm)
        check(self.lr_scheduler_type in SCHEDULES, "lr_scheduler_type", f"one of {SCHEDULES}",
              self.lr_scheduler_type)
