"""MiniMind full supervised fine-tuning (``train_full_sft.py``): CE on the assistant spans of
``{"conversations": [...]}`` rows (the tokenizer's chat template) + the MoE aux loss.

    latentfast-minimind full_sft                       # demo: GSM8K question -> worked answer, from the
                                                       # pretrain demo's out/pretrain_64.pth
    torchrun --nproc_per_node 2 -m latentfast.train.minimind.full_sft \\
        --hidden_size 640 --num_hidden_layers 12 --use_moe 1 --headwise_attn_output_gate 1 \\
        --data_path ../dataset/sft_512.jsonl --use_wandb

Loads ``{save_dir}/{from_weight}_{hidden_size}{_moe}.pth`` (default ``pretrain``), writes
``{save_dir}/full_sft_{hidden_size}{_moe}.pth``.
"""
from __future__ import annotations

from .args import FullSFTArgs
from .common import MiniMindTrainer, cli_of, stage_main


class FullSFT(MiniMindTrainer):
    stage = "full_sft"
    config_class = FullSFTArgs
    data_kind = "sft"
    wandb_name = "Full-SFT"


main = stage_main(FullSFT, __doc__)
cli = cli_of(main)

if __name__ == "__main__":
    cli()
