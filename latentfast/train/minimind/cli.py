"""``latentfast-minimind <stage> [MiniMind flags]``: one entry point for the MiniMind stages."""
from __future__ import annotations

import ast
import importlib
import importlib.util
import pathlib
import sys

# stage -> module under latentfast.train.minimind (a new stage adds itself here, its flags to args.STAGE_ARGS)
STAGES = {"pretrain": "pretrain", "full_sft": "full_sft", "lora": "lora", "distill_reason": "distill_reason",
          "distillation": "distillation", "dpo": "dpo", "ppo": "ppo", "grpo": "grpo", "spo": "spo"}


def available() -> list[str]:
    out = []
    for name, mod in STAGES.items():
        if importlib.util.find_spec(f"latentfast.train.minimind.{mod}") is not None:
            out.append(name)
    return out


def stage_doc(module: str) -> str | None:
    """A stage module's docstring (its --help text), read from its source: importing it loads torch."""
    source = pathlib.Path(importlib.util.find_spec(module).origin).read_text(encoding="utf-8")
    return ast.get_docstring(ast.parse(source), clean=False)


def parse(argv=None):
    """``(stage, config)`` of ``latentfast-minimind <stage> [flags]``, without torch (``--help``,
    an unknown stage and argument errors exit here)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    names = available()
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in names:
        usage = (f"usage: latentfast-minimind {{{','.join(names)}}} [flags]  "
                 f"(latentfast-minimind <stage> --help for a stage's flags)\n")
        if argv and argv[0] in ("-h", "--help"):
            sys.stdout.write(usage)
            sys.exit(0)
        sys.stderr.write((f"unknown stage {argv[0]!r}\n" if argv else "") + usage)
        sys.exit(2)
    from .args import STAGE_ARGS

    return argv[0], STAGE_ARGS[argv[0]].parse(argv[1:], stage_doc(_module(argv[0])))


def run(stage: str, cfg):
    """Train ``stage`` from its parsed config (the stage module, and torch, load here)."""
    return importlib.import_module(_module(stage)).main(cfg=cfg)


def _module(stage: str) -> str:
    return f"latentfast.train.minimind.{STAGES[stage]}"


def main(argv=None):
    """``python -m latentfast.train.minimind.cli <stage> [flags]``: parse, train."""
    return run(*parse(argv))


def cli() -> int:
    from ..entry import console_entry  # (torch-free: --help stays light) the trainers' one error handling
    return console_entry(main)()


if __name__ == "__main__":
    cli()
