"""The common mistakes fail at argument parsing with a message naming the flag (argparse's
exit status 2), not as a traceback from deep inside a run."""
import runpy
import subprocess
import sys
import pathlib

import pytest

from latentfast.train import codi, hrpo, kv_distill

TRAINERS = {"hrpo": (hrpo, "--train_data"), "codi": (codi, "--train_data"), "kv_distill": (kv_distill, "--dataset_name")}


def _error(capsys, module, argv) -> str:
    with pytest.raises(SystemExit) as e:
        module.parse_args(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("name", TRAINERS)
def test_missing_train_data_path(capsys, tmp_path, name):
    module, flag = TRAINERS[name]
    err = _error(capsys, module, [flag, str(tmp_path / "nope.jsonl")])
    assert f"{flag} " in err and "no such file" in err and "nope.jsonl" in err


@pytest.mark.parametrize("name", TRAINERS)
def test_missing_eval_data_path(capsys, tmp_path, name):
    module, _ = TRAINERS[name]
    err = _error(capsys, module, ["--eval_data", str(tmp_path / "held_out.jsonl")])
    assert "--eval_data" in err and "no such file" in err


def test_empty_jsonl(capsys, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    err = _error(capsys, hrpo, ["--train_data", str(empty)])
    assert "--train_data" in err and "empty.jsonl" in err and "no rows" in err


@pytest.mark.parametrize("bad,why", [('{"question": "1+1", "answer": "#### 2"', "not valid JSON"),
                                     ('{"question": "1+1"}', "needs 'question' and 'answer'"),
                                     ('[1, 2]', "needs 'question' and 'answer'")])
def test_malformed_jsonl_names_file_and_line(capsys, tmp_path, bad, why):
    path = tmp_path / "train.jsonl"
    path.write_text('{"question": "2+2", "answer": "#### 4"}\n\n' + bad + "\n")
    err = _error(capsys, kv_distill, ["--dataset_name", str(path)])
    assert f"{path}:3:" in err and why in err


def test_batch_not_a_multiple_of_group_size(capsys):
    err = _error(capsys, hrpo, ["--per_device_train_batch_size", "6", "--group_size", "4"])
    assert "--per_device_train_batch_size (6) must be a multiple of --group_size (4)" in err
    err = _error(capsys, hrpo, ["--group_size", "0"])
    assert "--group_size must be >= 1" in err


@pytest.mark.parametrize("name", TRAINERS)
def test_resume_from_something_that_is_not_a_checkpoint(capsys, tmp_path, name):
    module, _ = TRAINERS[name]
    err = _error(capsys, module, ["--resume_from_checkpoint", str(tmp_path / "missing")])
    assert "--resume_from_checkpoint" in err and "no such directory" in err
    (tmp_path / "notckpt").mkdir()
    err = _error(capsys, module, ["--resume_from_checkpoint", str(tmp_path / "notckpt")])
    assert "is not a latentfast checkpoint" in err and "trainer_state.json" in err


def test_a_good_jsonl_path_and_latest_pass(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"question": "2+2", "answer": "#### 4"}\n')
    args = hrpo.parse_args(["--train_data", str(path), "--resume_from_checkpoint", "latest"])
    assert args.train_data == str(path)


def _console_scripts():
    from importlib.metadata import distribution

    return [ep for ep in distribution("latentfast").entry_points if ep.group == "console_scripts"]


def _answers_help(monkeypatch, capsys, argv0, run) -> str:
    monkeypatch.setattr(sys, "argv", [argv0, "--help"])
    with pytest.raises(SystemExit) as e:
        run()
    assert e.value.code in (0, None), f"{argv0} --help exited {e.value.code}"
    out = capsys.readouterr().out
    assert "usage:" in out, f"{argv0} --help printed no usage: {out[-500:]}"
    return out


@pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")  # runpy on an imported module
def test_every_console_script_is_installed_and_answers_help(monkeypatch, capsys):
    """The README's entrypoints exist in this environment and parse --help (imports included).
    In-process (one import of torch/transformers, not one per script: ~9 s each on 2 cores),
    plus one real subprocess to check the installed wrapper itself."""
    scripts = _console_scripts()
    if not scripts:
        pytest.skip("latentfast is not installed (pip install -e . first)")
    bindir = pathlib.Path(sys.executable).parent
    missing = [ep.name for ep in scripts if not (bindir / ep.name).exists()]
    assert not missing, f"console scripts not installed into {bindir}: {missing}"
    assert {"latentfast-hrpo", "latentfast-codi", "latentfast-kv-distill", "latentfast-minimind"} <= {ep.name for ep in scripts}
    for ep in scripts:
        _answers_help(monkeypatch, capsys, ep.name, ep.load())
    for module in ("latentfast.eval.adaptive", "latentfast.diagnose"):
        _answers_help(monkeypatch, capsys, module, lambda: runpy.run_module(module, run_name="__main__"))
    r = subprocess.run([str(bindir / "latentfast-diagnose"), "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "usage:" in r.stdout, f"latentfast-diagnose --help: {r.stderr[-2000:]}"


# ----------------------------------------------------------------------------- every console script
# (console script, how to run it in-process, argv before the bad flag, the flag). Every path flag of
# every console script in setup.py; a new console script without a row fails
# test_every_console_script_has_path_cases.
MISSING = "missing/nope"  # relative to the test's empty working folder: does not exist
MM_DATA = "mm.jsonl"  # a MiniMind JSONL in the working folder (so the weight / reward-model checks are reached)
MM_STAGES = ("pretrain", "full_sft", "lora", "distill_reason", "distillation", "dpo", "ppo", "grpo", "spo")
CASES = [
    ("latentfast-hrpo", "latentfast.train.hrpo", [], "--model_name"),
    ("latentfast-hrpo", "latentfast.train.hrpo", [], "--model_name_or_path"),
    ("latentfast-hrpo", "latentfast.train.hrpo", [], "--train_data"),
    ("latentfast-hrpo", "latentfast.train.hrpo", [], "--eval_data"),
    ("latentfast-hrpo", "latentfast.train.hrpo", [], "--dataset_root"),
    ("latentfast-hrpo", "latentfast.train.hrpo", [], "--resume_from_checkpoint"),
    ("latentfast-codi", "latentfast.train.codi", [], "--model_name"),
    ("latentfast-codi", "latentfast.train.codi", [], "--hybrid_data_path"),
    ("latentfast-codi", "latentfast.train.codi", [], "--restore_from"),
    ("latentfast-codi", "latentfast.train.codi", [], "--train_data"),
    ("latentfast-codi", "latentfast.train.codi", [], "--eval_data"),
    ("latentfast-codi", "latentfast.train.codi", [], "--resume_from_checkpoint"),
    ("latentfast-kv-distill", "latentfast.train.kv_distill.cli", [], "--model_name"),
    ("latentfast-kv-distill", "latentfast.train.kv_distill.cli", [], "--teacher_model"),
    ("latentfast-kv-distill", "latentfast.train.kv_distill.cli", [], "--dataset_name"),
    ("latentfast-kv-distill", "latentfast.train.kv_distill.cli", [], "--eval_data"),
    ("latentfast-kv-distill", "latentfast.train.kv_distill.cli", [], "--teachers"),
    ("latentfast-kv-distill", "latentfast.train.kv_distill.cli", [], "--resume_from_checkpoint"),
    ("latentfast-sft", "latentfast.train.sft", [], "--model_name"),
    ("latentfast-sft", "latentfast.train.sft", [], "--train_data"),
    ("latentfast-sft", "latentfast.train.sft", [], "--eval_data"),
    ("latentfast-sft", "latentfast.train.sft", [], "--resume_from_checkpoint"),
    *[(f"latentfast-{alg}", f"latentfast.train.rl.{alg}", [], flag) for alg in ("grpo", "dpo", "rloo")
      for flag in ("--model_name_or_path", "--model_name", "--dataset_name", "--resume_from_checkpoint")],
    *[(f"latentfast-{alg}", f"latentfast.train.rl.{alg}", [], "--reward_funcs") for alg in ("grpo", "rloo")],
    ("latentfast-plan", "latentfast.scripts.plan", [], "--model"),
    ("latentfast-plan", "latentfast.scripts.plan", ["--trainer", "kv"], "--teachers"),
    ("latentfast-hrpo-eval", "latentfast.eval.hrpo", [], "--checkpoint_path"),
    ("latentfast-hrpo-eval", "latentfast.eval.hrpo", ["--checkpoint_path", "."], "--checkpoint_path"),
    ("latentfast-kv-cache", "latentfast.train.kv_distill.cache", [], "--teachers"),
    ("latentfast-kv-cache", "latentfast.train.kv_distill.cache", ["--teachers", "t.yaml"], "--model_name"),
    ("latentfast-kv-cache", "latentfast.train.kv_distill.cache", ["--teachers", "t.yaml"], "--dataset_name"),
    ("latentfast-diagnose", "latentfast.diagnose", [], "--model_name"),
    ("latentfast-plan", "latentfast.scripts.plan", [], "--model"),
    ("latentfast-diagnose", "latentfast.diagnose", [], "--teacher_model"),
    ("latentfast-diagnose", "latentfast.diagnose", [], "--data"),
    *[("latentfast-minimind", stage, [], "--data_path") for stage in MM_STAGES],
    *[("latentfast-minimind", stage, ["--data_path", MM_DATA], "--from_weight")
      for stage in MM_STAGES if stage not in ("distillation", "ppo", "grpo", "spo")],
    ("latentfast-minimind", "distillation", ["--data_path", MM_DATA], "--from_student_weight"),
    ("latentfast-minimind", "distillation", ["--data_path", MM_DATA, "--from_student_weight", "none"],
     "--from_teacher_weight"),
    *[("latentfast-minimind", stage, ["--data_path", MM_DATA], "--reward_model_path")
      for stage in ("ppo", "grpo", "spo")],
    *[("latentfast-minimind", stage, ["--data_path", MM_DATA, "--reward_model_path", "none"], "--from_weight")
      for stage in ("ppo", "grpo", "spo")],
    *[("latentfast-minimind", stage, [], "--resume_from_checkpoint") for stage in ("pretrain", "grpo")],
]
# flags whose missing value is an error of their own (required, or nothing to fall back to)
REQUIRED = [("latentfast-hrpo-eval", "latentfast.eval.hrpo", "--checkpoint_path"),
            ("latentfast-kv-cache", "latentfast.train.kv_distill.cache", "--teachers")]


def _run_main(script, target, argv):
    import importlib

    if script == "latentfast-minimind":
        from latentfast.train.minimind import cli as mm

        return mm.main([target, *argv])
    return importlib.import_module(target).main(argv)


def _tree(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _fails_like_a_cli(capsys, tmp_path, monkeypatch, script, target, argv) -> str:
    """Runs in an empty working folder one level down (MiniMind writes to ../out, ../checkpoints)."""
    work = tmp_path / "work"
    work.mkdir()
    (work / MM_DATA).write_text('{"text": "1 + 1 = 2", "conversations": []}\n')
    (work / "t.yaml").write_text("teachers:\n  - {name: t, model: tiny_teacher_dir}\n")
    (work / "tiny_teacher_dir").mkdir()
    monkeypatch.chdir(work)
    before = _tree(tmp_path)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        _run_main(script, target, argv)
    err = capsys.readouterr().err
    assert e.value.code == 2, f"{script} {argv}: exit {e.value.code}\n{err}"
    assert "Traceback" not in err and "usage:" in err and "error:" in err, err
    assert _tree(tmp_path) == before, f"{script} {argv} created {set(_tree(tmp_path)) - set(before)}"
    return err


@pytest.mark.parametrize("script,target,argv,flag", CASES, ids=[f"{c[0]}:{c[1]}:{c[3]}:{len(c[2])}" for c in CASES])
def test_every_path_flag_fails_like_a_cli(capsys, tmp_path, monkeypatch, script, target, argv, flag):
    """A path that is not there: exit 2, the flag named with what was expected, no traceback, and
    nothing created (no output folder, no ../checkpoints/pretrain_512)."""
    bad = [flag, MISSING] if len(argv) == 0 or argv[-2:] != [flag, "."] else []
    err = _fails_like_a_cli(capsys, tmp_path, monkeypatch, script, target, argv + bad)
    assert flag in err and "expected" in err, err


@pytest.mark.parametrize("script,target,flag", REQUIRED)
def test_required_path_flags(capsys, tmp_path, monkeypatch, script, target, flag):
    err = _fails_like_a_cli(capsys, tmp_path, monkeypatch, script, target, [])
    assert flag in err and "required" in err, err


def _setup_scripts() -> dict:
    import re

    text = (pathlib.Path(__file__).parents[1] / "setup.py").read_text()
    return dict(re.findall(r'"(latentfast-[\w-]+)=([\w.]+:\w+)"', text))


def test_every_console_script_has_path_cases():
    """A console script added to setup.py gets its rows in CASES (or is listed here as having no path flag)."""
    covered = {c[0] for c in CASES}
    assert set(_setup_scripts()) <= covered, sorted(set(_setup_scripts()) - covered)


@pytest.mark.parametrize("argv,flag", [(["--lr", "inf"], "--lr"), (["--weight_decay", "nan"], "--weight_decay"),
                                       (["--learning_rate", "-inf"], "--learning_rate"),
                                       (["--eval_size", "-1"], "--eval_size"), (["--max_steps", "-5"], "--max_steps"),
                                       (["--lora_rank", "-2"], "--lora_rank"), (["--top_p", "1.5"], "--top_p")])
def test_non_finite_and_out_of_range_numbers(capsys, argv, flag):
    err = _error(capsys, hrpo, argv)
    assert flag in err and ("finite" in err or "expected" in err), err


def test_non_finite_numbers_in_hand_written_parsers(capsys, tmp_path, monkeypatch):
    err = _fails_like_a_cli(capsys, tmp_path, monkeypatch, "latentfast-diagnose", "latentfast.diagnose",
                            ["--kv_weight", "nan"])
    assert "--kv_weight" in err and "finite" in err


def _parsers():
    from latentfast.diagnose import _parser
    from latentfast.eval import adaptive
    from latentfast.eval import hrpo as hrpo_eval
    from latentfast.train import codi_data, sft
    from latentfast.train.kv_distill import cache as kv_cache
    from latentfast.train.minimind import cli as mm

    out = {"hrpo": hrpo.build_parser(), "codi": codi.build_parser(), "kv_distill": kv_distill.build_parser(),
           "sft": sft.SFTConfig.build_parser(), "hrpo-eval": hrpo_eval.build_parser(),
           "kv-cache": kv_cache.build_parser(), "diagnose": _parser(), "codi_data": codi_data.build_parser(), "adaptive": adaptive.build_parser()}
    import importlib

    from latentfast.train.rl import dpo, grpo, rloo

    from latentfast.scripts.plan import PlanConfig

    out.update(grpo=grpo.GRPOConfig.build_parser(), dpo=dpo.DPOConfig.build_parser(),
               rloo=rloo.RLOOConfig.build_parser(), plan=PlanConfig.build_parser())
    for stage in MM_STAGES:
        mod = importlib.import_module(f"latentfast.train.minimind.{mm.STAGES[stage]}")
        out[f"minimind {stage}"] = _stage_config(mod).build_parser()
    return out


def _stage_config(mod):
    from latentfast.train.minimind.common import MiniMindTrainer

    return next(v.config_class for v in vars(mod).values()
                if isinstance(v, type) and issubclass(v, MiniMindTrainer) and v.__module__ == mod.__name__)


def test_no_parser_abbreviates_flags(capsys):
    """argparse's prefix matching is off everywhere: --max_step is an error, not --max_steps."""
    for name, parser in _parsers().items():
        assert parser.allow_abbrev is False, name
    err = _error(capsys, hrpo, ["--max_step", "20"])
    assert "unrecognized arguments: --max_step" in err


# --help that imports torch / transformers / triton takes 9-18 s on a loaded 2-core machine (torch alone ~1.8 s
# of CPU): every console script (and MiniMind stage) parses with a torch-free config before its trainer loads
HELP_CASES = [(n, ["--help"]) for n in _setup_scripts()] + [("latentfast-minimind", [s, "--help"]) for s in MM_STAGES]


@pytest.mark.parametrize("name,argv", HELP_CASES, ids=[" ".join([n, *a[:-1]]) for n, a in HELP_CASES])
def test_help_imports_no_heavy_module(name, argv):
    """--help answers without importing torch / transformers / triton (the 2 s budget), in a fresh process;
    also each MiniMind stage's (``latentfast-minimind <stage> --help``)."""
    module, func = _setup_scripts()[name].split(":")
    code = (f"import importlib, sys\nsys.argv = {[name, *argv]!r}\n"
            f"try:\n    getattr(importlib.import_module({module!r}), {func!r})()\n"
            f"except SystemExit as e:\n    assert e.code in (0, None), e.code\n"
            f"print([m for m in ('torch', 'transformers', 'triton', 'peft') if m in sys.modules])\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       cwd=pathlib.Path(__file__).parents[1])
    assert r.returncode == 0 and "usage:" in r.stdout, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "[]", f"{name} --help imported {r.stdout.strip().splitlines()[-1]}"
