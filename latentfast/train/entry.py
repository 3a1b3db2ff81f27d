"""Console-script entry points, torch-free: a command line is parsed (``--help``, argparse
errors: exit 2) before its trainer, and with it torch, is imported.

    cli = console_entry(main)          # main() parses, then imports the trainer and runs it
"""
from __future__ import annotations

import pathlib
import sys


def _user_errors() -> tuple:
    """A run the user must fix: imported when one is raised (the run has loaded torch by then)."""
    from latentfast.data.jsonl import DataFileError
    from latentfast.files import CorruptFileError
    from latentfast.runtime.runlock import RunLockedError

    from .config import PlanFlagError
    from .resume import ResumeConfigError

    return ResumeConfigError, RunLockedError, CorruptFileError, DataFileError, PlanFlagError


def console_entry(main):
    """Console-script entry point for ``main``: main() returns its results dict for callers
    and tests, which sys.exit would print and turn into exit status 1. A run the user must
    fix (a resume whose flags differ, a folder another run holds, a corrupt checkpoint or
    weight file, a malformed data file found while loading it) is one ``error:`` line and
    exit status 2, like a bad flag."""
    def cli() -> int:
        try:
            main()
        except Exception as e:
            if not isinstance(e, _user_errors()):
                raise
            sys.stderr.write(f"{pathlib.Path(sys.argv[0]).name}: error: {e}\n")
            raise SystemExit(2) from None
        return 0
    return cli


__all__ = ["console_entry"]
