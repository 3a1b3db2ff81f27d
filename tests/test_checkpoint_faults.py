"""Checkpoints that never lose a run or load a corrupt one (issue 26): a kill or a full disk
while a checkpoint is written, flipped bytes, stale temporaries, --save_total_limit. In every
case the older checkpoints stay usable, ``latest`` takes the newest intact one (one warning
naming what it skipped), the resumed run continues exactly, and errors name the file."""
import errno
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from latentfast import files
from latentfast.runtime import checkpoint
from toy_trainer import BASE, same, toy, weights

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """The uninterrupted run: checkpoints 2, 4, 6."""
    out = tmp_path_factory.mktemp("full")
    toy(out, dropout=0.3).fit()
    return out


def _resume_exactly(full, part):
    torch.manual_seed(999)  # a fresh process: everything must come from the checkpoint
    with pytest.warns(RuntimeWarning, match="checkpoint-6") as rec:
        res = toy(part, dropout=0.3, resume_from_checkpoint="latest").fit()
    assert [r["step"] for r in res["history"]] == [5, 6]
    assert sum("skipped" in str(w.message) for w in rec) == 1  # one warning
    assert same(weights(full, 6), weights(part, 6))
    checkpoint.verify(part / "checkpoint-6")


def _leftovers(folder):
    return [p.name for p in pathlib.Path(folder).rglob(".*") if p.is_file()]


def _kill_while_writing(tmp_path, kill_at):
    part = tmp_path / "part"
    cfg = json.dumps({"out": str(part), "dropout": 0.3})
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, str(ROOT / "tests" / "toy_trainer.py"), cfg, kill_at], env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == -9, p.stderr[-2000:]  # SIGKILL mid-write
    return part


@pytest.mark.parametrize("kill_at", ["checkpoint-6/trainer_state.json", "checkpoint-6/rng_state_0.json",
                                     "checkpoint-6/manifest.json"])
def test_kill_during_a_checkpoint_write_resumes_from_the_newest_intact(tmp_path, full, kill_at):
    part = _kill_while_writing(tmp_path, kill_at)
    assert not (part / "checkpoint-6" / "manifest.json").exists()
    assert _leftovers(part)  # the killed write left its temporary
    with pytest.warns(RuntimeWarning, match="checkpoint-6"):
        assert checkpoint.latest(str(part)) == str(part / "checkpoint-4")
    _resume_exactly(full, part)
    assert not _leftovers(part)  # stale temporaries removed


def test_full_disk_during_a_write_loses_nothing(tmp_path, full, monkeypatch):
    part = tmp_path / "part"
    real = os.replace

    def enospc(src, dst):
        if str(dst).endswith("checkpoint-6/trainer_state.json"):
            raise OSError(errno.ENOSPC, "No space left on device", str(dst))
        return real(src, dst)

    monkeypatch.setattr(os, "replace", enospc)
    with pytest.raises(OSError, match="No space left"):
        toy(part, dropout=0.3).fit()
    monkeypatch.setattr(os, "replace", real)
    assert not _leftovers(part / "checkpoint-6")  # the temporary went with the error
    checkpoint.verify(part / "checkpoint-4")
    (part / "checkpoint-2" / ".tmpAb12Cd").write_bytes(b"x" * 100)  # a killed safetensors write's temporary
    _resume_exactly(full, part)
    assert not _leftovers(part)  # removed at start (under the run lock)
    checkpoint.verify(part / "checkpoint-2")


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.safetensors", "trainer_state.json",
                                  "rng_state_0.json"])
def test_flipped_bytes_are_found_and_named(tmp_path, full, name):
    import shutil

    part = tmp_path / "part"
    shutil.copytree(full, part)
    f = part / "checkpoint-6" / name
    data = bytearray(f.read_bytes())
    for i in range(10):  # 10 flipped bytes in the body (the size is unchanged)
        data[len(data) // 2 + i] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(files.CorruptFileError, match=f"checkpoint-6/{name}.*blake2b"):
        toy(tmp_path / "x", dropout=0.3, resume_from_checkpoint=str(part / "checkpoint-6")).fit()
    with pytest.raises(files.CorruptFileError, match=name):
        checkpoint.load(str(part / "checkpoint-6"), toy(tmp_path / "y").build_model())
    from toy_trainer import ToyConfig

    with pytest.raises(SystemExit) as e:  # at the command line: exit 2 at argument parsing
        ToyConfig.parse(["--resume_from_checkpoint", str(part / "checkpoint-6")])
    assert e.value.code == 2
    torch.manual_seed(5)
    # the run folder: the corrupt one is skipped, named; steps 5 and 6 are redone exactly
    _resume_exactly(full, part)


def test_truncated_file_names_the_size(tmp_path, full):
    import shutil

    part = tmp_path / "part"
    shutil.copytree(full, part)
    f = part / "checkpoint-6" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(files.CorruptFileError, match=r"model.safetensors: 100 bytes, its manifest.json says"):
        checkpoint.verify(part / "checkpoint-6")


def test_save_total_limit_keeps_the_newest(tmp_path):
    out = tmp_path / "run"
    toy(out, max_steps=8, save_steps=1, save_total_limit=3).fit()
    assert sorted(p.name for p in checkpoint.checkpoints(out)) == ["checkpoint-6", "checkpoint-7", "checkpoint-8"]
    with pytest.raises(SystemExit):
        from toy_trainer import ToyConfig
        ToyConfig.parse(["--save_total_limit", "0"])


def test_checkpoint_from_before_manifests_loads_after_a_structural_check(tmp_path, full):
    import shutil

    part = tmp_path / "part"
    shutil.copytree(full, part)
    for step in (2, 4, 6):
        ck = part / f"checkpoint-{step}"
        (ck / "manifest.json").unlink()
        state = json.loads((ck / "trainer_state.json").read_text())
        del state["format"]
        (ck / "trainer_state.json").write_text(json.dumps(state))
    f = part / "checkpoint-6" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-4])  # a truncated legacy file is still found
    with pytest.raises(files.CorruptFileError, match=r"checkpoint-6/model\.safetensors: not a complete safetensors"):
        checkpoint.verify(part / "checkpoint-6")
    with pytest.warns(RuntimeWarning, match="older latentfast"):
        assert checkpoint.latest(str(part)) == str(part / "checkpoint-4")
    (part / "checkpoint-6" / "trainer_state.json").write_text("")  # the 0-byte state of a killed write
    with pytest.raises(files.CorruptFileError, match=r"checkpoint-6/trainer_state\.json: unreadable"):
        checkpoint.verify(part / "checkpoint-6")


class _Export:
    """A save_pretrained that writes two files, or dies after the first (a kill or a full disk)."""

    def __init__(self, tag, fail=False):
        self.tag, self.fail = tag, fail

    def save_pretrained(self, folder):
        pathlib.Path(folder, "config.json").write_text(self.tag)
        if self.fail:
            raise OSError(errno.ENOSPC, "No space left on device")
        pathlib.Path(folder, "model.safetensors").write_text(self.tag)


def test_a_model_export_is_whole_or_the_previous_one(tmp_path):
    out = tmp_path / "final"
    files.save_pretrained(out, _Export("first"))
    with pytest.raises(OSError, match="No space"):
        files.save_pretrained(out, _Export("second", fail=True))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]  # no temporary left behind
    assert {p.name: p.read_text() for p in out.iterdir()} == {"config.json": "first", "model.safetensors": "first"}
    files.save_pretrained(out, _Export("third"), _Export("third"))
    assert {p.name: p.read_text() for p in out.iterdir()} == {"config.json": "third", "model.safetensors": "third"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]
    (tmp_path / f".final{files.TMP_TAG}12345").mkdir()  # a killed export's temporary folder
    (tmp_path / f".final{files.TMP_TAG}12345" / "config.json").write_text("half")
    assert files.clean_stale_tmp(tmp_path) == [f".final{files.TMP_TAG}12345"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]
