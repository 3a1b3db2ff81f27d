"""A loader's seam: what a ``with`` block sends its calls to instead."""
from __future__ import annotations

import contextlib


class Seam:
    """``current`` is the substitute inside ``with seam.substitute(fn):`` (nested blocks restore
    the outer one), else None. The planner (``latentfast.plan``) fills the model and reward-model
    loaders' seams so that a trainer's own step builds its models from configs on fake tensors;
    nothing else in the trainer changes."""

    def __init__(self):
        self.current = None

    @contextlib.contextmanager
    def substitute(self, fn):
        old, self.current = self.current, fn
        try:
            yield
        finally:
            self.current = old
