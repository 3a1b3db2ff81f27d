"""MiniMind's DPO / PPO / GRPO / SPO stages on the one loop (tiny models, a few steps each):
they train, the frozen models stay frozen, resume is exact (SPO's value tracker included),
one generation per prompt stays finite, and 2-process gloo DDP stays in sync."""
import json
import os
import pathlib

import pytest
import torch
from safetensors.torch import load_file

from latentfast.train.minimind import dpo, grpo, ppo, spo

TINY = dict(data_path="demo", from_weight="none", hidden_size=32, num_hidden_layers=1, max_seq_len=48,
            dtype="float32", device="cpu", logging_steps=0, save_steps=0, reward_model_path="none",
            rule_rewards="answer", reasoning=1, max_gen_len=4, per_device_train_batch_size=2, lr=1e-3,
            gradient_accumulation_steps=1)


def _cfg(args_cls, tmp_path, name, **kw):
    base = {k: v for k, v in TINY.items() if k in args_cls.__dataclass_fields__}
    return args_cls(**{**base, "save_dir": str(tmp_path / "out"), "output_dir": str(tmp_path / name), **kw})


def _weights(path):
    return load_file(str(pathlib.Path(path) / "model.safetensors"))


def test_grpo_trains_and_one_generation_is_finite(tmp_path):
    res = grpo.GRPO(_cfg(grpo.GRPOArgs, tmp_path, "g", num_generations=2, max_steps=2)).fit()
    assert len(res["history"]) == 2 and all(r["skipped_nonfinite"] == 0 for r in res["history"])
    assert (tmp_path / "out" / "grpo_32.pth").is_file()
    with pytest.warns(UserWarning, match="num_generations 1"):
        res = grpo.GRPO(_cfg(grpo.GRPOArgs, tmp_path, "g1", num_generations=1, max_steps=2, beta=0.5)).fit()
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in res["history"])
    assert res["history"][-1]["skipped_nonfinite"] == 0


class Crash(RuntimeError):
    pass


STAGES = {"dpo": (dpo.DPO, dpo.DPOArgs, dict(max_seq_len=64)),
          "grpo": (grpo.GRPO, grpo.GRPOArgs, dict(num_generations=2)),
          "ppo": (ppo.PPO, ppo.PPOArgs, dict(update_old_actor_freq=2, value_head_init="mean_reward")),
          "spo": (spo.SPO, spo.SPOArgs, dict(gradient_accumulation_steps=2))}


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_resume_after_a_crash_is_exact(tmp_path, stage):
    cls, args, extra = STAGES[stage]
    kw = dict(max_steps=3, save_steps=2, **extra)

    def batches(self, step):
        if step == 2:  # after checkpoint-2 is written
            raise Crash
        return cls.batches(self, step)

    full = cls(_cfg(args, tmp_path, "full", **kw)).fit()
    with pytest.raises(Crash):
        type("Crashing", (cls,), {"batches": batches})(_cfg(args, tmp_path, "part", **kw)).fit()
    torch.manual_seed(123)  # a fresh process: sampling must follow the checkpoint, not this state
    res = cls(_cfg(args, tmp_path, "part", **kw, resume_from_checkpoint="latest")).fit()
    assert [r["step"] for r in res["history"]] == [3]
    a, b = full["history"][2], res["history"][0]
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-9)
    wa, wb = _weights(tmp_path / "full" / "checkpoint-3"), _weights(tmp_path / "part" / "checkpoint-3")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    if stage == "spo":  # the value tracker moved, was saved, and came back
        state = json.loads((tmp_path / "part" / "checkpoint-2" / "trainer_state.json").read_text())
        tracker = state["extra"]["trainer"]["value_tracker"]
        assert tracker["alpha"] != 1.0 and tracker["old_mean_logprob"] is not None
        assert a["rho"] == pytest.approx(b["rho"]) and a["baseline"] == pytest.approx(b["baseline"])
        assert full["history"][0]["baseline"] == 0.0  # Beta(1, 1) on [-3, 3] before any update
    if stage == "ppo":  # the old actor rides in the checkpoint: refreshed at step 2 from the actor
        old = {k[4:]: v for k, v in _weights(tmp_path / "part" / "checkpoint-2").items() if k.startswith("old.")}
        act = {k[3:]: v for k, v in _weights(tmp_path / "part" / "checkpoint-2").items() if k.startswith("lm.")}
        assert old and all(torch.equal(old[k], act[k]) for k in old)


@pytest.mark.parametrize("mode", ["sequence", "gae"])
def test_ppo_updates_actor_and_critic_keeps_reference_frozen(tmp_path, mode):
    t = ppo.PPO(_cfg(ppo.PPOArgs, tmp_path, mode, ppo_mode=mode, max_steps=4, update_old_actor_freq=2,
                     critic_learning_rate=1e-2, mini_batch_size=1, ppo_update_iters=2, early_stop_kl=1e9))
    res = t.fit()
    assert len(res["history"]) == 4
    rows = res["history"]
    assert all("value_loss" in r and torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    if mode == "gae":  # 2 prompts x 2 epochs / minibatch 1 = 4 updates from one rollout
        assert t.rollouts == 1
    w = _weights(tmp_path / mode / "checkpoint-4")
    ref = {k: v for k, v in t.ref.state_dict().items()}
    actor = {k[len("lm."):]: v for k, v in w.items() if k.startswith("lm.")}
    assert any(not torch.equal(actor[k], ref[k]) for k in ref if k in actor)  # the actor moved, the ref did not
    assert any(k.startswith("critic.value_head") for k in w)


def test_critic_and_policy_hidden_match_a_plain_forward():
    """Critic values and the policy's completion hidden states (one shared prompt + completion
    decode) equal a plain input_ids forward, left-padded prompts and right-padded completions."""
    from latentfast.models.minimind import MiniMindConfig, MiniMindForCausalLM
    from latentfast.train.minimind.rl import completion_hidden

    torch.manual_seed(0)
    lm = MiniMindForCausalLM(MiniMindConfig(hidden_size=32, num_hidden_layers=1, vocab_size=64))
    critic = ppo.Critic(lm)
    pids, cids = torch.randint(1, 64, (2, 5)), torch.randint(1, 64, (2, 3))
    pmask, cmask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]]), torch.tensor([[1, 1, 0], [1, 1, 1]])
    mask = torch.cat([pmask, cmask], 1)
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    out = lm.model(input_ids=torch.cat([pids, cids], 1), attention_mask=mask, position_ids=pos, use_cache=False)
    h = out.last_hidden_state
    v = critic.value_head(lm.model.norm(h)).squeeze(-1)  # (B, P + C): the value after each position
    values = critic(pids, pmask, cids, cmask)
    assert values.shape == (2, 4) and torch.allclose(values, v[:, 4:], atol=1e-6)
    # GAE: the state before each completion token (MiniMind's newer prompt_len - 1 + t), 0 past the end
    assert torch.allclose(ppo.token_values(values, cmask), v[:, 4:7] * cmask, atol=1e-6)
    # note-era A = R - V: the state after the response's last real token (the last non-pad position)
    assert torch.allclose(ppo.last_index_values(values, cmask), torch.stack([v[0, 6], v[1, 7]]), atol=1e-6)
    hid, aux = completion_hidden(lm, pids, pmask, cids, cmask)
    assert torch.allclose(hid, h[:, 4:-1], atol=1e-6) and aux.shape == ()
    values.sum().backward()  # the critic's gradient reaches its value head and the shared decoder
    assert critic.value_head.weight.grad.abs().sum() > 0 and lm.model.layers[0].mlp.down_proj.weight.grad is not None


@pytest.mark.parametrize("mode", ["sequence", "gae"])
def test_ppo_value_head_init_mean_reward(tmp_path, mode):
    """--value_head_init mean_reward: on the first rollout the head is weight 0, bias = its mean
    reward, so every value is that mean and the first advantages are R - mean(R)."""
    seen = []

    class Spy(ppo.PPO):
        def score(self, b):  # spread rewards (the tiny random model earns none)
            return torch.linspace(0.5, 2.0, len(b["completion_ids"]))

        def advantages(self, b):
            out = super().advantages(b)
            seen.append((b["rewards"].clone(), {k: v.clone() for k, v in out.items()}, b["completion_mask"].clone(),
                         float(self.module.critic.value_head.bias.detach()),
                         float(self.module.critic.value_head.weight.detach().abs().max())))
            return out

    t = Spy(_cfg(ppo.PPOArgs, tmp_path, mode, ppo_mode=mode, max_steps=2, value_head_init="mean_reward",
                 critic_learning_rate=1e-3, mini_batch_size=2, ppo_update_iters=1, max_gen_len=6))
    t.fit()
    (r, out, mask, bias, w), (r2, _, _, bias2, w2) = seen[0], seen[1]
    assert bias == pytest.approx(float(r.mean()), abs=1e-6) and w == 0.0
    if mode == "sequence":
        assert torch.allclose(out["advantages"], r - r.mean(), atol=1e-5)
    else:  # V_t = mean(R) at every token: returns = R at the last token under gamma 1
        last = mask.sum(1) - 1
        assert torch.allclose(out["old_values"], r.mean() * mask.float(), atol=1e-5)
        assert torch.allclose(out["returns"].gather(1, last[:, None]).squeeze(1), r, atol=1e-5)
    assert bias2 != bias and w2 > 0 and bias2 != pytest.approx(float(r2.mean()), abs=1e-6)  # trained, not reset
    assert abs(bias2 - bias) < 0.01  # one critic step at lr 1e-3


def test_dpo_reward_margin_rises(tmp_path):
    res = dpo.DPO(_cfg(dpo.DPOArgs, tmp_path, "d", max_steps=8, lr=3e-3, per_device_train_batch_size=4,
                       max_seq_len=96)).fit()
    h = res["history"]
    assert h[0]["reward_margin"] == pytest.approx(0.0, abs=1e-6)  # policy == reference at step 1
    assert h[-1]["reward_margin"] > 0.01 and h[-1]["loss"] < h[0]["loss"]



def _ddp_worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    res = grpo.GRPO(_cfg(grpo.GRPOArgs, pathlib.Path(out), "ddp", num_generations=2, max_steps=2)).fit()
    pathlib.Path(out, f"rank{rank}.json").write_text(json.dumps([r["loss"] for r in res["history"]]))


def test_grpo_two_process_gloo_ddp_in_sync(tmp_path, two_ranks):
    two_ranks(_ddp_worker, str(tmp_path))
    l0 = json.loads((tmp_path / "rank0.json").read_text())
    l1 = json.loads((tmp_path / "rank1.json").read_text())
    assert l0 == l1 and len(l0) == 2
    assert (tmp_path / "out" / "grpo_32.pth").is_file()
