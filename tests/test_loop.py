"""The training loop itself (latentfast.train.loop) and the typed configs: accumulation equals
the big batch, resume after an interruption is bit-exact on CPU, 2-process gloo DDP stays in
sync (and equals the single-process big batch), the non-finite guard, SFT on the loop."""
import json
import os
import pathlib
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from latentfast.runtime.guard import NonFiniteTrainingError
from latentfast.train import demos, sft
from latentfast.train.common import SampleStream
from latentfast.train.config import option
from latentfast.train.loop import TrainConfig, Trainer


pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass
class ToyConfig(TrainConfig):
    dropout: float = option(0.0, "dropout between the layers (exercises the RNG on resume)")
    nan_steps: list[int] = option([], "steps whose loss is NaN")
    stop_at: int = option(0, "raise after this step (a crash)")


class Crash(RuntimeError):
    pass


class Toy(Trainer):
    """Regression on a fixed random data set: small enough to compare runs exactly."""

    name = "toy"

    def setup(self):
        g = torch.Generator().manual_seed(123)
        x = torch.randn(96, 5, generator=g)
        y = x @ torch.randn(5, 1, generator=g) + 0.1 * torch.randn(96, 1, generator=g)
        self.stream = SampleStream(list(zip(x, y)), self.cfg.seed)

    def build_model(self):
        return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Dropout(self.cfg.dropout), nn.Linear(16, 1))

    def num_train_items(self):
        return 96

    def batches(self, step):
        B = self.cfg.per_device_train_batch_size
        out = []
        for m in range(self.cfg.gradient_accumulation_steps):
            items = self.micro_items(self.stream, step, m, B)
            out.append((torch.stack([a for a, _ in items]), torch.stack([b for _, b in items])))
        return out

    def loss(self, batch):
        x, y = batch
        loss = F.mse_loss(self.model(x), y)
        if self.step + 1 in self.cfg.nan_steps:
            loss = loss * float("nan")
        return loss, {"mse": loss.detach()}

    def step_metrics(self, row):
        if self.cfg.stop_at and row["step"] == self.cfg.stop_at:
            raise Crash(row["step"])


def _toy(tmp_path, name, **kw):
    base = dict(output_dir=str(tmp_path / name), max_steps=6, lr=0.05, warmup_ratio=0.2, save_steps=0,
                logging_steps=0, per_device_train_batch_size=8, device="cpu")
    base.update(kw)
    return Toy(ToyConfig(**base))


def _weights(run_dir, step):
    return load_file(str(pathlib.Path(run_dir) / f"checkpoint-{step}" / "model.safetensors"))


def test_accumulation_equals_the_big_batch(tmp_path):
    big = _toy(tmp_path, "big", per_device_train_batch_size=8).fit()
    acc = _toy(tmp_path, "acc", per_device_train_batch_size=2, gradient_accumulation_steps=4).fit()
    a, b = _weights(tmp_path / "big", 6), _weights(tmp_path / "acc", 6)
    for k in a:  # fp32: summation order only
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    assert [r["loss"] for r in big["history"]] == pytest.approx([r["loss"] for r in acc["history"]], rel=1e-5)


def test_resume_after_a_crash_is_bit_exact(tmp_path):
    kw = dict(dropout=0.3, save_steps=2)
    _toy(tmp_path, "full", **kw).fit()
    with pytest.raises(Crash):
        _toy(tmp_path, "part", stop_at=5, **kw).fit()  # checkpoint-4 written, then the crash in step 5
    assert not (tmp_path / "part" / "checkpoint-6").exists()
    torch.manual_seed(999)  # a fresh process: the RNG state must come from the checkpoint
    res = _toy(tmp_path, "part", resume_from_checkpoint="latest", **kw).fit()
    assert [r["step"] for r in res["history"]] == [5, 6]
    a, b = _weights(tmp_path / "full", 6), _weights(tmp_path / "part", 6)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    state = json.loads((tmp_path / "part" / "checkpoint-6" / "trainer_state.json").read_text())
    assert ToyConfig.from_dict(state["extra"]["config"]).dropout == 0.3  # the config travels with it


def test_bad_resume_path_names_the_argument(tmp_path):
    with pytest.raises(FileNotFoundError, match="--resume_from_checkpoint"):
        _toy(tmp_path, "x", resume_from_checkpoint=str(tmp_path / "nope")).fit()


def test_nonfinite_steps_are_skipped_then_stop_the_run(tmp_path):
    clean = _toy(tmp_path, "clean", max_steps=3, save_steps=1).fit()
    with pytest.warns(RuntimeWarning, match="non-finite"):
        res = _toy(tmp_path, "nan", max_steps=3, save_steps=1, nan_steps=[2]).fit()
    assert [r["skipped_nonfinite"] for r in res["history"]] == [0, 1, 1]
    w1, w2 = _weights(tmp_path / "nan", 1), _weights(tmp_path / "nan", 2)
    assert all(torch.equal(w1[k], w2[k]) for k in w1)  # the NaN step changed nothing
    assert res["history"][1]["lr"] == clean["history"][0]["lr"]  # ... not even the schedule
    assert all(torch.isfinite(v).all() for v in _weights(tmp_path / "nan", 3).values())
    with pytest.raises(NonFiniteTrainingError, match="consecutive"), pytest.warns(RuntimeWarning):
        _toy(tmp_path, "stop", max_steps=6, nan_steps=[2, 3, 4], max_nonfinite_steps=3).fit()



def _ddp_worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    trainer = Toy(ToyConfig(output_dir=str(pathlib.Path(out) / "ddp"), max_steps=4, lr=0.05, save_steps=0,
                            logging_steps=0, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                            device="cpu"))
    res = trainer.fit()
    pathlib.Path(out, f"rank{rank}.json").write_text(json.dumps([r["loss"] for r in res["history"]]))


def test_two_process_gloo_ddp_stays_in_sync_and_equals_the_big_batch(tmp_path, two_ranks):
    two_ranks(_ddp_worker, str(tmp_path))
    l0 = json.loads((tmp_path / "rank0.json").read_text())
    l1 = json.loads((tmp_path / "rank1.json").read_text())
    assert l0 == l1  # metrics are all-reduced
    ddp = _weights(tmp_path / "ddp", 4)
    _toy(tmp_path, "single", max_steps=4, per_device_train_batch_size=8, gradient_accumulation_steps=2,
         warmup_ratio=0.03).fit()
    single = _weights(tmp_path / "single", 4)
    for k in ddp:  # rank r reads slice r of each micro-batch: world 2 x 4 == one process x 8
        torch.testing.assert_close(ddp[k], single[k], rtol=1e-5, atol=1e-6, msg=k)


# ----------------------------------------------------------------------------- configs
def test_config_cli_aliases_presets_and_validation(capsys):
    cfg = sft.SFTConfig.parse(["--learning_rate", "1e-3", "--batch_size", "4", "--no-save_model"])
    assert cfg.lr == 1e-3 and cfg.learning_rate == 1e-3 and cfg.per_device_train_batch_size == 4
    assert not cfg.save_model and cfg.explicit == {"lr", "per_device_train_batch_size", "save_model"}
    demo = cfg.with_preset(demos.SFT)
    assert demo.lr == 1e-3 and demo.per_device_train_batch_size == 4  # typed: kept
    assert demo.max_steps == demos.SFT["max_steps"]  # not typed: the preset's
    assert sft.SFTConfig.from_dict(demo.to_dict()) == demo
    with pytest.raises(SystemExit):
        sft.SFTConfig.parse(["--gradient_accumulation_steps", "0"])
    assert "--gradient_accumulation_steps: expected an integer >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sft.SFTConfig.parse(["--lr_scheduler_type", "exp"])


# ----------------------------------------------------------------------------- SFT on the loop
def _sft(tmp_path, name, tok, dropout=0.2, **kw):
    from latentfast.data import make_arithmetic
    from latentfast.models import build_tiny_causal_lm

    lm = build_tiny_causal_lm(tok, seed=0, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                              num_key_value_heads=1, intermediate_size=64, attention_dropout=dropout)
    base = dict(output_dir=str(tmp_path / name), max_steps=4, lr=3e-3, save_steps=0, logging_steps=0,
                per_device_train_batch_size=4, device="cpu", eval_size=0, save_model=False, max_length=64)
    base.update(kw)
    return sft.SFT(sft.SFTConfig(**base), lm=lm, tok=tok, rows=make_arithmetic(64, seed=1))


def test_sft_token_weighted_accumulation_and_exact_resume(tmp_path):
    from latentfast.data import build_tokenizer

    tok = build_tokenizer()
    big = _sft(tmp_path, "big", tok, dropout=0.0).fit()
    acc = _sft(tmp_path, "acc", tok, dropout=0.0, per_device_train_batch_size=1, gradient_accumulation_steps=4).fit()
    assert big["history"][-1]["loss"] < big["history"][0]["loss"]
    # rows differ in length: token weights make 4 x 1 the same step as 1 x 4 (fp32, rtol 1e-4)
    assert [r["loss"] for r in big["history"]] == pytest.approx([r["loss"] for r in acc["history"]], rel=1e-4)
    a, b = _weights(tmp_path / "big", 4), _weights(tmp_path / "acc", 4)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    # attention dropout on: resume from step 2 reproduces the run bit for bit
    _sft(tmp_path, "full", tok, save_steps=2).fit()
    torch.manual_seed(999)
    _sft(tmp_path, "resumed", tok, resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2")).fit()
    a, b = _weights(tmp_path / "full", 4), _weights(tmp_path / "resumed", 4)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_minimind_schedules_follow_minimind_and_take_a_warmup_when_asked():
    import math

    from latentfast.train.common import warmup_schedule

    def lrs(kind, ratio, total=20):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        sched, out = warmup_schedule(opt, total, ratio, kind), []
        for _ in range(total):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out

    plain = lrs("minimind", 0.0)
    assert plain == pytest.approx([0.1 + 0.45 * (1 + math.cos(math.pi * s / 20)) for s in range(20)])
    rl = lrs("minimind_rl", 0.0)
    assert rl[0] == pytest.approx(1.0) and rl[10] == pytest.approx(0.55)  # lr -> lr / 10, CosineAnnealingLR
    warm = lrs("minimind", 0.2)  # 4 warm-up steps: ramped, then MiniMind's curve
    assert warm[:4] == pytest.approx([plain[s] * (s + 1) / 4 for s in range(4)]) and warm[4:] == pytest.approx(plain[4:])
