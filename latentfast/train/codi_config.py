"""CODI hybrid explicit/implicit training (seed note 003).

    latentfast-codi                                    # embedded demo (tiny model, synthetic data)
    python -m latentfast.train.codi --model_name_or_path /models/Llama-3.2-1B-Instruct \\
        --hybrid_data_path data/hybrid_training/hybrid_training_data.json --output_dir checkpoints/hybrid_codi \\
        --num_train_epochs 5 --per_device_train_batch_size 4 --learning_rate 2e-5 \\
        --num_latent 6 --prj_dim 2048 --hybrid_cot_only_ratio 0.2 --bf16
    ... --restore_from ./CODI/pretrained/CODI-llama3.2-1b-Instruct   # continue from a CODI checkpoint
    torchrun --nproc_per_node 8 -m latentfast.train.codi ...
    ... --data_name icot --train_data gsm8k_aug.jsonl --use_lora True --lora_r 128 --lora_alpha 32 --lora_init \
        --distill_loss_div_std True --distill_loss_factor 20 --remove_eos True --max_token_num 200  # original CODI

The original CODI's flags (zhenyi4/codi train.py) keep its meanings and defaults
(distillation: every hidden state incl. the embeddings, smooth L1, no std division);
``--data_name`` reads its datasets from a local ``--train_data`` file (``codi_data.from_original``).

One model is both teacher (explicit CoT) and student (latent steps, see
``latentfast.models.codi``). Per sample, with probability ``--hybrid_cot_only_ratio``
the latent part is skipped (pure CoT: teacher CE only); otherwise the sample's
latent steps (from the phase-1 JSON of ``latentfast.train.codi_data``, or every step
for a plain GSM8K JSONL = original CODI) become latent blocks, and

    loss = CE(student) + distill_loss_factor * CODI distill + ref_loss_factor * CE(teacher)

The demo (no ``--model_name_or_path``) runs the whole pipeline on a tiny model: an
explicit-CoT warm-up (``SFT`` on the teacher sequences; it stands in for the pretrained
model), phase-1 entropies, hybrid training, then ``latentfast.eval.adaptive`` in the three modes.
The training loop is ``latentfast.train.loop``; this file is the CODI-specific part.
"""
from __future__ import annotations

import pathlib
from dataclasses import dataclass
from typing import ClassVar

from latentfast.choices import CODI_DATA_NAMES, CODI_DISTILL_LOSS_TYPES

from . import demos
from .checks import check_data_arg
from .config import TrainConfig, check, option
from .demos import DEMO_MODEL, EmbeddedDemo


@dataclass
class CODIConfig(EmbeddedDemo, TrainConfig):
    """CODI hybrid explicit/latent training: the recipe's flags (phase2_train_compatible.py) and
    the original CODI's (zhenyi4/codi train.py), their meanings and defaults."""

    model_name: str = option(DEMO_MODEL, "local HF model path; 'tiny' = embedded demo", aliases=("model_name_or_path",),
                             path="model", names=(DEMO_MODEL,))
    hybrid_data_path: str | None = option(None, "phase-1 JSON (latentfast.train.codi_data); default: --train_data",
                                          path="file")
    output_dir: str = option("runs/codi", "where checkpoints, metrics.jsonl, codi_config.json and eval.md go")
    num_train_epochs: float = 5.0
    per_device_train_batch_size: int = 4
    lr: float = 2e-5
    warmup_ratio: float = 0.1
    max_grad_norm: float = 2.0
    num_latent: int = option(6, "latent steps per latent block", min=0)
    prj_dim: int = option(2048, "hidden width of the latent projection", min=1)
    use_prj: bool = option(True, "latent projection (Linear-GELU-Linear-LayerNorm)")
    prj_dropout: float = option(0.0, "dropout before the projection", min=0.0, max=1.0)
    distill_loss_factor: float = option(1.0, "weight of the CODI distillation loss")
    ref_loss_factor: float = option(1.0, "weight of the teacher's (explicit CoT) CE")
    distill_loss_type: str = option("smooth_l1", "smooth_l1 / l2 (the original's) or l1", choices=list(CODI_DISTILL_LOSS_TYPES))
    distill_loss_div_std: bool = option(False, "divide the distillation loss by the teacher's std (twice for l2)")
    distill_layers: str = option("all", "'all' (every hidden state incl. the embedding output, as the original) | "
                                        "'blocks' | 'middle' | 'last' | 'i,j,...'")
    hybrid_cot_only_ratio: float | None = option(
        None, "share of samples trained as pure explicit CoT (default 0.2; 0 with --data_name, as the original)")
    restore_from: str | None = option(None, "CODI checkpoint to start from (ours or original CODI weights)",
                                      path="path")
    use_lora: bool | None = option(None, "LoRA adapters (True: rank --lora_r, default 128); default: --lora_rank "
                                         "decides")
    lora_rank: int | None = option(None, "0 = full fine-tuning (default); CODI uses 128", aliases=("lora_r",))
    lora_alpha: int = option(16, "the original's default 16 (its scripts pass 32)")
    lora_init: bool | None = option(None, "PEFT's zero/Gaussian LoRA init (the only one here; the original's "
                                          "False = LoftQ is not supported)")
    remove_eos: bool = option(False, "no <eos> after the question and before the answer (the original's scripts "
                                     "pass True; latentfast's eval decodes without them)")
    max_token_num: int = option(1000, "drop samples longer than this many tokens (question+CoT+answer)")
    model_max_length: int = option(28000, "the tokenizer's model_max_length (as the original)")
    data_name: str | None = option(
        None, "the original's datasets, read from the local file --train_data: "
        + "; ".join(f"{k} = {v}" for k, v in CODI_DATA_NAMES.items()), choices=sorted(CODI_DATA_NAMES))
    include_last_cot: bool = option(False, "keep the last CoT step (--data_name icot / icot-full)")
    print_ref_model_stats: bool = option(False, "log the teacher's probability of the first answer token")
    train_data: str = option("gsm8k", "without --hybrid_data_path: JSONL path, 'gsm8k' sample or 'synthetic' (every "
                                      "step latent = original CODI); with --data_name: the local file of that dataset")
    eval_data: str = option("gsm8k_test", "JSONL path, 'gsm8k_test' sample, 'synthetic' or 'none'")
    eval_size: int = option(100, "held-out rows (latentfast.eval.adaptive)", min=0)
    eval_modes: str = option("latent,explicit,adaptive", "comma-separated latentfast.eval.adaptive modes")
    max_new_tokens: int = option(256, "decoding length at evaluation", min=1)
    sft_steps: int = option(0, "explicit-CoT warm-up steps before phase 1 (demo)", min=0)
    sft_lr: float = option(3e-3, "learning rate of the warm-up")
    hybrid_samples: int = option(0, "demo: phase-1 samples generated in-process", min=0)

    presets: ClassVar[tuple[dict, dict]] = (demos.CODI, demos.CODI_FULL)

    def __post_init__(self):
        super().__post_init__()  # (EmbeddedDemo: --full only in the demo)
        if self.hybrid_cot_only_ratio is None:  # the original trains the student on every sample
            self.hybrid_cot_only_ratio = 0.0 if self.data_name else 0.2
        if self.use_lora is not None:  # the original's switch; --lora_r / --lora_rank give the rank
            self.lora_rank = (self.lora_rank or 128) if self.use_lora else 0
        self.lora_rank = self.lora_rank or 0
        if self.lora_rank < 0:
            raise ValueError(f"--lora_rank must be >= 0, got {self.lora_rank}")
        if self.lora_rank and self.lora_init is False:
            raise ValueError("--lora_init False (LoftQ adapters) is not supported: drop it or pass --lora_init")
        if self.max_token_num < 1:
            raise ValueError(f"--max_token_num must be >= 1, got {self.max_token_num}")
        check(self.distill_loss_type in CODI_DISTILL_LOSS_TYPES, "distill_loss_type", f"one of {list(CODI_DISTILL_LOSS_TYPES)}",
              self.distill_loss_type)
        check(self.data_name is None or self.data_name in CODI_DATA_NAMES, "data_name",
              f"one of {sorted(CODI_DATA_NAMES)}", self.data_name)

    def check_cli(self, parser):
        if not self.data_name:  # with --data_name, codi_data.from_original checks the rows
            check_data_arg(parser, "--train_data", self.train_data)
        check_data_arg(parser, "--eval_data", self.eval_data, allowed=("none",))
        super().check_cli(parser)  # --resume_from_checkpoint
        if self.data_name and not pathlib.Path(self.train_data).is_file():
            parser.error(f"--data_name {self.data_name} reads --train_data as a local file "
                         f"({CODI_DATA_NAMES[self.data_name]}); not a file: {self.train_data!r}")


def build_parser():
    return CODIConfig.build_parser(__doc__)


def parse_args(argv=None) -> CODIConfig:
    return CODIConfig.parse(argv, __doc__)
