"""GRPO for any local Hugging Face causal LM: the trainer (rollout, score, advantages, old /
reference log-probs per generation round, ``GRPOLoss``). What it does, its data, rewards, batching
and TRL GRPOConfig's flags are described once, in ``grpo_config.py`` (the ``--help`` text of
``latentfast-grpo``); ``python -m latentfast.train.rl.grpo`` parses them and trains.
"""
from __future__ import annotations

import time

import torch

from latentfast.ops.lm_head_engine import lm_head_logps

from ..common import SampleStream
from . import advantages as adv_mod
from . import rewards as rw
from .data import check_prompt_rows, load_dataset_rows, render_prompt
from .grpo_config import GRPOConfig, parse_args
from ..entry import console_entry
from .policy import Sampling
from .trainer import RLTrainer


class GRPO(RLTrainer):
    """GRPO (TRL semantics) on the generic RL trainer; subclasses change ``advantages``."""

    name = "grpo"
    estimator = staticmethod(adv_mod.trl_group_zscore)
    token_reference = True  # the loss takes per-token reference log-probs (RLOO puts its KL in the reward)

    def needs_reference(self):
        return self.cfg.beta != 0.0

    def setup(self):
        c = self.cfg
        self.rows = load_dataset_rows(c.dataset_name, c.dataset_train_split)
        check_prompt_rows(self.rows)
        self.stream = SampleStream(self.rows, c.seed)
        self.reward_fns = [rw.resolve(s, self.device) for s in c.reward_funcs]
        self.reward_weights = torch.tensor(c.reward_weights or [1.0] * len(self.reward_fns))
        self.loss_fn = c.objective()
        self.buffer, self.round = [], 0

    def num_train_items(self):
        return len(self.rows) * self.cfg.num_generations * self.cfg.num_iterations

    def state_dict(self):
        return {"round": self.round}

    def load_state_dict(self, state):
        self.round = int(state.get("round", 0))

    # the rest of a generation round outlives a checkpoint (steps_per_generation > accumulation or
    # num_iterations > 1): its completions, advantages and old log-probs are saved with it, so a
    # resumed run trains on exactly what the uninterrupted one would
    def rank_state(self):
        if not self.buffer:
            return None
        tensors = {f"{i}/{k}": v.clone() for i, mb in enumerate(self.buffer)
                   for k, v in mb.items() if torch.is_tensor(v)}
        return tensors, {"stats": [mb["stats"] for mb in self.buffer]}

    def load_rank_state(self, tensors, meta):
        self.buffer = [{"stats": st} for st in meta["stats"]]
        for key, v in tensors.items():
            i, k = key.split("/", 1)
            self.buffer[int(i)][k] = v

    # ---------------------------------------------------------------- hooks
    def rollout(self, rows: list[dict], round_: int) -> dict:
        c, G, dev = self.cfg, self.cfg.num_generations, self.device
        texts = [render_prompt(self.tok, r["prompt"]) for r in rows]
        enc = self.tok(texts, add_special_tokens=True, padding=False)["input_ids"]
        if c.max_prompt_length:
            enc = [ids[-c.max_prompt_length:] for ids in enc]
        P = max(len(x) for x in enc)
        pad = self.policy.pad
        ids = torch.tensor([[pad] * (P - len(x)) + x for x in enc], device=dev).repeat_interleave(G, 0)
        mask = torch.tensor([[0] * (P - len(x)) + [1] * len(x) for x in enc], device=dev).repeat_interleave(G, 0)
        gen = torch.Generator(device=dev).manual_seed(c.seed * 1_000_003 + round_ * self.world + self.rank)
        sampling = Sampling(c.max_completion_length, c.temperature, c.top_p, c.top_k)
        with self.amp():
            ro = self.policy.rollout(ids, mask, sampling, generator=gen)
        b = dict(prompt_ids=ids, prompt_mask=mask, completion_ids=ro.completion_ids,
                 completion_mask=ro.completion_mask, prompts=[t for t in texts for _ in range(G)],
                 rows=[r for r in rows for _ in range(G)])
        b["truncated"] = self.policy.truncated(ro)
        return b

    def score(self, b: dict) -> torch.Tensor:
        ids = b["completion_ids"].masked_fill(b["completion_mask"] == 0, self.policy.pad)
        completions = self.tok.batch_decode(ids.tolist(), skip_special_tokens=True)
        keys = [k for k in b["rows"][0] if k != "prompt"]
        columns = {k: [r.get(k) for r in b["rows"]] for k in keys}
        cids = [row[m.bool()].tolist() for row, m in zip(b["completion_ids"].cpu(), b["completion_mask"].cpu())]
        per_fn = rw.score(self.reward_fns, b["prompts"], completions, cids, columns)
        b["completions"], b["rewards_per_func"] = completions, per_fn
        w = self.reward_weights
        rewards = (per_fn * w).nansum(1)
        return rewards.masked_fill(per_fn.isnan().all(1), float("nan")).to(self.device)

    def advantages(self, b: dict) -> torch.Tensor:
        return self.estimator(b["rewards"], self.cfg.num_generations, self.cfg.scale_rewards)

    def generation_round(self) -> list[dict]:
        """One round: rollout -> score -> advantages -> old / reference log-probs, cut into
        ``steps_per_generation`` micro-batches, repeated ``num_iterations`` times."""
        c = self.cfg
        spg, B = c.generation_steps, c.per_device_train_batch_size
        n_prompts = B * spg // c.num_generations
        base = (self.round * self.world + self.rank) * n_prompts
        rows = [self.stream[base + i] for i in range(n_prompts)]
        b = self.rollout(rows, self.round)
        self.round += 1
        b["rewards"] = self.score(b)
        b["advantages"] = self.advantages(b)
        mask = b["completion_mask"]
        if c.mask_truncated_completions:
            mask = mask * (~b["truncated"]).long()[:, None]
        off_policy = c.num_iterations > 1 or spg > c.gradient_accumulation_steps
        stats = self.rollout_stats(b)
        micro = []
        for k in range(spg):
            sl = slice(k * B, (k + 1) * B)
            mb = {key: b[key][sl] for key in ("prompt_ids", "prompt_mask", "completion_ids", "advantages")}
            mb["completion_mask"], mb["stats"] = mask[sl], stats
            with torch.no_grad():
                W, bias = self.policy.head()
                if off_policy:
                    with self.amp():
                        h, _ = self.model(mb)
                    mb["old"] = lm_head_logps(h, W, mb["completion_ids"], bias, c.temperature, mb["completion_mask"])[0]
                if self.needs_reference() and self.token_reference:  # through the reference's own head
                    mb["ref"] = self.reference_logps(mb, c.temperature)
            micro.append(mb)
        return micro * c.num_iterations

    def rollout_stats(self, b) -> dict:
        r, lens = b["rewards"], b["completion_mask"].sum(1).float()
        out = {"reward": float(torch.nanmean(r)), "reward_std": float(r[~r.isnan()].std()) if r.numel() > 1 else 0.0,
               "completions/mean_length": float(lens.mean()),
               "completions/clipped_ratio": float(b["truncated"].float().mean())}
        for f, col in zip(self.cfg.reward_funcs, b["rewards_per_func"].T):
            out[f"rewards/{f.split(':')[-1].rstrip('/').split('/')[-1]}/mean"] = float(torch.nanmean(col))
        return out

    def batches(self, step):
        n = self.cfg.gradient_accumulation_steps
        t0 = time.perf_counter()
        while len(self.buffer) < n:
            self.buffer.extend(self.generation_round())
        self.t_rollout = time.perf_counter() - t0  # rollout, rewards, old / reference log-probs
        micro, self.buffer = self.buffer[:n], self.buffer[n:]
        if self.loss_fn.token_normalised:
            self.count_completion_tokens(micro)
        return micro

    def step_metrics(self, row):
        row["rollout_s"] = self.t_rollout
        row["train_s"] = row["step_s"] - self.t_rollout

    def micro_weights(self, micro):  # token-normalised losses are parts of one token mean
        return [1.0] * len(micro) if self.loss_fn.token_normalised else [1.0 / len(micro)] * len(micro)

    def loss(self, mb):
        h, aux = self.model(mb)
        W, bias = self.policy.head()
        loss, m = self.loss_fn(h, W, bias, mb["completion_ids"], mb["completion_mask"], mb["advantages"],
                               ref=mb.get("ref"), old=mb.get("old"), num_items_in_batch=mb.get("num_items"))
        return loss + aux, {**mb["stats"], **m}

    def log_line(self, row):
        return (f"Step {row['step']}: loss={row['loss']:.4f} reward={row.get('reward', 0):.3f} "
                f"kl={row.get('kl', 0):.4f} len={row.get('completions/mean_length', 0):.1f} lr={row['lr']:.2e} "
                f"{row['step_s']:.1f}s")

    def progress(self, row):
        return {"reward": f"{row.get('reward', 0):.3f}", "loss": f"{row['loss']:.3f}"}


def run(cfg: GRPOConfig) -> dict:
    """Train a parsed config (``latentfast-grpo``: ``latentfast.scripts.train``)."""
    return GRPO(cfg).fit()


def main(argv=None) -> dict:
    """``python -m latentfast.train.rl.grpo`` (and torchrun): parse, train."""
    return run(parse_args(argv))


cli = console_entry(main)


__all__ = ["GRPO", "GRPOConfig", "cli", "main", "run"]

if __name__ == "__main__":
    cli()
