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

from .args import DistillReasonArgs
from .common import MiniMindTrainer, cli_of, stage_main


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
