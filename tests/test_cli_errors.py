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
