"""MiniMind reasoning distillation (``train_distill_reason.py``): SFT on
``<think>…</think><answer>…</answer>`` answers with the tags' tokens weighted ×10.

    latentfast-minimind distill_reason                 # demo: GSM8K worked solutions as <think>, the final
                                                       # number as <answer>, from out/full_sft_64.pth
    torchrun --nproc_per_node 2 -m latentfast.train.minimind.distill_reason \\
        --hidden_size 640 --num_hidden_layers 12 --use_moe 1 --headwise_attn_output_gate 1 --use_wandb

The loss is MiniMind's ``sum(CE * w) / sum(mask) + aux`` with ``w = mask`` and ``w = 10`` on
the targets of each whole ``<think>``/``</think>``/``<answer>``/``</answer>`` token sequence
inside the mask (``data.minimind.tag_weights``). MiniMind's own ``isin`` rule up-weights every
``<``/``th``/``ink``/``>`` piece anywhere (the note-era tokenizer has no tag tokens); that
is not reproduced. Default ``--from_weight dpo`` as MiniMind (the demo starts from ``full_sft``).
"""
from __future__ import annotations


from latentfast.data import minimind as mmdata

from ..config import option
from .common import MiniMindArgs, MiniMindTrainer, cli_of, script_defaults, stage_main


@script_defaults(save_weight="reason", batch_size=8, learning_rate=1e-6, accumulation_steps=1, save_interval=100,
                 max_seq_len=720, data_path="../dataset/r1_mix_1024.jsonl", from_weight="dpo",
                 wandb_project="MiniMind-Reasoning")


class DistillReasonArgs(MiniMindArgs):
    """MiniMind reasoning distillation (train_distill_reason.py defaults)."""

    tag_weight: float = option(10.0, "loss weight of the reasoning tags' tokens (MiniMind: 10)")


class DistillReason(MiniMindTrainer):
    stage = "distill_reason"
    config_class = DistillReasonArgs
    data_kind = "reason"
    wandb_name = "Reasoning"

    def setup(self):
        super().setup()
        self.tag_ids = mmdata.tag_token_ids(self.tok)

    def encode(self, items):
        b = super().encode(items)
        b["weights"] = mmdata.tag_weights(b["Y"], b["loss_mask"], self.tag_ids, self.cfg.tag_weight)
        return b

    def loss(self, b):
        loss, ce, aux = self.model(b["X"], b["Y"], b["loss_mask"], b["weights"])
        tags = (b["weights"] > 1).sum() / b["loss_mask"].sum().clamp(min=1)
        return loss, {"ce": ce, "aux": aux, "tag_token_share": tags}


main = stage_main(DistillReason, __doc__)
cli = cli_of(main)

if __name__ == "__main__":
    cli()
