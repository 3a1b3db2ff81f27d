"""``latentfast-minimind <stage> [MiniMind flags]``: one entry point for the MiniMind stages."""
from __future__ import annotations

import importlib
import importlib.util
import sys

# stage -> module under latentfast.train.minimind (later stages add themselves here)
STAGES = {"pretrain": "pretrain", "full_sft": "full_sft", "lora": "lora", "distill_reason": "distill_reason",
          "distillation": "distillation", "dpo": "dpo", "ppo": "ppo", "grpo": "grpo", "spo": "spo"}


def available() -> list[str]:
    out = []
    for name, mod in STAGES.items():
        if importlib.util.find_spec(f"latentfast.train.minimind.{mod}") is not None:
            out.append(name)
    return out


def main(argv=None):
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
    mod = importlib.import_module(f"latentfast.train.minimind.{STAGES[argv[0]]}")
    return mod.main(argv[1:])


def cli() -> int:
    from ..entry import console_entry  # (torch-free: --help stays light) the trainers' one error handling
    return console_entry(main)()


if __name__ == "__main__":
    cli()
