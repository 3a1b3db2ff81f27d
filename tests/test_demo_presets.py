"""Demo presets: the no-argument run is the short one (<= 5 min on a 2-core CPU), ``--full``
the longer one (its values win over the short preset, typed flags win over both), and
``--full`` outside a demo is an argparse error naming the flag (parsing only: nothing trains)."""
import importlib

import pytest

from latentfast.train import codi, demos, hrpo, sft
from latentfast.train.kv_distill import demo as kv_demo
from latentfast.train.minimind import common as mm_common
from latentfast.train.minimind.cli import STAGES

kv_cli = importlib.import_module("latentfast.train.kv_distill.cli")  # (the package exports a cli() of that name)


def _stage_class(name):
    mod = importlib.import_module(f"latentfast.train.minimind.{STAGES[name]}")
    return next(v for v in vars(mod).values() if isinstance(v, type) and issubclass(v, mm_common.MiniMindTrainer)
                and v.__module__ == mod.__name__ and v.stage == name)


def _values(cfg, preset):
    return {k: getattr(cfg, k) for k in preset}


@pytest.mark.parametrize("parse, short, full", [
    (hrpo.parse_args, demos.HRPO, demos.HRPO_FULL),
    (codi.parse_args, demos.CODI, demos.CODI_FULL),
    (kv_cli.parse_args, kv_demo.DEMO_PRESET, kv_demo.FULL_PRESET),
    (lambda a: kv_cli.parse_args(["--multi_teacher_demo", *a]), kv_demo.MT_DEMO_PRESET, kv_demo.MT_FULL_PRESET),
])
def test_full_is_the_longer_preset_and_typed_flags_win(parse, short, full):
    assert full, "a demo's --full preset must change something"
    cfg = parse([])
    assert _values(cfg, short) == {k: v for k, v in short.items()}
    long = parse(["--full"])
    assert long.full and _values(long, full) == full
    assert long.max_steps >= cfg.max_steps
    typed = parse(["--full", "--max_steps", "7"])
    assert typed.max_steps == 7  # typed beats both presets


def test_sft_full(monkeypatch):
    seen = []
    monkeypatch.setattr(sft, "SFT", lambda cfg: seen.append(cfg) or type("T", (), {"fit": lambda s: {"final": None}})())
    sft.main([])
    sft.main(["--full"])
    assert seen[0].max_steps == demos.SFT["max_steps"]
    assert _values(seen[1], demos.SFT_FULL) == demos.SFT_FULL and seen[1].max_steps > seen[0].max_steps


@pytest.mark.parametrize("argv", [
    ["--model_name", "/some/model", "--full"],
])
@pytest.mark.parametrize("parse", [hrpo.parse_args, codi.parse_args])
def test_full_outside_the_demo_is_an_argparse_error(parse, argv, capsys):
    with pytest.raises(SystemExit) as e:
        parse(argv)
    assert e.value.code == 2 and "--full" in capsys.readouterr().err


def test_minimind_full(monkeypatch, tmp_path):
    """Every stage: ``--full`` takes its STAGE_DEMOS row's full preset over its short one; with a data file it is an error."""
    monkeypatch.chdir(tmp_path)
    seen = []
    for name in STAGES:
        trainer_cls = _stage_class(name)
        monkeypatch.setattr(trainer_cls, "fit", lambda self: seen.append(self.cfg))
        monkeypatch.setattr(trainer_cls, "__init__", lambda self, cfg, demo=False, **kw: setattr(self, "cfg", cfg))
        main = mm_common.stage_main(trainer_cls, "")
        main([])
        main(["--full"])
        short, long = seen[-2:]
        full = mm_common.STAGE_DEMOS[trainer_cls.stage][1]
        assert long.full and _values(long, full) == full, name
        assert long.max_steps >= short.max_steps, name
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "x"}\n')
    with pytest.raises(SystemExit) as e:
        mm_common.stage_main(_stage_class("pretrain"), "")(["--data_path", str(data), "--full"])
    assert e.value.code == 2


@pytest.mark.parametrize("name", ["grpo", "dpo", "rloo"])
def test_rl_entrypoints_without_a_model_run_a_bounded_demo(name, tmp_path):
    """No --model_name_or_path: TRL's defaults (lr 1e-6, 3 epochs) would run for hours on the tiny
    model, so the demo preset bounds the run; a typed flag or a real model keeps TRL's values."""
    import importlib

    mod = importlib.import_module(f"latentfast.train.rl.{name}")
    config = next(v for k, v in vars(mod).items() if k.endswith("Config") and k.lower().startswith(name))
    demo = config.parse([])
    assert demo.demo and 0 < demo.max_steps <= 200 and demo.lr == 1e-6
    assert config.parse(["--full"]).max_steps != demo.max_steps
    assert config.parse(["--max_steps", "3"]).max_steps == 3
    real = tmp_path / "model"
    real.mkdir()
    (real / "config.json").write_text("{}")
    assert config.parse(["--model_name_or_path", str(real)]).max_steps == -1
