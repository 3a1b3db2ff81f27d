"""CODI and HRPO on the one loop: a run interrupted after a checkpoint and resumed gives the
uninterrupted run's weights and metrics bit-for-bit on CPU (weights, optimizer, schedule, RNG,
the data stream and HRPO's per-step rollout seeds all come back)."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from latentfast.train import codi, codi_data, hrpo


pytestmark = pytest.mark.usefixtures("one_thread")


def _rows(out):
    return {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r}


def _same_weights(a, b):
    a, b = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_codi_resume_is_bit_exact(tmp_path):
    data = tmp_path / "hybrid"
    codi_data.main(["--data_name", "synthetic", "--max_samples", "32", "--output_dir", str(data)])
    common = ["--hybrid_data_path", str(data / codi_data.OUTPUT_NAME), "--per_device_train_batch_size", "4",
              "--learning_rate", "3e-3", "--prj_dim", "32", "--num_latent", "2", "--eval_data", "none",
              "--logging_steps", "0", "--max_steps", "4", "--save_steps", "2", "--device", "cpu", "--sft_steps", "0"]
    full, part = tmp_path / "full", tmp_path / "part"
    codi.main(common + ["--output_dir", str(full)])
    res = codi.main(common + ["--output_dir", str(part), "--resume_from_checkpoint", str(full / "checkpoint-2")])
    assert res["first"]["step"] == 3
    _same_weights(full / "checkpoint-4", part / "checkpoint-4")
    a, b = _rows(full), _rows(part)
    for step in (3, 4):
        assert {k: a[step][k] for k in ("loss", "ce", "ref_ce", "distill", "grad_norm", "lr")} == \
               {k: b[step][k] for k in ("loss", "ce", "ref_ce", "distill", "grad_norm", "lr")}
    saved = json.loads((full / "checkpoint-4" / "trainer_state.json").read_text())["extra"]["config"]
    assert codi.CODIConfig.from_dict(saved).lr == 3e-3  # the config saved with the checkpoint rebuilds the run


def test_hrpo_resume_is_bit_exact(tmp_path):
    argv = ["--sft_steps", "3", "--max_steps", "3", "--per_device_train_batch_size", "8", "--group_size", "4",
            "--max_completion_length", "10", "--eval_size", "4", "--save_steps", "2", "--seed", "5"]
    full, part = tmp_path / "full", tmp_path / "part"
    hrpo.main(argv + ["--output_dir", str(full)])
    part.mkdir()
    os.symlink(full / "base_model", part / "base_model")  # the same warmed-up base
    hrpo.main(argv + ["--output_dir", str(part), "--resume_from_checkpoint", str(full / "checkpoint-2")])
    _same_weights(full / "checkpoint-3", part / "checkpoint-3")
    a, b = _rows(full)[3], _rows(part)[3]
    for k in ("loss", "reward", "kl", "grad_norm", "lr", "thinking_projection/weight_change"):
        assert a[k] == b[k], k
    state = json.loads((part / "checkpoint-3" / "trainer_state.json").read_text())["extra"]
    assert state["hrpo"]["base_model"] and state["config"]["group_size"] == 4  # latentfast-hrpo-eval reads these
    # resuming a finished run: no training step, the final evaluation and checkpoint only
    before = _rows(part)
    res = hrpo.main(argv + ["--output_dir", str(part), "--resume_from_checkpoint", "latest"])
    assert res["trainable_checksum"] > 0 and _rows(part).keys() == before.keys() == {3}
