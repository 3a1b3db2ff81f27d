"""MiniMind PPO (``train_ppo.py``): actor, old actor, frozen reference and a critic, through the
fused lm_head (no logits).

    latentfast-minimind ppo                           # demo: tiny MiniMind, GSM8K prompts, rule rewards
    torchrun --nproc_per_node 2 -m latentfast.train.minimind.ppo --reward_model_path internlm2-1_8b-reward ...

The critic is MiniMind's ``CriticModel``: the base model (loaded from the same ``--from_weight``)
with ``value_head = Linear(hidden, 1)`` on ``model.norm`` of the decoder's output (MiniMind
applies the final norm a second time there; kept, so its numbers carry over). Actor and
critic are one DDP module with two parameter groups (``--learning_rate``,
``--critic_learning_rate``), each clipped to ``--grad_clip`` on its own, under one schedule
(MiniMind's two ``CosineAnnealingLR`` have the same shape).

``--ppo_mode sequence`` (default; MiniMind's note-era objective): ``A = R - V(last token)``,
sequence log-prob sums, ``-min(ratio A, clip(ratio, 1 +- eps) A)`` with ``ratio = exp(lp - old)``
against the old actor (refreshed from the actor every ``--update_old_actor_freq`` steps),
``+ vf_coef mse(V, R) + kl_coef mean(lp - ref)``; one update per rollout
(``PPOSequenceObjective``).

``--ppo_mode gae`` (MiniMind's newer code): the reward on the last response token,
token-level GAE (``--gamma``, ``--lam``) over the critic's values at rollout time (the value of
the state *before* each response token, MiniMind's ``gather(1, prompt_len - 1 + t)``), whitened
advantages, ``--ppo_update_iters`` epochs of ``--mini_batch_size`` minibatches over each
rollout (one optimizer step each), the clipped per-token ratio against the rollout's
log-probs, the k3 KL in the loss, the clipped value loss (``--cliprange_value``), and the
rest of a rollout's updates skipped once the ranks' mean ``0.5 (log ratio)^2`` exceeds
``--early_stop_kl``. Resume is exact at rollout boundaries (``--save_interval`` a multiple
of the updates per rollout).

``--value_head_init mean_reward`` (not MiniMind's; its head is ``nn.Linear``'s random init, the
default): on a fresh run's first rollout the head becomes weight 0, bias = that rollout's mean
reward (averaged over ranks), so the first advantages are ``R - mean(R)`` instead of ``R`` minus
a random head's output; the fitted head is in the checkpoints. The demo runs ``--ppo_mode gae``
with it (measured: the note-era objective at the demo's size stays flat, see the README).
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from latentfast.hf.adapter import run_decoder, unwrap
from latentfast.ops.lm_head_engine import lm_head_logps
from latentfast.ops.ppo_loss import fused_linear_ppo_sequence_loss
from latentfast.runtime import dist
from latentfast.train.rl.advantages import gae, last_token_rewards, whiten
from .args import PPOArgs
from .common import cli_of, stage_main
from .rl import MiniMindRL, completion_hidden


def decode_prompt_completion(transformer, prompt_ids, prompt_mask, completion_ids, completion_mask):
    """One call of ``transformer`` (a decoder: embeddings, blocks, final norm) over prompt +
    completion, positions from the joined mask; its HF output (``last_hidden_state`` (B, P + C, H))."""
    ids = torch.cat([prompt_ids, completion_ids], 1)
    mask = torch.cat([prompt_mask, completion_mask], 1)
    return run_decoder(None, transformer.get_input_embeddings()(ids), mask, transformer=transformer)


class Critic(nn.Module):
    """MiniMind's ``CriticModel``: a MiniMind decoder + ``value_head`` on ``norm(decoder output)``."""

    def __init__(self, lm):
        super().__init__()
        self.model = unwrap(lm).model
        self.value_head = nn.Linear(self.model.config.hidden_size, 1)

    def forward(self, prompt_ids, prompt_mask, completion_ids, completion_mask):
        """Values (B, C + 1) from the last prompt position on: column t is the state before
        completion token t (what GAE needs, MiniMind's newer ``gather(1, prompt_len - 1 + t)``),
        column ``len`` the state after the response's last token (the note-era value)."""
        out = decode_prompt_completion(self.model, prompt_ids, prompt_mask, completion_ids, completion_mask)
        values = self.value_head(self.model.norm(out.last_hidden_state)).squeeze(-1).float()
        return values[:, prompt_ids.shape[1] - 1:]


class ActorCritic(nn.Module):
    """The module DDP wraps; the old actor rides along frozen, so checkpoints carry it."""

    def __init__(self, lm, critic, old):
        super().__init__()
        self.lm, self.critic, self.old = lm, critic, old

    def forward(self, b: dict):
        x = b["prompt_ids"], b["prompt_mask"], b["completion_ids"], b["completion_mask"]
        h, aux = completion_hidden(self.lm, *x)
        return h, aux, self.critic(*x)


def last_index_values(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) from the critic's (B, C + 1) values: the state after each response's last token
    (MiniMind's note-era value, read at the last non-pad position of prompt + response)."""
    return values.gather(1, mask.ne(0).sum(1)[:, None]).squeeze(1)


def token_values(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, C) from the critic's (B, C + 1) values: the state before each response token, 0 past the end."""
    return values[:, :-1] * mask


class PPO(MiniMindRL):
    stage = "ppo"
    config_class = PPOArgs
    wandb_name = "PPO"
    save_full = True  # the frozen old actor must be in the checkpoint for an exact resume
    # the demo: MiniMind's newer token-level PPO, one update per rollout, the value head started at the
    # mean reward (measured: the note-era default stays flat at this size; the README has the numbers)

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.rollouts, self._plan, self._exp, self._stop, self._head_ready = 0, [], None, False, False
        self.loss_fn = self.cfg.objective()

    # ---------------------------------------------------------------- models
    def policy_module(self):
        critic = Critic(copy.deepcopy(self.lm))  # the same base weights, its own copy
        old = copy.deepcopy(self.lm).requires_grad_(False)
        return ActorCritic(self.lm, critic, old)

    def optimizer_groups(self, module):
        c = self.cfg
        return [dict(params=[p for p in module.lm.parameters() if p.requires_grad], weight_decay=c.weight_decay),
                dict(params=list(module.critic.parameters()), weight_decay=c.weight_decay, lr=c.critic_learning_rate)]

    def before_optimizer_step(self):
        """MiniMind clips actor and critic separately; the loop's clip then sees norms <= grad_clip."""
        c = self.cfg
        if c.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.module.lm.parameters(), c.max_grad_norm)
            torch.nn.utils.clip_grad_norm_(self.module.critic.parameters(), c.max_grad_norm)

    # ---------------------------------------------------------------- data: one rollout per step, or reused (gae)
    def updates_per_rollout(self) -> int:
        c = self.cfg
        if c.ppo_mode == "sequence":
            return 1
        return c.ppo_update_iters * math.ceil(c.per_device_train_batch_size / c.mini_batch_size)

    def items_per_step(self):
        return super().items_per_step() / self.updates_per_rollout()

    def init_value_head(self, rewards: torch.Tensor):
        """``--value_head_init mean_reward``, once, on the first rollout of a fresh run (a resumed
        run has the fitted head in its checkpoint): every value is the rank-averaged mean reward."""
        mean = dist.all_mean({"r": float(rewards.float().mean())}, self.device)["r"]
        head = self.module.critic.value_head
        with torch.no_grad():
            head.weight.zero_()
            head.bias.fill_(mean)
        self._head_ready = True
        self.print(f"--value_head_init mean_reward: value head = {mean:.4f} (the first rollout's mean reward)")

    def advantages(self, b):
        c = self.cfg
        if c.value_head_init == "mean_reward" and self.rollouts == 0 and not self._head_ready:
            self.init_value_head(b["rewards"])
        with torch.no_grad(), self.amp():
            values = self.module.critic(b["prompt_ids"], b["prompt_mask"], b["completion_ids"], b["completion_mask"])
            old_lm = self.module.old if c.ppo_mode == "sequence" else self.module.lm
            h, _ = completion_hidden(old_lm, b["prompt_ids"], b["prompt_mask"], b["completion_ids"],
                                     b["completion_mask"])
            old = lm_head_logps(h, unwrap(old_lm).lm_head.weight, b["completion_ids"], mask=b["completion_mask"])[0]
        mask = b["completion_mask"].float()
        if c.ppo_mode == "sequence":
            return {"advantages": b["rewards"] - last_index_values(values, mask), "old_logps": (old * mask).sum(1)}
        values = token_values(values, mask)
        adv, returns = gae(last_token_rewards(b["rewards"], mask), values, c.gamma, c.lam)
        return {"advantages": whiten(adv, mask), "returns": returns, "old_values": values, "old_logps": old}

    def batches(self, step):
        if self.cfg.ppo_mode == "sequence":
            micro = super().batches(step)
            self.rollouts += 1
            return micro
        return [self.next_minibatch(step) for _ in range(self.cfg.gradient_accumulation_steps)]

    def next_minibatch(self, step):
        c = self.cfg
        if not self._plan or self._stop:
            rows = self.micro_items(self.stream, self.rollouts, 0, c.per_device_train_batch_size)
            b = self.experience(rows, self.rollouts * 64)
            self._exp, self._stop = b, False
            g = torch.Generator().manual_seed(c.seed + self.rollouts)
            B = b["rewards"].numel()
            self._plan = [perm[i:i + c.mini_batch_size] for _ in range(c.ppo_update_iters)
                          for perm in [torch.randperm(B, generator=g)] for i in range(0, B, c.mini_batch_size)]
            self.rollouts += 1
        idx = self._plan.pop(0).to(self.device)
        return {k: (v[idx] if torch.is_tensor(v) and v.dim() >= 1 else v) for k, v in self._exp.items()}

    # ---------------------------------------------------------------- loss
    def loss(self, b):
        c = self.cfg
        h, aux, values = self.model(b)
        W, bias = self.policy.head()
        mask = b["completion_mask"].float()
        if c.ppo_mode == "sequence":
            pg, m = fused_linear_ppo_sequence_loss(h, W, b["completion_ids"], b["completion_mask"], b["advantages"],
                                                   bias, old_logps=b["old_logps"],
                                                   ref_logps=(b["ref_logps"] * mask).sum(1),
                                                   clip_epsilon=c.clip_epsilon, kl_coef=c.kl_coef)
            value_loss = F.mse_loss(last_index_values(values, mask), b["rewards"])
            met = {"policy_loss": m["policy_loss"], "kl_ref": m["kl_ref"], "clip_frac": m["clip_frac"]}
        else:
            pg, m, lp = self.loss_fn(h, W, bias, b["completion_ids"], b["completion_mask"], b["advantages"],
                                     ref=b["ref_logps"], old=b["old_logps"], return_logps=True)
            n = mask.sum().clamp(min=1.0)
            approx_kl = dist.all_mean({"k": float((0.5 * (lp - b["old_logps"]) ** 2 * mask).sum() / n)},
                                      self.device)["k"]
            if approx_kl > c.early_stop_kl:
                self._stop = True  # MiniMind: this and the rollout's remaining updates contribute nothing
            values = token_values(values, mask)
            clipped = torch.clamp(values, b["old_values"] - c.cliprange_value, b["old_values"] + c.cliprange_value)
            value_loss = 0.5 * (torch.max((values - b["returns"]) ** 2, (clipped - b["returns"]) ** 2)
                                * mask).sum() / n
            met = {"approx_kl": approx_kl, "kl_ref": m["kl"], "clip_frac": m["clip_ratio_region"]}
        loss = pg + c.vf_coef * value_loss + aux
        if self._stop and c.ppo_mode == "gae":
            loss = loss * 0.0
        return loss, {**met, "value_loss": value_loss.detach(), "aux": aux.detach(), **self.reward_metrics(b)}

    def step_metrics(self, row):
        c = self.cfg
        if c.ppo_mode == "sequence" and row["step"] % c.update_old_actor_freq == 0:
            self.module.old.load_state_dict(unwrap(self.lm).state_dict())

    def state_dict(self):
        return {**super().state_dict(), "rollouts": self.rollouts}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.rollouts = int(state.get("rollouts", 0))

    def log_line(self, row):
        return (f"step {row['step']}/{self.total} reward:{row.get('reward', 0):.4f} policy:{row.get('policy_loss', 0):.4f} "
                f"value:{row.get('value_loss', 0):.4f} kl_ref:{row.get('kl_ref', 0):.4f} "
                f"len:{row.get('response_len', 0):.1f} lr:{row['lr']:.3e} {row['step_s']:.2f}s/step")


main = stage_main(PPO, __doc__)
cli = cli_of(main)

if __name__ == "__main__":
    cli()
