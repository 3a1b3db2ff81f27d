"""GRPO for any local Hugging Face causal LM, with TRL GRPOConfig's arguments and defaults.

    latentfast-grpo --model_name_or_path ~/.cache/latentfast/gemma-3-270m --dataset_name gsm8k_sample \\
        --reward_funcs accuracy --use_peft --num_generations 4 --per_device_train_batch_size 8 \\
        --max_completion_length 64 --learning_rate 1e-5
    latentfast-grpo --dataset_name prompts.jsonl --reward_funcs my_rewards:correct ./reward_model

Data: TRL's prompt-only format (``prompt``: a string, or messages through the chat template);
other columns reach the reward functions as keywords. Rewards: ``module:function`` (TRL's
signature), a local reward-model folder, or ``accuracy``; summed with ``--reward_weights``.
Batching as TRL: ``per_device_train_batch_size`` completions per micro-batch; one generation
round makes ``per_device_train_batch_size * steps_per_generation`` completions
(``num_generations`` per prompt), used for ``num_iterations`` passes (old log-probs are taken
then, so the clipped ratio is live). Loss: every GRPO-family type of the fused engine
(``objectives.GRPOLoss``) on the policy's hidden states; rollouts: the decode engine.
"""
from __future__ import annotations

import pathlib
from dataclasses import dataclass
from typing import ClassVar

from latentfast.choices import GRPO_LOSS_TYPES

from .. import demos
from ..config import check, option
from .objectives import GRPOLoss
from .rl_config import RLConfig


@dataclass
class GRPOConfig(RLConfig):
    """TRL GRPOConfig's names and defaults (TRL 1.16) for the options the fused trainer has."""

    num_generations: int = option(8, "completions per prompt (the group)")
    max_prompt_length: int | None = option(512, "prompt tokens kept (left-truncated); None: all")
    max_completion_length: int = option(256, "new tokens per completion")
    temperature: float = option(1.0, "sampling temperature (also divides the logits of the loss, as TRL)")
    top_p: float = option(1.0, "nucleus sampling")
    top_k: int = option(0, "top-k sampling (0: off)")
    beta: float = option(0.0, "KL coefficient (0: no reference model is built)")
    loss_type: str = option("dapo", "loss normalisation / policy term", choices=list(GRPO_LOSS_TYPES))
    epsilon: float = option(0.2, "lower clip")
    epsilon_high: float | None = option(None, "upper clip (default: --epsilon)")
    delta: float | None = option(None, "two-sided clip bound on the ratio (None: off)")
    importance_sampling_level: str = option("token", "token or sequence (GSPO)", choices=["token", "sequence"])
    scale_rewards: str = option("group", "advantage scaling: group / batch / none", choices=["group", "batch", "none"])
    num_iterations: int = option(1, "passes over each generation round (mu)")
    steps_per_generation: int | None = option(None, "micro-batches per generation round (default: "
                                                    "--gradient_accumulation_steps)")
    mask_truncated_completions: bool = option(False, "completions without EOS are left out of the loss")
    top_entropy_quantile: float = option(1.0, "train on this top fraction of tokens by entropy")
    use_bias_correction_kl: bool = option(True, "multiply the KL term by the importance ratio (TRL's default)")
    entropy_coef: float = option(0.0, "entropy bonus coefficient")
    reward_funcs: list[str] = option(["accuracy"], "module:function, local reward-model folders, or 'accuracy'")
    reward_weights: list[float] | None = option(None, "weights of --reward_funcs (default: all 1)")
    logging_steps: int = 10
    output_dir: str = "runs/grpo"
    presets: ClassVar[tuple[dict, dict]] = (demos.GRPO, demos.GRPO_FULL)

    def __post_init__(self):
        super().__post_init__()
        check(self.num_generations >= 2, "num_generations", "an integer >= 2 (a group of one has no advantage)",
              self.num_generations)
        check(self.max_completion_length >= 1, "max_completion_length", "an integer >= 1", self.max_completion_length)
        check(self.max_prompt_length is None or self.max_prompt_length >= 1, "max_prompt_length",
              "an integer >= 1 (or None)", self.max_prompt_length)
        check(self.num_iterations >= 1, "num_iterations", "an integer >= 1", self.num_iterations)
        check(0 < self.top_p <= 1, "top_p", "a number in (0, 1]", self.top_p)
        check(self.top_k >= 0, "top_k", "an integer >= 0", self.top_k)
        spg = self.generation_steps
        check(spg >= 1, "steps_per_generation", "an integer >= 1", spg)
        check(self.per_device_train_batch_size * spg % self.num_generations == 0, "num_generations",
              f"a divisor of the generation batch per_device_train_batch_size x steps_per_generation = "
              f"{self.per_device_train_batch_size * spg}", self.num_generations)
        check(self.reward_weights is None or len(self.reward_weights) == len(self.reward_funcs), "reward_weights",
              f"{len(self.reward_funcs)} weights (one per --reward_funcs)", self.reward_weights)
        self.objective()  # every loss-type option is checked here, once

    def check_cli(self, parser):
        super().check_cli(parser)
        from .rewards import BUILTIN  # a folder is a reward model, module:function is imported at setup

        for spec in self.reward_funcs:
            if spec not in BUILTIN and ":" not in spec and not pathlib.Path(spec).is_dir():
                parser.error(f"--reward_funcs {spec!r}: no such folder (expected 'module:function', a local "
                             f"reward-model folder, or one of {sorted(BUILTIN)})")

    @property
    def generation_steps(self) -> int:
        return self.steps_per_generation or self.gradient_accumulation_steps

    def objective(self) -> GRPOLoss:
        return GRPOLoss(loss_type=self.loss_type, beta=self.beta, epsilon=self.epsilon, epsilon_high=self.epsilon_high,
                        delta=self.delta, importance_sampling_level=self.importance_sampling_level,
                        top_entropy_quantile=self.top_entropy_quantile,
                        use_bias_correction_kl=self.use_bias_correction_kl,
                        max_completion_length=self.max_completion_length, temperature=self.temperature,
                        entropy_coef=self.entropy_coef)


def parse_args(argv=None) -> GRPOConfig:
    return GRPOConfig.parse(argv, __doc__)
