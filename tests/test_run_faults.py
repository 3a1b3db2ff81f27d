"""Runs that cannot silently become another run (issue 26): resume checks the saved config
(each differing flag named with both values, --allow_config_change, the data position kept
when the batch size changes), one run per output folder (run.lock), metrics.jsonl rows with a
run id and no duplicates after a resume, a hung rank and a dead torchrun agent."""
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest
import torch

from latentfast.train import resume
from latentfast.runtime.runlock import LOCK, RunLockedError
from toy_trainer import Crash, Toy, ToyConfig, same, toy, weights

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = pathlib.Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", "OMP_NUM_THREADS": "1"}


# ----------------------------------------------------------------------------- the saved config
def test_resume_with_other_run_flags_stops_naming_each(tmp_path):
    toy(tmp_path / "a", max_steps=2).fit()
    with pytest.raises(resume.ResumeConfigError) as e:
        toy(tmp_path / "a", max_steps=4, per_device_train_batch_size=4, seed=7, width=8,
            resume_from_checkpoint="latest").fit()
    msg = str(e.value)
    for part in ("--per_device_train_batch_size / --batch_size: checkpoint 8, now 4", "--seed: checkpoint 42, now 7",
                 "--width: checkpoint 16, now 8"):
        assert part in msg, msg
    assert "checkpoint-2" in msg and "--allow_config_change" in msg
    assert not (tmp_path / "a" / "checkpoint-4").exists()
    toy(tmp_path / "a", max_steps=4, resume_from_checkpoint="latest").fit()  # --max_steps may grow
    with pytest.raises(SystemExit):
        ToyConfig.parse(["--allow_config_change", "no_such_flag"])


def test_allowed_batch_size_change_continues_the_data_stream(tmp_path):
    with pytest.raises(Crash):
        toy(tmp_path / "a", stop_at=3).fit()  # B=8: steps 1-2 read items 0..15, checkpoint-2
    t = toy(tmp_path / "a", per_device_train_batch_size=4, resume_from_checkpoint="latest",
            allow_config_change=["batch_size"])
    t.fit()
    assert t.seen[:8] == list(range(16, 24))  # not 8..15 again (step 2 x the new batch of 4)
    assert t.seen == list(range(16, 16 + 4 * 4))  # steps 3..6, each item once
    state = json.loads((tmp_path / "a" / "checkpoint-6" / "trainer_state.json").read_text())["extra"]
    assert state["items_seen"] == 32


def test_minimind_resume_names_minimind_flags(tmp_path):
    from latentfast.train.minimind.pretrain import Pretrain, PretrainArgs

    tiny = dict(hidden_size=32, num_hidden_layers=1, max_seq_len=48, batch_size=4, accumulation_steps=1, lr=2e-2,
                log_interval=0, save_interval=0, max_steps=1, dtype="float32", device="cpu", data_path="demo",
                save_dir=str(tmp_path / "out"))
    Pretrain(PretrainArgs.from_dict(tiny)).fit()
    with pytest.raises(resume.ResumeConfigError, match=r"--tokenizer: checkpoint 'minimind-2510', now 'minimind-3'"):
        Pretrain(PretrainArgs.from_dict({**tiny, "tokenizer": "minimind-3", "from_resume": 1, "max_steps": 2})).fit()
    with pytest.raises(resume.ResumeConfigError, match=r"--gradient_accumulation_steps / --accumulation_steps"):
        Pretrain(PretrainArgs.from_dict({**tiny, "accumulation_steps": 2, "from_resume": 1, "max_steps": 2})).fit()
    # a shape change let through still fails at load, naming this trainer's shape flags (not HRPO's)
    with pytest.raises(RuntimeError, match=r"different --hidden_size / --num_hidden_layers / --use_moe") as e:
        Pretrain(PretrainArgs.from_dict({**tiny, "num_hidden_layers": 2, "from_resume": 1, "max_steps": 2,
                                         "allow_config_change": ["num_hidden_layers"],
                                         "output_dir": str(tmp_path / "checkpoints" / "pretrain_32")})).fit()
    assert "--projection" not in str(e.value)


def test_command_line_resume_mismatch_is_one_error_line_and_exit_2(tmp_path, monkeypatch, capsys):
    from latentfast.train.minimind import pretrain

    argv = ["pretrain", "--data_path", "demo", "--hidden_size", "32", "--num_hidden_layers", "1", "--max_seq_len",
            "48", "--batch_size", "4", "--accumulation_steps", "1", "--log_interval", "0", "--save_interval", "0",
            "--max_steps", "1", "--dtype", "float32", "--device", "cpu", "--save_dir", str(tmp_path / "out")]
    monkeypatch.setattr(sys, "argv", argv)
    assert pretrain.cli() == 0
    monkeypatch.setattr(sys, "argv", argv + ["--from_resume", "1", "--seed", "3", "--max_steps", "2"])
    with pytest.raises(SystemExit) as e:
        pretrain.cli()
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and err.startswith("pretrain: error: --resume_from_checkpoint") and \
        "--seed: checkpoint 42, now 3" in err


# ----------------------------------------------------------------------------- one run per folder
def _rows(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_metrics_carry_a_run_id_and_resume_drops_redone_steps(tmp_path):
    with pytest.raises(Crash):
        toy(tmp_path / "a", save_steps=3, stop_at=5).fit()  # rows 1-4, checkpoint-3
    first = _rows(tmp_path / "a")
    assert [r["step"] for r in first] == [1, 2, 3, 4] and len({r["run_id"] for r in first}) == 1
    toy(tmp_path / "a", save_steps=3, resume_from_checkpoint="latest").fit()
    rows = [r for r in _rows(tmp_path / "a") if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]  # step 4 once: the crashed run's row is gone
    assert rows[2]["run_id"] == first[0]["run_id"] != rows[3]["run_id"] == rows[5]["run_id"]


def test_second_run_in_a_folder_fails_at_once_naming_the_first(tmp_path):
    out = tmp_path / "a"
    cfg = json.dumps({"out": str(out), "max_steps": 100000, "save_steps": 0})
    first = subprocess.Popen([sys.executable, str(ROOT / "tests" / "toy_trainer.py"), cfg], env=ENV,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        for _ in range(600):
            if (out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").stat().st_size:
                break
            time.sleep(0.1)
        holder = json.loads((out / LOCK).read_text())
        assert holder["pid"] == first.pid
        t0 = time.time()
        with pytest.raises(RunLockedError, match=rf"in use by another run: pid {first.pid} on \S+, started"):
            toy(out).fit()
        assert time.time() - t0 < 5
        assert first.poll() is None  # the first run goes on
    finally:
        first.kill()
        first.wait()
    # the first run died holding the lock: the next run takes it over, with a warning
    with pytest.warns(RuntimeWarning, match=rf"stale run lock \(pid {first.pid}"):
        toy(out, max_steps=1).fit()
    assert not (out / LOCK).exists()  # released at the end


def test_lock_released_after_a_crash_and_reentrant_in_process(tmp_path):
    with pytest.raises(Crash):
        toy(tmp_path / "a", stop_at=1).fit()
    assert not (tmp_path / "a" / LOCK).exists()


class BadSetup(Toy):
    def setup(self):
        raise ValueError("malformed data")


def test_a_run_that_fails_in_setup_leaves_no_folder_it_made(tmp_path):
    with pytest.raises(ValueError, match="malformed data"):
        BadSetup(ToyConfig(output_dir=str(tmp_path / "new" / "run"), max_steps=1, device="cpu")).fit()
    assert list(tmp_path.iterdir()) == []  # both levels it created are gone
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError):
        BadSetup(ToyConfig(output_dir=str(tmp_path / "kept"), max_steps=1, device="cpu")).fit()
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == ["notes.txt"]  # an existing folder stays


def test_malformed_data_found_at_load_is_one_error_line_exit_2_and_no_folder(tmp_path, monkeypatch, capsys):
    from latentfast.train.minimind import cli
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "broken"\n')
    monkeypatch.setattr(sys, "argv", ["latentfast-minimind", "pretrain", "--data_path", str(bad),
                                      "--save_dir", str(tmp_path / "out"), "--hidden_size", "64",
                                      "--num_hidden_layers", "1", "--device", "cpu"])
    with pytest.raises(SystemExit) as e:
        cli.cli()
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1, err
    assert err[0].startswith("latentfast-minimind: error: ") and f"{bad}:2: not valid JSON" in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]


# ----------------------------------------------------------------------------- distributed
class Hang(Toy):
    def batches(self, step):
        if self.rank == 1 and step == 2:
            os.kill(os.getpid(), signal.SIGSTOP)  # a hung rank: alive, never answering
        return super().batches(step)


def _hang_worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    t0 = time.time()
    try:
        Hang(ToyConfig(output_dir=str(pathlib.Path(out) / "run"), max_steps=6, save_steps=1, logging_steps=0,
                       per_device_train_batch_size=4, device="cpu", ddp_timeout=3)).fit()
        msg = "finished"
    except Exception as e:  # noqa: BLE001 - the error is the result
        msg = f"{type(e).__name__}: {e}"
    pathlib.Path(out, f"rank{rank}.txt").write_text(f"{time.time() - t0:.1f}\n{msg}")
    os._exit(0)


def test_hung_rank_ends_the_job_naming_the_collective(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_hang_worker, args=(r, 2, port, str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    procs[0].join(120)
    for p in procs:
        if p.is_alive():
            os.kill(p.pid, signal.SIGKILL)
        p.join()
    took, msg = (tmp_path / "rank0.txt").read_text().split("\n", 1)
    assert msg.startswith("CollectiveError: rank 0: step 3's forward/backward"), msg
    assert "after 3 s (--ddp_timeout)" in msg and "another rank is hung" in msg
    # checkpoints 1 and 2 were written by both ranks before the hang, and are intact
    from latentfast.runtime import checkpoint

    assert checkpoint.latest(str(tmp_path / "run")).endswith("checkpoint-2")


AGENT = """
import os, subprocess, sys, time
env = {**os.environ, "TORCHELASTIC_RUN_ID": "test"}
w = subprocess.Popen([sys.executable, "-c", "import time; from latentfast.runtime import dist; dist.setup('cpu'); "
                      "open(sys.argv[1], 'w').write('up'); time.sleep(120)", sys.argv[1]], env=env)
print(w.pid, flush=True)
time.sleep(120)
"""


def _gone(pid):
    try:
        state = pathlib.Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "State:\tZ" in state


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc")
def test_worker_exits_when_its_torchrun_agent_dies(tmp_path):
    up = tmp_path / "up"
    agent = subprocess.Popen([sys.executable, "-c", AGENT.replace("sys.argv[1]", repr(str(up)))], env=ENV,
                             stdout=subprocess.PIPE, text=True)
    worker = int(agent.stdout.readline())
    for _ in range(600):
        if up.exists():
            break
        time.sleep(0.1)
    assert up.exists() and not _gone(worker)
    agent.kill()
    agent.wait()
    for _ in range(100):
        if _gone(worker):
            break
        time.sleep(0.1)
    assert _gone(worker)
