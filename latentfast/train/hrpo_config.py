"""HRPO: GRPO training of hybrid latent reasoning (seed notes 000/001).

    latentfast-hrpo                                   # embedded demo: tiny model + SFT warm-up + HRPO
    python -m latentfast.train.hrpo --model_name /models/Qwen2.5-1.5B-Instruct --train_data gsm8k/train.jsonl
    torchrun --nproc_per_node 8 -m latentfast.train.hrpo --model_name ... [--fsdp]
    # two-stage schedule from the recipe: freeze the projection, then unfreeze it
    latentfast-hrpo --lr_thinking_projection 0 ...
    latentfast-hrpo --resume_from_checkpoint runs/hrpo/checkpoint-250 --lr_thinking_projection 5e-5 ...

Arguments and defaults are the recipe's (hrpo_gsm8k.py); ``--task`` picks the recipe's task
(gsm8k, math, mmlu, mmlu_stem, arc_c, openbookqa, qasc, rag: ``latentfast.data.tasks``),
prompts go through the tokenizer's chat template with the recipe's system prompt, and the
reward is the recipe's (``--reward_funcs hrpo``). Checkpoints record their model, so
``latentfast-hrpo-eval --checkpoint_path <dir>`` evaluates them. With no ``--model_name`` the
embedded demo runs: a small Qwen2 model built from a config and a tokenizer built in
code, a short supervised warm-up on the synthetic arithmetic task, then HRPO; demo
presets (printed at start) replace the defaults of the arguments you do not set.
The training loop is ``latentfast.train.loop``: rollouts, rewards, advantages and reference
log-probs are ``HRPO.batches``, the GRPO loss is ``HybridThinkingLM.forward``.
"""
from __future__ import annotations

import pathlib
import warnings
from dataclasses import dataclass
from typing import ClassVar

from latentfast.choices import GRPO_LOSS_TYPES
from latentfast.data.tasks import TASKS

from . import demos
from .checks import check_data_arg
from .config import TrainConfig, option
from .demos import DEMO_MODEL, EmbeddedDemo
from .rl.objectives import GRPOLoss

LOSS_TYPES = GRPO_LOSS_TYPES  # every GRPO-family type of the fused engine (luspo: --importance_sampling_level sequence)


@dataclass
class HRPOConfig(EmbeddedDemo, TrainConfig):
    """HRPO: GRPO on hybrid latent reasoning; the recipe's arguments (hrpo_gsm8k.py) and defaults."""

    model_name: str = option(DEMO_MODEL, "local HF model path; 'tiny' = embedded demo",
                             aliases=("model_name_or_path",), path="model", names=(DEMO_MODEL,))
    lora_rank: int = option(32, "LoRA rank (alpha = 2*rank, q/k/v/o/gate/up/down); 0 = full", min=0)
    lr: float = 5e-6
    beta: float = option(0.005, "KL coefficient (reference = adapters disabled)", min=0.0)
    residual_r_min: float = option(0.99, "thinking residual: r_min of the gate's Lambda init")
    residual_r_max: float = option(0.999, "thinking residual: r_max of the gate's Lambda init")
    lr_residual_gate: float = option(1e-4, "learning rate of the residual gates")
    lr_residual_Lambda: float = option(1e-3, "learning rate of the residual Lambda")
    lr_thinking_projection: float = option(1e-4, "0 freezes the projection (two-stage schedule)")
    weight_decay: float = 0.1
    warmup_ratio: float = 0.1
    optimizer: str = option("adamw_torch", "adamw_torch, or paged_adamw_8bit (needs bitsandbytes)")
    max_grad_norm: float = 0.1
    group_size: int = option(4, "completions per prompt (GRPO group)")
    temperature: float = option(0.5, "sampling temperature of the rollouts", min=0.0)
    top_p: float = option(1.0, "nucleus sampling of the rollouts", min=0.0, max=1.0)
    gradient_accumulation_steps: int = 4
    per_device_train_batch_size: int = option(8, "completions per device per micro-batch")
    max_prompt_length: int = option(1024, "prompt tokens kept (left-truncated)", min=1)
    max_completion_length: int = option(1024, "new tokens per rollout", min=1)
    loss_type: str = option("grpo", "GRPO normalisation / policy term (every type of the fused engine)",
                            choices=list(LOSS_TYPES))
    importance_sampling_level: str = option("token", "token, or sequence (GSPO; needed by luspo)",
                                            choices=["token", "sequence"])
    epsilon_low: float = option(0.2, "PPO clip, lower", min=0.0)
    epsilon_high: float = option(0.2, "PPO clip, upper", min=0.0)
    save_steps: int = 250
    logging_steps: int = 0
    # --- HRPO model switches ---
    thinking_state: str = option("projection", "thinking state fed back", choices=["projection", "soft_embedding"])
    projection: str = option("linear", "projection of the thinking state", choices=["linear", "layernorm", "mlp"])
    recompute: str = option("stored", "stored = this design; two_pass = the recipe's extra no-grad forward (for "
                            "comparison)", choices=["stored", "two_pass", "two_pass_clean"])
    # --- data / eval / output ---
    task: str = option("gsm8k", "the recipe's task (data fields, prompt, reward)", choices=sorted(TASKS))
    train_data: str | None = option(None, "file/folder; default: --dataset_root's train split, else for gsm8k the "
                                          "shipped sample ('gsm8k_sample'); 'synthetic' = arithmetic (1-3 operations), "
                                          "'synthetic_one_step' = one operation")
    eval_data: str | None = option(None, "file/folder; default: --dataset_root's test split, else for gsm8k "
                                         "'gsm8k_sample_test'")
    dataset_root: str | None = option(None, "folder with the task's splits (the recipe's --dataset_root)", path="dir")
    system_prompt: str | None = option(None, "default: the recipe's (chat template); '' = no system turn")
    no_chat_template: bool = option(False, "plain 'Question: ...\nAnswer:' prompts (base models)")
    eval_size: int = option(100, "held-out rows (greedy hybrid decoding; 0: no evaluation)", min=0)
    eval_steps: int = option(0, "evaluate every N steps (0: only before and after)")
    reward_funcs: list[str] = option(["hrpo"], "hrpo = the recipe's (correct AND exactly one ####); or the split "
                                               "correctness / format")
    output_dir: str = option("runs/hrpo", "where checkpoints, metrics.jsonl and the demo's base_model go")
    sft_steps: int = option(0, "supervised warm-up steps before HRPO (demo)", min=0)
    sft_lr: float = option(3e-3, "learning rate of the warm-up")
    gradient_checkpointing: bool = option(False, "recompute decoder-layer activations in backward (less memory, "
                                                 "~1/3 more compute)")

    presets: ClassVar[tuple[dict, dict]] = (demos.HRPO, demos.HRPO_FULL)

    def __post_init__(self):
        super().__post_init__()  # (EmbeddedDemo: --full only in the demo)
        if self.group_size < 1:
            raise ValueError(f"--group_size must be >= 1, got {self.group_size}")
        self.objective()  # the loss type's options, checked in the one place (rl.objectives.GRPOLoss)
        if self.per_device_train_batch_size % self.group_size:
            raise ValueError(f"--per_device_train_batch_size ({self.per_device_train_batch_size}) must be a multiple "
                             f"of --group_size ({self.group_size})")

    def objective(self) -> GRPOLoss:
        return GRPOLoss(loss_type=self.loss_type, beta=self.beta, epsilon=self.epsilon_low,
                        epsilon_high=self.epsilon_high, importance_sampling_level=self.importance_sampling_level,
                        max_completion_length=self.max_completion_length, temperature=1.0)

    def check_cli(self, parser):
        """The common mistakes, reported at argument parsing with the flag's name."""
        if self.group_size == 1:
            warnings.warn("--group_size 1: a group of one completion has no spread, so every group-normalised "
                          "advantage is 0 and only the KL term (--beta) trains; use --group_size >= 2 for GRPO",
                          UserWarning, stacklevel=4)
        for flag, spec in (("--train_data", self.train_data), ("--eval_data", self.eval_data)):
            if self.task == "gsm8k":
                check_data_arg(parser, flag, spec)
            elif spec is not None and not pathlib.Path(spec).exists():  # rows are checked by the task's loader
                parser.error(f"{flag} {spec!r}: no such file or folder (task {self.task}: expected "
                             f"{TASKS[self.task].doc})")
        super().check_cli(parser)  # --resume_from_checkpoint


def build_parser():
    return HRPOConfig.build_parser(__doc__)


def parse_args(argv=None) -> HRPOConfig:
    return HRPOConfig.parse(argv, __doc__)
