"""RLOO (REINFORCE leave-one-out, TRL ``RLOOTrainer``) as a configuration of the GRPO trainer.

    latentfast-rloo --model_name_or_path <folder> --dataset_name arithmetic --use_peft --num_generations 4

What differs from GRPO, after TRL 1.16: the advantage is the reward minus the mean of the
other ``num_generations - 1`` samples of its prompt (``advantages.rloo_baseline``), optionally
z-scored over the batch (``--normalize_advantages``); the KL to the reference is a reward
penalty, ``r - beta * sum_t(old_t - ref_t)`` (first-order estimate, default beta 0.05); the loss is
PPO's clipped term on the *sequence* log-prob ratio, averaged over sequences
(``PPOSequenceObjective`` with no KL term, through the fused engine).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..config import check, option
from .grpo_config import GRPOConfig


@dataclass
class RLOOConfig(GRPOConfig):
    """TRL RLOOConfig's defaults where they differ from GRPOConfig's."""

    num_generations: int = 2
    beta: float = 0.05
    normalize_advantages: bool = option(False, "z-score the advantages over the batch")
    output_dir: str = "runs/rloo"

    def __post_init__(self):
        super().__post_init__()
        check(self.epsilon_high in (None, self.epsilon), "epsilon_high", "unset or equal to --epsilon (RLOO's clip "
              "is symmetric here)", self.epsilon_high)


def parse_args(argv=None) -> RLOOConfig:
    return RLOOConfig.parse(argv, __doc__)
