"""Will it fit, and how fast: a memory and step-time planner for real GPUs, from a config alone.

``latentfast-plan`` and every trainer's ``--plan`` (``latentfast.train.plan_cli``, ``train.plan``:
the trainers' flags -> a workload) build the model from
its config on fake tensors, run one real step of the trainer's kind (``steps``), measure it with
PyTorch's own tools (``fake``: MemTracker, flop_counter's formulas) and set it against a GPU's
spec-sheet memory, FLOP/s and bandwidth (``devices``). ``validate`` checks the prediction
against a real step on this CPU.
"""
from .devices import DEVICES, Device, get_device
from .planner import Plan, format_plan, plan
from .steps import Workload

__all__ = ["DEVICES", "Device", "get_device", "Plan", "format_plan", "plan", "Workload"]
