"""MiniMind DPO (``train_dpo.py``): chosen against rejected conversations, a frozen reference
from ``--from_weight``, the sigmoid loss, through the fused lm_head (no logits for either model).

    latentfast-minimind dpo                           # demo: GSM8K worked answers, correct vs wrong number
    torchrun --nproc_per_node 2 -m latentfast.train.minimind.dpo --data_path ../dataset/dpo.jsonl

Rows ``{"chosen": [msgs], "rejected": [msgs]}``; the loss is on the assistant spans as SFT's.
``--dpo_logp mean`` (default, MiniMind's) scores a response by its mean token log-prob;
``sum`` is TRL's / the paper's. The mean removes DPO's pull towards longer responses but
adds a bias of its own: a response's score no longer grows with its length, so among
responses that share a prefix the shorter one often wins (MiniMind issue #659 reports
short answers being favoured). ``loss = -logsigmoid(beta ((pi_c - pi_r) - (ref_c - ref_r))).mean() + aux``:
``train.rl``'s ``DPOLoss`` (``average_log_prob`` for ``mean``) on the policy's and the frozen
reference's hidden states, each through its own lm_head.
"""
from __future__ import annotations

from latentfast.data import minimind as mmdata
from latentfast.data import minimind_rl as rldata
from .args import DPOArgs
from .common import DEMO, cli_of, stage_main
from .rl import MiniMindPolicyTrainer


class DPO(MiniMindPolicyTrainer):
    stage = "dpo"
    config_class = DPOArgs
    data_kind = "dpo"
    wandb_name = "DPO"

    def load_rows(self):
        c = self.cfg
        return rldata.gsm8k_dpo_pairs("train") if c.data_path == DEMO else rldata.read_dpo(c.data_path)

    def setup(self):
        super().setup()
        self.loss_fn = self.cfg.objective()

    def encode(self, items):
        b = rldata.encode_dpo(self.tok, items, self.cfg.max_seq_len)
        if not self.cfg.use_moe:  # as the SFT stages: cut columns change no loss (the MoE aux counts them)
            b = mmdata.trim_padding(b)
        b = {k: v.to(self.device) for k, v in b.items()}
        b["input_ids"] = b["X"]  # whole sequences: the policy returns every position's hidden states
        return b

    def loss(self, b):
        ref_h = self.reference_hidden(b)
        h, aux = self.model(b)
        target = b["Y"].masked_fill(b["loss_mask"] == 0, -100)
        W, bias = self.policy.head()
        ref_w, ref_b = self.policy.reference_head()
        loss, m = self.loss_fn(h, W, bias, target, ref_hidden=ref_h, ref_weight=ref_w, ref_bias=ref_b)
        return loss + aux, {"dpo": loss.detach(), "aux": aux.detach(), "reward_margin": m["rewards/margins"],
                            "reward_accuracy": m["rewards/accuracies"], "chosen_logp": m["logps/chosen"],
                            "rejected_logp": m["logps/rejected"]}

    def log_line(self, row):
        return (f"step {row['step']}/{self.total} loss:{row['loss']:.4f} margin:{row.get('reward_margin', 0):.4f} "
                f"acc:{row.get('reward_accuracy', 0):.3f} lr:{row['lr']:.3e} {row['step_s']:.2f}s/step")


main = stage_main(DPO, __doc__)
cli = cli_of(main)

if __name__ == "__main__":
    cli()
