"""MiniMind GRPO (``train_grpo.py``): ``--num_generations`` samples per prompt, group-normalised
advantages, the k3 KL to the frozen reference, through the fused lm_head (no logits).

    latentfast-minimind grpo                          # demo: tiny MiniMind, GSM8K prompts, rule rewards
    torchrun --nproc_per_node 2 -m latentfast.train.minimind.grpo --data_path sft_mini_512.jsonl \\
        --reward_model_path internlm2-1_8b-reward --trust_remote_code 1 --num_generations 1 \\
        --max_gen_len 128 --reasoning 0

Advantages (``train.rl.advantages.minimind_group_batch_zscore``): ``clamp((r - mean_g) / (std_g + 1e-4), -10, 10)``
then a batch z-score. ``--num_generations 1`` (the note's command) has no group spread:
MiniMind's note-era code turns it into NaN; here the advantages are 0 with a warning (only
the KL term trains) -- use ``spo`` for one sample per prompt. The loss is
``train.rl``'s ``GRPOLoss(loss_type)`` (the one place its options are checked, when the flags
are parsed): ``grpo`` (default) is MiniMind's ``-(exp(lp - lp.detach()) A - beta k3)``,
token mean per response (through EOS), then the mean over responses; every GRPO-family
``--loss_type`` of the engine is accepted (``cispo`` as MiniMind's newer code, with
``--epsilon_high``). One update per rollout, as MiniMind: the ratio is 1 (on-policy).
"""
from __future__ import annotations

import warnings

from latentfast.train.rl.advantages import minimind_group_batch_zscore
from .args import GRPOArgs
from .common import cli_of, stage_main
from .rl import MiniMindRL


class GRPO(MiniMindRL):
    stage = "grpo"
    config_class = GRPOArgs
    wandb_name = "GRPO"

    def setup(self):
        super().setup()
        self.num_generations = self.cfg.num_generations
        self.loss_fn = self.cfg.objective()
        if self.num_generations == 1:
            warnings.warn("--num_generations 1: GRPO's group advantages are 0, only the KL term trains "
                          "(MiniMind's note-era code gives NaN here); the spo stage is made for one sample per prompt",
                          stacklevel=1)

    def advantages(self, b):  # the one-generation warning is said once, in setup
        return {"advantages": minimind_group_batch_zscore(b["rewards"], self.num_generations, warn=False)}

    def loss(self, b):
        h, aux = self.policy_hidden(b)
        W, bias = self.policy.head()
        loss, m = self.loss_fn(h, W, bias, b["completion_ids"], b["completion_mask"], b["advantages"],
                               ref=b["ref_logps"])
        return loss + aux, {"kl": m["kl"], "aux": aux.detach(), **self.reward_metrics(b)}


main = stage_main(GRPO, __doc__)
cli = cli_of(main)

if __name__ == "__main__":
    cli()
