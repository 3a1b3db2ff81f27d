"""``RLConfig``: the flags every RL entrypoint shares (TRL ModelConfig's model options, the data,
HF TrainingArguments' defaults where they differ from the loop's). Torch-free: the command lines
parse (``--help``, argument errors) before their trainer loads.
"""
from __future__ import annotations

import pathlib
from dataclasses import dataclass
from typing import ClassVar

from latentfast.choices import DTYPE_NAMES

from ..config import TrainConfig, check, option
from ..demos import EmbeddedDemo


@dataclass
class RLConfig(EmbeddedDemo, TrainConfig):
    """Shared by the RL entrypoints: the model (TRL ModelConfig), the data, HF Trainer defaults.
    With no --model_name_or_path ('tiny') a bounded demo preset fills the untyped flags."""

    model_field: ClassVar[str] = "model_name_or_path"

    model_name_or_path: str = option("tiny", "local HF causal LM folder ('tiny': a small random Qwen2, for tests)",
                                     aliases=("model_name",), path="model", names=("tiny",))
    dtype: str = option("auto", "weights dtype (auto: bf16 on CUDA, fp32 on CPU)", choices=list(DTYPE_NAMES))
    use_peft: bool = option(False, "train a LoRA adapter (TRL ModelConfig)")
    lora_r: int = option(16, "LoRA rank")
    lora_alpha: int = option(32, "LoRA alpha")
    lora_dropout: float = option(0.05, "LoRA dropout")
    lora_target_modules: list[str] | None = option(None, "LoRA target modules (default: PEFT's for the model type)")
    gradient_checkpointing: bool = option(True, "recompute decoder activations in backward (TRL's default)")
    dataset_name: str = option("arithmetic", "JSON/JSONL file, datasets folder, or a built-in set")
    dataset_train_split: str = option("train", "split of a datasets folder")
    lr: float = 1e-6
    lr_scheduler_type: str = "linear"
    warmup_ratio: float = 0.0
    num_train_epochs: float = 3.0
    output_dir: str = "runs/rl"

    def __post_init__(self):
        super().__post_init__()
        check(self.lora_r >= 1, "lora_r", "an integer >= 1", self.lora_r)
        check(self.lora_alpha > 0, "lora_alpha", "a number > 0", self.lora_alpha)
        check(0 <= self.lora_dropout < 1, "lora_dropout", "a probability in [0, 1)", self.lora_dropout)

    def check_cli(self, parser):
        super().check_cli(parser)
        from .data import BUILTIN

        if self.dataset_name not in BUILTIN and not pathlib.Path(self.dataset_name).exists():
            parser.error(f"--dataset_name {self.dataset_name!r}: no such file or folder (expected a JSON/JSONL "
                         f"file, a datasets folder, or one of {BUILTIN})")


__all__ = ["RLConfig"]
