"""The console scripts (setup.py's entry points), the top floor: each parses its command line
with its trainer's torch-free config (``--help`` and argument errors answer in a tenth of a
second, exit 2), then either plans the step (``--plan``: ``latentfast.plan`` runs the trainer's
own step on fake tensors, so the planner sits above the trainers and is called from here, never
from inside ``train/``) or imports the trainer, and with it torch, and trains.

``python -m latentfast.train.<x>`` (and torchrun) runs a trainer module's own ``main``, which
trains; ``--plan`` there is an error pointing here.
"""
