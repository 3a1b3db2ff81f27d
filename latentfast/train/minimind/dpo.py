"""MiniMind DPO (``train_dpo.py``): chosen against rejected conversations, a frozen reference
from ``--from_weight``, the sigmoid loss, through the fused lm_head (no logits for either model).

    latentfast-minimind dpo                           # demo: GSM8K worked answers, correct vs wrong number
    torchrun --nproc_per_node 2 -m latentfast.train.minimind.dpo --data_path ../dataset/dpo.jsonl

Rows ``{"chosen": [msgs], "rejected": [msgs]}``; the loss is on the assistant spans as SFT's.
``--dpo_logp mean`` (default, MiniMind's) scores a response by its mean token log-prob;
``sum`` is TRL's / the paper's. The mean removes DPO's pull towards longer responses but
adds a bias of its own: a response's score no longer grows with its length, so among
responses that share a prefix the shorter one often wins (MiniMind issue #659 reports
short answers being favoured). ``loss = -logsigmoid(beta ((pi_c - pi_r) - (ref_c - ref_r))).mean() + aux``.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from latentfast.data import minimind as mmdata
from latentfast.data import minimind_rl as rldata
from latentfast.hf.adapter import unwrap
from latentfast.ops.preference import fused_linear_dpo_loss

from ..config import option
from .common import DEMO, MiniMindArgs, MiniMindTrainer, cli_of, script_defaults, stage_main


@script_defaults(save_weight="dpo", epochs=1.0, batch_size=4, learning_rate=4e-8, accumulation_steps=1,
                 log_interval=100, save_interval=100, max_seq_len=1024, data_path="../dataset/dpo.jsonl",
                 from_weight="full_sft", wandb_project="MiniMind-DPO")


class DPOArgs(MiniMindArgs):
    """MiniMind DPO (train_dpo.py defaults)."""

    beta: float = option(0.1, "DPO temperature")
    dpo_logp: str = option("mean", "sequence score: mean token log-prob (MiniMind) or sum (TRL)",
                           choices=("mean", "sum"))


class Hidden(nn.Module):
    """The module DDP wraps: decoder hidden states (after the final norm) and the MoE aux loss."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, X):
        out = unwrap(self.lm).model(input_ids=X)
        return out.last_hidden_state, out.aux_loss


class DPO(MiniMindTrainer):
    stage = "dpo"
    config_class = DPOArgs
    data_kind = "dpo"
    wandb_name = "DPO"

    def load_rows(self):
        c = self.cfg
        return rldata.gsm8k_dpo_pairs("train") if c.data_path == DEMO else rldata.read_dpo(c.data_path)

    def encode(self, items):
        b = rldata.encode_dpo(self.tok, items, self.cfg.max_seq_len)
        if not self.cfg.use_moe:  # as the SFT stages: cut columns change no loss (the MoE aux counts them)
            b = mmdata.trim_padding(b)
        return {k: v.to(self.device) for k, v in b.items()}

    def build_model(self):
        self.lm = self.init_lm(self.cfg.from_weight)
        self.ref = copy.deepcopy(self.lm).eval().requires_grad_(False)
        return Hidden(self.lm)

    def loss(self, b):
        c = self.cfg
        mean = c.dpo_logp == "mean"
        with torch.no_grad():
            ref_h = unwrap(self.ref).model(input_ids=b["X"]).last_hidden_state
        h, aux = self.model(b["X"])
        target = b["Y"].masked_fill(b["loss_mask"] == 0, -100)
        loss, (pc, pr, _, _, _, rc, rr) = fused_linear_dpo_loss(  # the reference's log-probs from its own head
            h, unwrap(self.lm).lm_head.weight, target, ref_input=ref_h, ref_weight=unwrap(self.ref).lm_head.weight,
            beta=c.beta, average_log_prob=mean)
        return loss + aux, {"dpo": loss.detach(), "aux": aux.detach(), "reward_margin": (rc - rr).mean(),
                            "reward_accuracy": (rc > rr).float().mean(), "chosen_logp": pc.mean(),
                            "rejected_logp": pr.mean()}

    def log_line(self, row):
        return (f"step {row['step']}/{self.total} loss:{row['loss']:.4f} margin:{row.get('reward_margin', 0):.4f} "
                f"acc:{row.get('reward_accuracy', 0):.3f} lr:{row['lr']:.3e} {row['step_s']:.2f}s/step")


main = stage_main(DPO, __doc__)
cli = cli_of(main)

if __name__ == "__main__":
    cli()
