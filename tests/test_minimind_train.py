"""The MiniMind trainers (latentfast.train.minimind): MiniMind's flags and defaults, its lr
formula, checkpoint names and --from_weight chaining, each stage's loss falls on a tiny
config, --from_resume 1 reproduces the uninterrupted run, 2-process gloo DDP stays in sync."""
import json
import math
import os
import pathlib
import re

import pytest
import torch

from latentfast.models.minimind import load_pth
from latentfast.train.minimind import cli as mm_cli
from latentfast.train.minimind import common
from latentfast.train.minimind.full_sft import FullSFT, FullSFTArgs
from latentfast.train.minimind.pretrain import Pretrain, PretrainArgs


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _native_cpu_path(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the engine's CPU path (its kernels have their own tests)


TINY = dict(hidden_size=32, num_hidden_layers=1, max_seq_len=48, batch_size=4, accumulation_steps=1,
            log_interval=0, save_interval=0, max_steps=6, dtype="float32", device="cpu", data_path="demo")


def _cfg(cls, tmp_path, name="run", **kw):
    return cls.from_dict({**TINY, "lr": 2e-2, "save_dir": str(tmp_path / name / "out"), **kw})


def _losses(res):
    return [r["loss"] for r in res["history"]]


def _bare(trainer):
    """The state fit() gives the hooks, without running the loop."""
    trainer.device, trainer.rank, trainer.world = torch.device("cpu"), 0, 1
    trainer.setup()
    return trainer


# ----------------------------------------------------------------------------- flags
def test_minimind_flags_defaults_and_aliases():
    p = PretrainArgs.parse([])
    assert (p.save_dir, p.save_weight, p.epochs, p.batch_size, p.learning_rate, p.accumulation_steps, p.grad_clip,
            p.log_interval, p.save_interval, p.hidden_size, p.num_hidden_layers, p.max_seq_len, p.use_moe,
            p.from_weight, p.from_resume, p.use_wandb, p.dtype, p.num_workers) == (
        "../out", "pretrain", 1.0, 32, 5e-4, 8, 1.0, 100, 1000, 512, 8, 340, 0, "none", 0, False, "bfloat16", 8)
    assert p.data_path == "../dataset/pretrain_hq.jsonl" and p.wandb_project == "MiniMind-Pretrain"
    s = FullSFTArgs.parse([])
    assert (s.save_weight, s.from_weight, s.epochs, s.batch_size, s.lr, s.accumulation_steps, s.data_path) == (
        "full_sft", "pretrain", 2.0, 16, 1e-6, 1, "../dataset/sft_mini_512.jsonl")
    cfg = PretrainArgs.parse(["--hidden_size", "640", "--num_hidden_layers", "12", "--use_moe", "1",
                              "--headwise_attn_output_gate", "1", "--use_wandb", "--epochs", "2",
                              "--accumulation_steps", "4", "--grad_clip", "0.5", "--from_resume", "1"])
    assert cfg.use_moe == 1 and cfg.use_wandb and cfg.num_train_epochs == 2 and cfg.gradient_accumulation_steps == 4
    assert cfg.max_grad_norm == 0.5 and cfg.stem == "pretrain_640_moe"
    t = Pretrain(cfg)  # MiniMind's --from_resume / --dtype / checkpoint folder mapped onto the loop's fields
    assert t.cfg.resume_from_checkpoint == "latest"
    assert pathlib.Path(t.cfg.output_dir) == pathlib.Path("../checkpoints/pretrain_640_moe")
    mc = common.model_config(cfg)
    assert mc.hidden_size == 640 and mc.use_moe and mc.headwise_attn_output_gate


def test_lr_is_minimind_formula(tmp_path):
    res = Pretrain(_cfg(PretrainArgs, tmp_path, max_steps=5, lr=1e-3)).fit()
    lrs = [r["lr"] for r in res["history"]]  # lr after each optimizer step s = 1..5
    want = [1e-3 * (0.1 + 0.45 * (1 + math.cos(math.pi * s / 5))) for s in range(1, 6)]
    assert lrs == pytest.approx(want, rel=1e-9)


# ----------------------------------------------------------------------------- stages learn
def test_pretrain_loss_falls_and_writes_minimind_weights(tmp_path):
    res = Pretrain(_cfg(PretrainArgs, tmp_path, max_steps=12)).fit()
    loss = _losses(res)
    assert sum(loss[-2:]) / 2 < sum(loss[:2]) / 2 - 0.3, loss
    path = tmp_path / "run" / "out" / "pretrain_32.pth"
    assert res["weights"] == str(path) and path.is_file()
    sd = torch.load(path, weights_only=True)
    assert sd["model.layers.0.self_attn.q_proj.weight"].dtype == torch.float16  # MiniMind's fp16 .pth
    assert (tmp_path / "run" / "checkpoints" / "pretrain_32" / "metrics.jsonl").is_file()


def test_full_sft_chains_from_pretrain_and_its_loss_falls(tmp_path):
    Pretrain(_cfg(PretrainArgs, tmp_path, max_steps=2)).fit()
    cfg = _cfg(FullSFTArgs, tmp_path, max_steps=12, max_seq_len=128)
    trainer = _bare(FullSFT(cfg))
    lm = trainer.init_lm(cfg.from_weight)  # {save_dir}/pretrain_32.pth
    ref = _bare(FullSFT(cfg)).new_lm()
    load_pth(ref, tmp_path / "run" / "out" / "pretrain_32.pth")
    assert all(torch.equal(a, b) for a, b in zip(lm.state_dict().values(), ref.state_dict().values()))
    res = FullSFT(cfg).fit()
    loss = _losses(res)
    assert sum(loss[-2:]) / 2 < sum(loss[:2]) / 2 - 0.3, loss
    assert (tmp_path / "run" / "out" / "full_sft_32.pth").is_file()


def test_missing_from_weight_is_an_error_naming_the_file(tmp_path, capsys):
    cfg = _cfg(FullSFTArgs, tmp_path, from_weight="pretrain")
    with pytest.raises(FileNotFoundError, match=r"pretrain_32\.pth"):
        _bare(FullSFT(cfg)).init_lm(cfg.from_weight)
    data = tmp_path / "sft.jsonl"
    data.write_text(json.dumps({"conversations": [{"role": "user", "content": "hi"},
                                                  {"role": "assistant", "content": "hello"}]}) + "\n")
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:  # an argparse error (exit 2) before anything is built
        mm_cli.main(["full_sft", "--data_path", str(data), "--save_dir", str(tmp_path / "w"), "--hidden_size", "64",
                     "--use_moe", "1"])
    assert e.value.code == 2
    assert re.search(r"--from_weight pretrain: no such file .*pretrain_64_moe\.pth", capsys.readouterr().err)


def test_demo_missing_weight_is_one_line_and_a_warmup(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(common, "WARMUP_STEPS", 2)
    monkeypatch.setattr(common.warmup_lm, "__defaults__", (2,))
    cfg = _cfg(FullSFTArgs, tmp_path, max_steps=2)
    res = FullSFT(cfg, demo=True).fit()
    out = capsys.readouterr()
    lines = [line for line in (out.out + out.err).splitlines() if "no " in line and "pretrain_32.pth" in line]
    assert len(lines) == 1 and "warm-up" in lines[0]
    assert len(res["history"]) == 2


def test_checkpoint_names():
    assert common.weight_path("full_sft", "out", 512, 0) == pathlib.Path("out/full_sft_512.pth")
    assert common.weight_path("pretrain", "../out", 640, 1) == pathlib.Path("../out/pretrain_640_moe.pth")
    assert common.weight_path("/x/y.pth", "out", 640, 1) == pathlib.Path("/x/y.pth")


# ----------------------------------------------------------------------------- resume
class _Crash(RuntimeError):
    pass


class _CrashingPretrain(Pretrain):
    def step_metrics(self, row):
        if row["step"] == 5:
            raise _Crash()


def test_from_resume_reproduces_the_uninterrupted_run(tmp_path):
    kw = dict(max_steps=6, save_interval=3, use_moe=1)
    full = Pretrain(_cfg(PretrainArgs, tmp_path, "full", **kw)).fit()
    with pytest.raises(_Crash):
        _CrashingPretrain(_cfg(PretrainArgs, tmp_path, "part", **kw)).fit()
    torch.manual_seed(1234)
    res = Pretrain(_cfg(PretrainArgs, tmp_path, "part", from_resume=1, **kw)).fit()
    assert [r["step"] for r in res["history"]] == [4, 5, 6]
    assert _losses(res) == _losses(full)[3:]
    a = torch.load(tmp_path / "full" / "out" / "pretrain_32_moe.pth", weights_only=True)
    b = torch.load(tmp_path / "part" / "out" / "pretrain_32_moe.pth", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_use_wandb_without_wandb_never_fails(tmp_path, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_wandb(name, *a, **k):
        if name == "wandb":
            raise ImportError("no wandb")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    res = Pretrain(_cfg(PretrainArgs, tmp_path, max_steps=1, use_wandb=True)).fit()
    assert len(res["history"]) == 1


# ----------------------------------------------------------------------------- DDP

def _ddp_worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    tr = Pretrain(PretrainArgs.from_dict({**TINY, "lr": 3e-3, "save_dir": str(pathlib.Path(out) / "out"), "max_steps": 3,
                                  "use_moe": 1, "batch_size": 2, "accumulation_steps": 2}))
    res = tr.fit()
    sums = {k: float(v.double().sum()) for k, v in tr.lm.state_dict().items()}
    pathlib.Path(out, f"rank{rank}.json").write_text(json.dumps({"loss": _losses(res), "params": sums}))


def test_two_process_gloo_ddp_moe_stays_in_sync(tmp_path, two_ranks):
    two_ranks(_ddp_worker, str(tmp_path))
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert r0 == r1  # same all-reduced metrics, same weights on both ranks
    saved = torch.load(tmp_path / "out" / "pretrain_32_moe.pth", weights_only=True)
    assert saved["model.layers.0.mlp.gate.weight"].shape == (4, 32)


def test_cli_lists_stages_and_answers_help(capsys):
    with pytest.raises(SystemExit) as e:
        mm_cli.main(["pretrain", "--help"])
    assert e.value.code == 0 and "--from_weight" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        mm_cli.main(["--help"])
    assert e.value.code == 0 and "distill_reason" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        mm_cli.main(["nope"])
    assert e.value.code == 2 and "full_sft" in capsys.readouterr().err
