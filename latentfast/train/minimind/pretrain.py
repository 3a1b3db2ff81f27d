"""MiniMind pretraining (``train_pretrain.py``): next-token CE on ``{"text"}`` rows + the MoE aux loss.

    latentfast-minimind pretrain                       # embedded demo (GSM8K sample text, small model, CPU)
    torchrun --nproc_per_node 2 -m latentfast.train.minimind.pretrain \\
        --hidden_size 640 --num_hidden_layers 12 --use_moe 1 --headwise_attn_output_gate 1 --use_wandb

Writes ``{save_dir}/pretrain_{hidden_size}{_moe}.pth``; flags and defaults are MiniMind's
(``latentfast/train/minimind/common.py``).
"""
from __future__ import annotations

from .args import PretrainArgs
from .common import MiniMindTrainer, cli_of, stage_main


class Pretrain(MiniMindTrainer):  # MiniMindTrainer's defaults are pretraining's: stage, data kind, wandb name
    config_class = PretrainArgs


main = stage_main(Pretrain, __doc__)
cli = cli_of(main)

if __name__ == "__main__":
    cli()
