"""DPO for any local Hugging Face causal LM, with TRL DPOConfig's arguments and defaults.

    latentfast-dpo --model_name_or_path ~/.cache/latentfast/gemma-3-270m --dataset_name pairs.jsonl \\
        --use_peft --per_device_train_batch_size 4 --max_length 512 --learning_rate 5e-6

Data: TRL's preference format, ``prompt``/``chosen``/``rejected`` (strings, or messages through
the chat template), or conversational ``chosen``/``rejected`` whose shared leading messages are
the prompt. ``per_device_train_batch_size`` pairs per micro-batch. The loss is the fused
engine's DPO family (``objectives.DPOLoss``: every ``--loss_type``, ``--rpo_alpha``'s chosen NLL)
on the policy's hidden states; reference log-probs come from the base with the LoRA adapter
disabled (or a frozen copy without LoRA), per batch or once up front
(``--precompute_ref_log_probs``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from latentfast.choices import DPO_LOSS_TYPES

from .. import demos
from ..config import check, option
from .objectives import DPOLoss
from .rl_config import RLConfig


@dataclass
class DPOConfig(RLConfig):
    """TRL DPOConfig's names and defaults for the options the fused trainer has."""

    beta: float = option(0.1, "DPO temperature (deviation from the reference)")
    loss_type: str = option("sigmoid", "DPO loss", choices=list(DPO_LOSS_TYPES))
    label_smoothing: float = option(0.0, "robust / exo_pair label smoothing")
    max_length: int | None = option(1024, "prompt + response tokens kept (the response end is cut)")
    max_prompt_length: int | None = option(512, "prompt tokens kept (left-truncated); None: all")
    rpo_alpha: float | None = option(None, "RPO: add alpha x the chosen responses' NLL (None: off)")
    precompute_ref_log_probs: bool = option(False, "reference log-probs of the whole data set once, up front")
    dataset_name: str = "arithmetic_pairs"
    output_dir: str = "runs/dpo"
    presets: ClassVar[tuple[dict, dict]] = (demos.DPO, demos.DPO_FULL)

    def __post_init__(self):
        super().__post_init__()
        check(self.max_length is None or self.max_length >= 2, "max_length", "an integer >= 2 (or None)",
              self.max_length)
        check(self.max_prompt_length is None or self.max_prompt_length >= 1, "max_prompt_length",
              "an integer >= 1 (or None)", self.max_prompt_length)
        self.objective()

    def objective(self) -> DPOLoss:
        return DPOLoss(loss_type=self.loss_type, beta=self.beta, label_smoothing=self.label_smoothing,
                       rpo_alpha=self.rpo_alpha)


def parse_args(argv=None) -> DPOConfig:
    return DPOConfig.parse(argv, __doc__)
