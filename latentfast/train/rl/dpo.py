"""DPO for any local Hugging Face causal LM: the trainer (chosen / rejected log-probs from the
policy's hidden states, the reference's per batch or precomputed, ``DPOLoss``). What it does, its
data and TRL DPOConfig's flags are described once, in ``dpo_config.py`` (the ``--help`` text of
``latentfast-dpo``); ``python -m latentfast.train.rl.dpo`` parses them and trains.
"""
from __future__ import annotations

import torch

from ..common import SampleStream
from .data import load_dataset_rows, preference_texts
from .dpo_config import DPOConfig, parse_args
from ..entry import console_entry
from .objectives import sequence_logps
from .trainer import RLTrainer


class DPO(RLTrainer):
    name = "dpo"

    def setup(self):
        c = self.cfg
        self.rows = load_dataset_rows(c.dataset_name, c.dataset_train_split)
        if not self.rows:
            raise ValueError(f"--dataset_name {c.dataset_name}: no rows")
        self.stream = SampleStream(list(range(len(self.rows))), c.seed)
        self.loss_fn = c.objective()
        self.ref_cache = None

    def num_train_items(self):
        return len(self.rows)

    def encode(self, idx: list[int]) -> dict:
        """Pairs -> chosen rows then rejected rows: prompts left-padded, responses right-padded."""
        c, tok, pad = self.cfg, self.tok, self.policy.pad
        prompts, resp = [], []
        for which in (1, 2):
            for i in idx:
                texts = preference_texts(tok, self.rows[i])
                p = tok(texts[0], add_special_tokens=True)["input_ids"]
                r = tok(texts[which], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
                if c.max_prompt_length:
                    p = p[-c.max_prompt_length:]
                if c.max_length:
                    r = r[:max(1, c.max_length - len(p))]
                prompts.append(p)
                resp.append(r)
        P, C = max(map(len, prompts)), max(map(len, resp))
        dev = self.device
        t = lambda rows: torch.tensor(rows, device=dev)  # noqa: E731
        return dict(prompt_ids=t([[pad] * (P - len(p)) + p for p in prompts]),
                    prompt_mask=t([[0] * (P - len(p)) + [1] * len(p) for p in prompts]),
                    completion_ids=t([r + [pad] * (C - len(r)) for r in resp]),
                    completion_mask=t([[1] * len(r) + [0] * (C - len(r)) for r in resp]), index=idx)

    @torch.no_grad()
    def reference_logps(self, b: dict) -> torch.Tensor:
        h = self.reference_hidden(b)
        W, bias = self.policy.reference_head()  # a frozen copy's own head (the policy's moves in training)
        return sequence_logps(h, W, bias, b["completion_ids"], b["completion_mask"])

    def precompute(self):
        B, cache = self.cfg.per_device_train_batch_size, {}
        for s in range(0, len(self.rows), B):
            idx = list(range(s, min(s + B, len(self.rows))))
            lp = self.reference_logps(self.encode(idx)).cpu()
            for k, i in enumerate(idx):
                cache[i] = (lp[k], lp[len(idx) + k])
        self.print(f"reference log-probs of {len(cache)} pairs precomputed")
        return cache

    def batches(self, step):
        c = self.cfg
        if c.precompute_ref_log_probs and self.ref_cache is None:
            self.ref_cache = self.precompute()
        out = []
        for m in range(c.gradient_accumulation_steps):
            b = self.encode(self.micro_items(self.stream, step, m, c.per_device_train_batch_size))
            if self.ref_cache is not None:
                lp = torch.stack([torch.stack(self.ref_cache[i]) for i in b["index"]]).to(self.device)  # (B, 2)
                b["ref_chosen"], b["ref_rejected"] = lp[:, 0], lp[:, 1]
            else:
                lp = self.reference_logps(b)
                half = lp.shape[0] // 2
                b["ref_chosen"], b["ref_rejected"] = lp[:half], lp[half:]
            out.append(b)
        return out

    def loss(self, b):
        h, aux = self.model(b)
        W, bias = self.policy.head()
        target = b["completion_ids"].masked_fill(b["completion_mask"] == 0, -100)
        loss, m = self.loss_fn(h, W, bias, target, b["ref_chosen"], b["ref_rejected"])
        return loss + aux, m

    def log_line(self, row):
        return (f"Step {row['step']}: loss={row['loss']:.4f} margin={row.get('rewards/margins', 0):.4f} "
                f"acc={row.get('rewards/accuracies', 0):.2f} lr={row['lr']:.2e} {row['step_s']:.1f}s")


def run(cfg: DPOConfig) -> dict:
    """Train a parsed config (``latentfast-dpo``: ``latentfast.scripts.train``)."""
    return DPO(cfg).fit()


def main(argv=None) -> dict:
    """``python -m latentfast.train.rl.dpo`` (and torchrun): parse, train."""
    return run(parse_args(argv))


cli = console_entry(main)


__all__ = ["DPO", "DPOConfig", "cli", "main", "run"]

if __name__ == "__main__":
    cli()
