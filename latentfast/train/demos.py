"""The embedded demos of the single-file trainers, in one place: ``latentfast-sft``,
``latentfast-hrpo`` and ``latentfast-codi`` with no ``--model_name`` run on a tiny model built in
code. Each demo's preset fills the flags not typed: the no-argument run (<= 5 min on a 2-core
CPU at one thread; the README gives each one's measured time and numbers), and with ``--full``
that preset updated by the longer run. (The trainer families keep theirs beside them:
``kv_distill/demo.py``, ``minimind/common.py``.) The trainers hold only their algorithm: their
configs take ``EmbeddedDemo`` and name their presets.
"""
from __future__ import annotations

import json
from typing import ClassVar

from .config import check, demo_preset

DEMO_MODEL = "tiny"  # --model_name of every embedded demo

# latentfast-sft
SFT = dict(lr=3e-3, per_device_train_batch_size=32, max_steps=200, warmup_ratio=0.05, save_steps=0,
           logging_steps=50, train_data="synthetic", eval_data="synthetic", max_length=128, max_new_tokens=32)
SFT_FULL = dict(max_steps=600, eval_size=256)  # --full: the longer run

# latentfast-hrpo: one-operation problems (the tiny model learns them in 200 warm-up steps; with 1-3 operations
# the warm-up ended where it was just learning to copy operands and HRPO showed no gain in 5 minutes), then 150
# HRPO steps of 16 prompts x 4 samples (8 x 8 saw too few problems per step to generalise) at lr 1e-3 with beta
# 0.04 holding the policy near the warm-up. The runs tried: bench/results/hrpo_demo_sweep.md
HRPO = dict(lr=1e-3, lora_rank=16, lr_residual_gate=5e-4, lr_residual_Lambda=1e-3, lr_thinking_projection=5e-4,
            beta=0.04, group_size=4, per_device_train_batch_size=64, gradient_accumulation_steps=1,
            temperature=1.0, max_prompt_length=96, max_completion_length=16, max_steps=150, warmup_ratio=0.05,
            max_grad_norm=1.0, train_data="synthetic_one_step", eval_data="synthetic_one_step", eval_size=256,
            eval_steps=0, sft_steps=200, sft_lr=5e-3, save_steps=100, logging_steps=10,
            system_prompt="")  # the tiny tokenizer's chat template, without the 132-token system turn
# --full: the longer run
HRPO_FULL = dict(max_steps=400, eval_steps=100)

# latentfast-codi
CODI = dict(learning_rate=1e-3, per_device_train_batch_size=32, max_steps=100, warmup_ratio=0.05,
            prj_dim=256, num_latent=3, sft_steps=200, hybrid_samples=512, eval_size=64, save_steps=0,
            logging_steps=10, max_new_tokens=40, train_data="synthetic", eval_data="synthetic",
            distill_loss_factor=1.0, remove_eos=True)
# --full: the longer run
CODI_FULL = dict(max_steps=200, hybrid_samples=1024, eval_size=100, logging_steps=25)

# latentfast-grpo / -rloo / -dpo with no --model_name_or_path: a random tiny Qwen2 and no warm-up.
# Their TRL defaults (lr 1e-6, 3 epochs of the built-in set) would run for hours on it: the no-argument
# run is bounded. DPO's margin rises on it; GRPO's reward stays near 0 (a random model never answers
# right), so that run shows the pipeline end to end, and the learning run is
# bench/results/grpo_gemma_learning.md (gemma-3-270m).
GRPO = dict(max_steps=30, max_completion_length=16, logging_steps=5)
GRPO_FULL = dict(max_steps=200)
DPO = dict(max_steps=200, logging_steps=25)
DPO_FULL = dict(max_steps=-1)  # TRL's 3 epochs of the built-in pairs (750 steps)


class EmbeddedDemo:
    """Mixin of a trainer config whose ``model_name`` ``tiny`` runs the embedded demo: the
    demo's ``presets`` (short, full) fill the flags the command line did not set, at parsing;
    ``--full`` outside a demo is an error naming the flag."""

    presets: ClassVar[tuple[dict, dict]] = ({}, {})
    model_field: ClassVar[str] = "model_name"  # the field whose value DEMO_MODEL means the demo

    @property
    def demo(self) -> bool:
        return getattr(self, self.model_field) == DEMO_MODEL

    @classmethod
    def preset(cls, typed):
        if typed.get(cls.model_field, DEMO_MODEL) != DEMO_MODEL:
            return {}
        return demo_preset(*cls.presets, typed.get("full"))

    def __post_init__(self):
        super().__post_init__()
        check(self.demo or not self.full, "full", f"the embedded demo (no --{self.model_field})",
              getattr(self, self.model_field))

    def banner(self) -> str:
        """The demo's first line: its presets' values."""
        return "embedded demo; presets: " + json.dumps({k: getattr(self, k) for k in self.presets[0]})
