"""A tiny regression trainer on the one loop, for the fault tests (importable from a
subprocess: ``python tests/toy_trainer.py '<json config>' [kill-at-file]``)."""
from __future__ import annotations

import json
import os
import pathlib
import signal
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from latentfast.train import resume
from latentfast.train.common import SampleStream
from latentfast.train.config import option
from latentfast.train.loop import TrainConfig, Trainer


@dataclass
class ToyConfig(TrainConfig):
    width: int = option(16, "hidden width (the model shape)")
    dropout: float = option(0.0, "dropout (exercises the RNG on resume)")
    stop_at: int = option(0, "raise after this step (a crash)")


class Crash(RuntimeError):
    pass


class Toy(Trainer):
    name = "toy"
    resume_fields = (*resume.RUN_DEFINING, "width")  # a trainer adds its own run-defining flags

    def setup(self):
        g = torch.Generator().manual_seed(123)
        x = torch.randn(96, 5, generator=g)
        y = x @ torch.randn(5, 1, generator=g) + 0.1 * torch.randn(96, 1, generator=g)
        self.stream = SampleStream(list(zip(x, y)), self.cfg.seed)
        self.seen = []  # stream indices read, in order

    def build_model(self):
        return nn.Sequential(nn.Linear(5, self.cfg.width), nn.Tanh(), nn.Dropout(self.cfg.dropout),
                             nn.Linear(self.cfg.width, 1))

    def num_train_items(self):
        return 96

    def batches(self, step):
        B = self.cfg.per_device_train_batch_size
        out = []
        for m in range(self.cfg.gradient_accumulation_steps):
            start = self.micro_start(step, m, B)
            self.seen.extend(range(start, start + B))
            items = self.micro_items(self.stream, step, m, B)
            out.append((torch.stack([a for a, _ in items]), torch.stack([b for _, b in items])))
        return out

    def loss(self, batch):
        x, y = batch
        loss = F.mse_loss(self.model(x), y)
        return loss, {"mse": loss.detach()}

    def step_metrics(self, row):
        if self.cfg.stop_at and row["step"] == self.cfg.stop_at:
            raise Crash(row["step"])


BASE = dict(max_steps=6, lr=0.05, warmup_ratio=0.2, save_steps=2, logging_steps=0, per_device_train_batch_size=8,
            device="cpu")


def toy(out, **kw) -> Toy:
    return Toy(ToyConfig(**{**BASE, "output_dir": str(out), **kw}))


def weights(run_dir, step) -> dict:
    return load_file(str(pathlib.Path(run_dir) / f"checkpoint-{step}" / "model.safetensors"))


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


if __name__ == "__main__":  # the subprocess of a kill test: SIGKILL itself when it starts writing `kill_at`
    cfg = json.loads(sys.argv[1])
    if len(sys.argv) > 2:
        from latentfast import files

        kill_at = sys.argv[2]  # e.g. "checkpoint-6/trainer_state.json"
        real = files.atomic_write

        def atomic_write(path, write):
            if str(path).endswith(kill_at):
                write(files.tmp_name(pathlib.Path(path)))  # the temporary is written, the rename never happens
                os.kill(os.getpid(), signal.SIGKILL)
            return real(path, write)

        files.atomic_write = atomic_write
    torch.set_num_threads(1)
    toy(**cfg).fit()
