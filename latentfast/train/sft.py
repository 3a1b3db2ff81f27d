"""Supervised fine-tuning: the trainer (``SFT``) and the demos' warm-up (``warm_up``). Its command
line, flags and defaults are ``sft_config.py`` (``latentfast-sft``; torch-free, so ``--help``
answers at once); ``python -m latentfast.train.sft`` runs the same ``main``.

The whole trainer is the hooks of ``latentfast.train.loop``. The loss is token-weighted
over the step (each micro-batch's mean CE weighs by its share of the step's answer
tokens), so gradient accumulation equals the big batch. The demos of HRPO, CODI and KV
distillation use ``SFT`` as their warm-up (``SFT(cfg, lm=..., tok=...).fit()``, or
``warm_up(...)``), each with its own prompt format through ``encode``.
"""
from __future__ import annotations

import torch
from torch import nn

from latentfast import files
from latentfast.data.qa import encode_answers
from latentfast.data.rows import load_rows
from latentfast.eval.answers import answer_ce, answer_metrics
from latentfast.hf import adapter
from latentfast.models.local import load_causal_lm

from .common import SampleStream
from .loop import Trainer
from .sft_config import SFTConfig, parse_args
from .entry import console_entry


class AnswerCE(nn.Module):
    """The module DDP wraps: ``lm``'s decoder, then ``answer_ce``."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, attention_mask, targets):
        h = adapter.decoder(self.lm)(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return answer_ce(self.lm, h, targets)


class SFT(Trainer):
    """Answer-token CE on ``rows``; ``lm`` / ``tok`` / ``rows`` given (a warm-up) or loaded from the config.
    ``encode(tok, rows, max_length, device)`` -> dict of input_ids / attention_mask / targets
    (default ``encode_answers``: ``Question: ...`` prompts)."""

    name = "sft"

    def __init__(self, cfg: SFTConfig, lm=None, tok=None, rows=None, eval_rows=None, encode=None):
        super().__init__(cfg)
        self.lm, self.tok, self.rows, self.eval_rows = lm, tok, rows, eval_rows
        self.encode = encode or encode_answers

    def setup(self):
        c = self.cfg
        if self.lm is None:
            self.tok, self.lm = load_causal_lm(c.model_name, self.device, dtype=torch.float32, seed=c.seed)
        self.rows = self.rows if self.rows is not None else load_rows(c.train_data, None, c.seed)
        if self.eval_rows is None:
            self.eval_rows = [] if c.eval_data == "none" or not c.eval_size else \
                load_rows(c.eval_data, c.eval_size, c.seed + 10_000)
        self.stream = SampleStream(self.rows, c.seed)

    def build_model(self):
        return AnswerCE(self.lm)

    def num_train_items(self):
        return len(self.rows)

    def batches(self, step):
        n, B = self.cfg.gradient_accumulation_steps, self.cfg.per_device_train_batch_size
        return [self.encode(self.tok, self.micro_items(self.stream, step, m, B), self.cfg.max_length, self.device)
                for m in range(n)]

    def micro_weights(self, micro):
        tokens = [int((b["targets"] != -100).sum()) for b in micro]
        return [t / max(1, sum(tokens)) for t in tokens]

    def loss(self, b):
        loss = self.model(b["input_ids"], b["attention_mask"], b["targets"])
        return loss, {"ce": loss.detach()}

    def evaluate(self, step):
        c = self.cfg
        return answer_metrics(self.lm, self.tok, self.eval_rows, c.max_length, c.max_new_tokens, self.device,
                              self.amp, self.rank, self.world) if self.eval_rows else {}

    def on_train_end(self, result):
        if self.cfg.save_model and self.rank == 0:
            files.save_pretrained(self.out / "model", self.lm, self.tok)
        return result


def warm_up(parent, lm, tok, rows, *, steps: int, lr: float, output_dir, name: str = "sft warm-up", encode=None,
            batch_size: int = 64, warmup_ratio: float = 0.05, max_length: int = 512) -> dict:
    """A demo's supervised warm-up of ``lm`` on ``rows`` with ``SFT`` (no evaluation, no saved
    model); seed, device, bf16 and the non-finite limit come from the ``parent`` config."""
    cfg = SFTConfig(output_dir=str(output_dir), seed=parent.seed, device=parent.device, bf16=parent.bf16, lr=lr,
                    max_steps=steps, warmup_ratio=warmup_ratio, per_device_train_batch_size=batch_size,
                    max_length=max_length, logging_steps=0, save_steps=0, eval_size=0, save_model=False,
                    max_nonfinite_steps=parent.max_nonfinite_steps)
    trainer = SFT(cfg, lm=lm, tok=tok, rows=rows, eval_rows=[], encode=encode)
    trainer.name = name
    return trainer.fit()


def run(cfg: SFTConfig) -> dict:
    """Train a parsed config (``latentfast-sft``: ``latentfast.scripts.train``) and print its result."""
    res = SFT(cfg).fit()
    if res["final"]:
        print(f"[sft] eval CE {res['final']['eval_ce']:.3f}, accuracy {res['final']['eval_accuracy']:.3f}; "
              f"checkpoint {res['checkpoint']}", flush=True)
    return res


def main(argv=None) -> dict:
    """``python -m latentfast.train.sft`` (and torchrun): parse, train."""
    return run(parse_args(argv))


cli = console_entry(main)


__all__ = ["AnswerCE", "SFT", "SFTConfig", "cli", "main", "run", "warm_up"]


if __name__ == "__main__":
    cli()
