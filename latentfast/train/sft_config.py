"""Supervised fine-tuning: cross-entropy on the answer tokens of question/answer rows.

    latentfast-sft                                   # embedded demo: tiny model, synthetic arithmetic
    python -m latentfast.train.sft --model_name /models/Qwen2.5-0.5B --train_data gsm8k_train.jsonl \\
        --lr 1e-5 --per_device_train_batch_size 8 --num_train_epochs 1
    torchrun --nproc_per_node 8 -m latentfast.train.sft ...

The whole trainer is the hooks of ``latentfast.train.loop``. The loss is token-weighted
over the step (each micro-batch's mean CE weighs by its share of the step's answer
tokens), so gradient accumulation equals the big batch. The demos of HRPO, CODI and KV
distillation use ``SFT`` as their warm-up (``SFT(cfg, lm=..., tok=...).fit()``, or
``warm_up(...)``), each with its own prompt format through ``encode``.
"""
from __future__ import annotations

from dataclasses import dataclass

from . import demos
from .checks import check_data_arg
from .config import TrainConfig, demo_preset, option
from .demos import DEMO_MODEL


@dataclass
class SFTConfig(TrainConfig):
    model_name: str = option(DEMO_MODEL, "local HF model path; 'tiny' = embedded demo", aliases=("model_name_or_path",),
                             path="model", names=(DEMO_MODEL,))
    train_data: str = option("gsm8k", "JSONL path, 'gsm8k' (shipped sample) or 'synthetic'")
    eval_data: str = option("gsm8k_test", "JSONL path, 'gsm8k_test' sample, 'synthetic' or 'none'")
    eval_size: int = option(64, "held-out rows (answer CE and greedy accuracy)", min=0)
    max_length: int = option(512, "prompt + answer tokens kept", min=2)
    max_new_tokens: int = option(256, "greedy decoding length at evaluation", min=1)
    output_dir: str = option("runs/sft", "where checkpoints, metrics.jsonl and the model go")
    save_model: bool = option(True, "save_pretrained the model (and tokenizer) into output_dir/model at the end")

    def check_cli(self, parser):
        super().check_cli(parser)
        if self.full and self.model_name != DEMO_MODEL:
            parser.error("--full: only for the embedded demo (no --model_name)")
        check_data_arg(parser, "--train_data", self.train_data)
        check_data_arg(parser, "--eval_data", self.eval_data, allowed=("none",))


def parse_args(argv=None) -> SFTConfig:
    """The command line (``--help`` and argument errors without torch); the demo's preset when
    there is no ``--model_name``."""
    cfg = SFTConfig.parse(argv, __doc__)
    if cfg.model_name == DEMO_MODEL:
        cfg = cfg.with_preset(demo_preset(demos.SFT, demos.SFT_FULL, cfg.full))
    return cfg
