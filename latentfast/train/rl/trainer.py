"""The RL trainer on the loop (``latentfast.train.loop``), generic over a policy (``policy.py``).

Per optimizer step the loop asks ``batches(step)`` for ``gradient_accumulation_steps`` micro-batches
and calls ``loss`` on each. An RL algorithm fills in four hooks:

    rollout(rows, round) -> dict     prompts -> completions (the decode engine, ``policy.rollout``)
    score(batch) -> (N,) rewards     reward functions / reward models (before any training forward)
    advantages(batch) -> (N,) | (N, C)   one of ``advantages.py``'s estimators
    loss(micro) -> (loss, metrics)   the objective object (``objectives.py``) on ``policy.module``'s
                                     hidden states and ``policy.head()``: no logits

``ModelArgs`` are TRL ModelConfig's (``--model_name_or_path``, ``--use_peft``, ``--lora_r``, ...);
``RLConfig`` sets HF TrainingArguments' defaults where they differ from the loop's. With LoRA the
reference is the base with the adapter disabled; ``beta = 0`` builds none.
See ``grpo.py`` (GRPO), ``rloo.py`` (RLOO in one small file) and ``dpo.py`` (DPO).
"""
from __future__ import annotations

import pathlib
from dataclasses import dataclass
from typing import ClassVar

import torch

from latentfast import files
from latentfast.hf import adapter

from ..config import check, option
from ..demos import EmbeddedDemo
from ..loop import TrainConfig, Trainer
from .policy import CausalLMPolicy

DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class RLConfig(EmbeddedDemo, TrainConfig):
    """Shared by the RL entrypoints: the model (TRL ModelConfig), the data, HF Trainer defaults.
    With no --model_name_or_path ('tiny') a bounded demo preset fills the untyped flags."""

    model_field: ClassVar[str] = "model_name_or_path"

    model_name_or_path: str = option("tiny", "local HF causal LM folder ('tiny': a small random Qwen2, for tests)",
                                     aliases=("model_name",), path="model", names=("tiny",))
    dtype: str = option("auto", "weights dtype (auto: bf16 on CUDA, fp32 on CPU)", choices=list(DTYPES))
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


def load_policy_model(cfg: RLConfig, device):
    """(tokenizer, causal LM, PEFT-wrapped when --use_peft)."""
    from latentfast.models.local import load_causal_lm

    dtype = DTYPES[cfg.dtype] or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    tok, lm = load_causal_lm(cfg.model_name_or_path, device, dtype=dtype, seed=cfg.seed)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if cfg.gradient_checkpointing:
        adapter.enable_activation_checkpointing(lm, use_reentrant=False)
        lm.config.use_cache = False
    if cfg.use_peft:
        from peft import LoraConfig

        lm = adapter.wrap_peft(lm, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                              target_modules=cfg.lora_target_modules, task_type="CAUSAL_LM"))
    return tok, lm


class RLTrainer(Trainer):
    """Builds the policy; subclasses write the hooks (see the module docstring)."""

    name = "rl"

    def needs_reference(self) -> bool:
        return True

    def build_model(self):
        self.tok, lm = load_policy_model(self.cfg, self.device)
        ref = None
        if self.needs_reference():
            ref = "adapter" if self.cfg.use_peft else "copy"
        self.policy = CausalLMPolicy(lm, self.tok, reference=ref)
        return self.policy.module

    def reference_hidden(self, batch: dict):
        """The reference's completion hidden states (no grad), or None without a reference."""
        ctx = self.policy.reference()
        if ctx is None:
            return None
        with ctx as ref, self.amp():
            return ref(batch)[0]

    def on_train_end(self, result):
        if self.rank == 0:  # the trained model (or adapter) as HF files, as TRL's save_model
            files.save_pretrained(self.out / "final", self.policy.lm, self.tok)
        return result


__all__ = ["RLConfig", "RLTrainer", "load_policy_model"]
