"""Will it fit, and how fast: a memory and step-time planner for real GPUs, from a config alone.

``latentfast-plan`` and every trainer's ``--plan`` (the console scripts, ``latentfast.scripts``;
``from_config``: the trainers' flags -> a workload) run one optimizer step of the trainer itself --
its setup, build_model, batches (RL: rollout through the decode engine, rewards, reference), the
loop's ``forward_backward`` and optimizer step (``harness``, ``trainers``) -- with every model built
from its config alone on fake tensors, measure it with PyTorch's own tools (``fake``: MemTracker,
flop_counter's formulas, RuntimeEstimator's per-op roofline) and set it against a GPU's spec-sheet
memory, FLOP/s and bandwidth (``devices``). ``steps`` holds the workload and a sketch of the
peers' way (recipe). ``validate`` checks the prediction against the same step on this CPU.
"""
import importlib

from .devices import DEVICES, Device, get_device

# the planner and the steps import torch: loaded on first use, so latentfast-plan --help (which reads the
# device names from devices.py) stays torch-free
_LAZY = {"Plan": "planner", "format_plan": "planner", "plan": "planner", "Workload": "steps"}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["DEVICES", "Device", "get_device", "Plan", "format_plan", "plan", "Workload"]
