"""The non-finite-step guard (latentfast.runtime.guard): a NaN/Inf loss or gradient norm
skips the optimizer and scheduler step, is counted and warned about, stops the run after
too many in a row, and no checkpoint ever holds a non-finite weight. End to end: a NaN
injected into one HRPO step leaves the weights finite and the run going; --group_size 1
trains on finite (zero) advantages."""
import json
import math
import warnings

import pytest
import torch
from safetensors.torch import load_file

from latentfast.runtime import checkpoint
from latentfast.runtime.guard import NonFiniteGuard, NonFiniteTrainingError
from latentfast.train import hrpo
from latentfast.train.common import optimizer_step


pytestmark = pytest.mark.usefixtures("one_thread")


def _setup():
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(lin.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
    return lin, opt, sched


def _step(lin, opt, sched, guard, x, step):
    loss = lin(x).pow(2).mean()
    loss.backward()
    return optimizer_step(lin.parameters(), opt, sched, 1.0, guard=guard, loss=loss, step=step)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_step_is_skipped_and_counted(bad):
    lin, opt, sched = _setup()
    guard = NonFiniteGuard(max_consecutive=3)
    x = torch.randn(5, 4)
    _step(lin, opt, sched, guard, x, 1)
    before = [p.detach().clone() for p in lin.parameters()]
    lr_before, sched_steps = opt.param_groups[0]["lr"], sched.last_epoch
    with pytest.warns(RuntimeWarning, match="step 2 has a non-finite loss"):
        _step(lin, opt, sched, guard, x * bad, 2)
    assert guard.skipped == 1 and guard.consecutive == 1
    for p, q in zip(lin.parameters(), before):
        assert torch.equal(p, q) and p.grad is None  # no step, gradients cleared
    assert sched.last_epoch == sched_steps and opt.param_groups[0]["lr"] == lr_before
    _step(lin, opt, sched, guard, x, 3)  # a finite step resets the run of skips
    assert guard.skipped == 1 and guard.consecutive == 0
    assert not torch.equal(next(lin.parameters()), before[0])
    assert all(torch.isfinite(p).all() for p in lin.parameters())


def test_finite_loss_but_nonfinite_gradient_is_skipped():
    lin, opt, sched = _setup()
    guard = NonFiniteGuard()
    lin.weight.grad = torch.full_like(lin.weight, float("nan"))
    lin.bias.grad = torch.zeros_like(lin.bias)
    with pytest.warns(RuntimeWarning):
        optimizer_step(lin.parameters(), opt, sched, 1.0, guard=guard, loss=torch.tensor(0.5), step=7)
    assert guard.skipped == 1 and torch.isfinite(lin.weight).all()


def test_too_many_consecutive_skips_stop_the_run_naming_the_step():
    lin, opt, sched = _setup()
    guard = NonFiniteGuard(max_consecutive=2, name="sft")
    x = torch.full((2, 4), float("nan"))
    with pytest.warns(RuntimeWarning):
        _step(lin, opt, sched, guard, x, 10)
    with pytest.raises(NonFiniteTrainingError, match=r"sft: step 11 .*2 consecutive steps.*Likely causes"):
        _step(lin, opt, sched, guard, x, 11)
    with pytest.raises(ValueError, match="max_consecutive"):
        NonFiniteGuard(max_consecutive=0)


def test_checkpoint_refuses_nonfinite_weights(tmp_path):
    lin, opt, _ = _setup()
    with torch.no_grad():
        lin.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteTrainingError, match="refusing to save.*weight"):
        checkpoint.save(str(tmp_path), 1, lin, opt)
    assert not (tmp_path / "checkpoint-1" / "model.safetensors").exists()


def test_guard_state_round_trips():
    g = NonFiniteGuard()
    g.skipped, g.consecutive = 3, 1
    h = NonFiniteGuard()
    h.load_state_dict(g.state_dict())
    assert (h.skipped, h.consecutive) == (3, 1)


FAST = ["--sft_steps", "3", "--max_steps", "3", "--per_device_train_batch_size", "4", "--group_size", "2",
        "--max_completion_length", "8", "--eval_size", "4", "--save_steps", "0", "--seed", "5"]


def _steps(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "reward" in r]


def _final_weights_finite(out):
    w = load_file(str(out / "checkpoint-3" / "model.safetensors"))
    return bool(w) and all(torch.isfinite(v).all() for v in w.values())


def test_hrpo_nan_in_one_step_is_skipped_and_the_run_goes_on(tmp_path, monkeypatch):
    real, calls = hrpo.group_advantages, {"n": 0}

    def nan_on_second_step(rewards, group_size):
        calls["n"] += 1
        adv = real(rewards, group_size)
        return adv * float("nan") if calls["n"] == 2 else adv  # one micro-batch per step: step 2

    monkeypatch.setattr(hrpo, "group_advantages", nan_on_second_step)
    out = tmp_path / "run"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hrpo.main(FAST + ["--output_dir", str(out)])
    assert any("step 2 has a non-finite loss" in str(w.message) for w in caught)
    steps = _steps(out)
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert [r["skipped_nonfinite"] for r in steps] == [0, 1, 1]
    assert math.isfinite(steps[-1]["loss"]) and math.isfinite(steps[-1]["grad_norm"])
    assert _final_weights_finite(out)


def test_hrpo_group_size_one_trains_on_zero_advantages_with_a_warning(tmp_path):
    assert torch.equal(hrpo.group_advantages(torch.tensor([1.0, 0.0, 3.0]), 1), torch.zeros(3))
    out = tmp_path / "g1"
    args = FAST[:FAST.index("--group_size")] + ["--group_size", "1"] + FAST[FAST.index("--group_size") + 2:]
    with pytest.warns(UserWarning, match="--group_size 1.*advantage is 0"):
        hrpo.main(args + ["--output_dir", str(out)])
    steps = _steps(out)
    assert len(steps) == 3 and all(r["skipped_nonfinite"] == 0 for r in steps)
    assert all(math.isfinite(r[k]) for r in steps for k in ("loss", "kl", "grad_norm"))
    assert _final_weights_finite(out)
