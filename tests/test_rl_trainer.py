"""The generic RL trainer (latentfast.train.rl): advantages, the policy's hidden states and
reference, the loss objects' validation, and latentfast-grpo / -dpo / -rloo end to end on a
tiny random HF model saved as a local folder (chat template, TRL dataset formats,
``module:function`` rewards)."""
import json
import math

import pytest
import torch

from latentfast.train.rl import advantages as A
from latentfast.train.rl.objectives import DPOLoss, GRPOLoss

pytestmark = pytest.mark.usefixtures("one_thread")


def digit_reward(prompts, completions, completion_ids, **kw):
    """A TRL-signature reward: share of digits in the completion (None for an empty one)."""
    assert "answer" in kw and len(kw["answer"]) == len(completions)  # the other columns arrive as keywords
    return [None if not c else sum(ch.isdigit() for ch in c) / len(c) for c in completions]


# ---------------------------------------------------------------- advantages
def trl_reference(r, G, scale):
    """TRL 1.16 GRPOTrainer's formula, written out per group."""
    out = []
    allr = [x for x in r if not math.isnan(x)]
    mb = sum(allr) / len(allr)
    sb = math.sqrt(sum((x - mb) ** 2 for x in allr) / (len(allr) - 1))
    for g in range(0, len(r), G):
        grp = [x for x in r[g:g + G] if not math.isnan(x)]
        m = sum(grp) / len(grp)
        s = math.sqrt(sum((x - m) ** 2 for x in grp) / (len(grp) - 1)) if len(grp) > 1 else 0.0
        for x in r[g:g + G]:
            if math.isnan(x):
                out.append(0.0)
            elif scale == "none":
                out.append(x - m)
            else:
                out.append((x - m) / ((s if scale == "group" else sb) + 1e-4))
    return out


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_trl_group_zscore_matches_trl_formula(scale):
    r = [1.0, 0.0, 0.5, float("nan"), 2.0, 2.0, 2.0, 1.0]
    got = A.trl_group_zscore(torch.tensor(r), 4, scale)
    assert torch.allclose(got, torch.tensor(trl_reference(r, 4, scale)), atol=1e-5)
    assert got[3] == 0  # unscorable


def test_hrpo_and_minimind_estimators_are_the_named_ones():
    from latentfast.train import hrpo
    from latentfast.train.minimind import grpo as mm_grpo, ppo as mm_ppo, spo as mm_spo

    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 3.0, 1.0])
    assert torch.equal(hrpo.group_advantages(r, 3), A.trl_group_zscore(r, 3))
    g = r.view(-1, 3)
    z = ((g - g.mean(1, keepdim=True)) / (g.std(1, keepdim=True) + 1e-4)).clamp(-10, 10).reshape(-1)
    assert torch.allclose(A.minimind_group_batch_zscore(r, 3), (z - z.mean()) / (z.std() + 1e-8))
    # the MiniMind stages take theirs from train/rl/advantages.py (train/advantages.py is gone)
    assert mm_grpo.minimind_group_batch_zscore is A.minimind_group_batch_zscore
    assert mm_spo.SPOTracker is A.SPOTracker and mm_ppo.gae is A.gae


def test_rloo_baseline():
    r = torch.tensor([1.0, 0.0, 0.0, 2.0, 4.0, 6.0])
    want = [1 - 0, 0 - 0.5, 0 - 0.5, 2 - 5, 4 - 4, 6 - 3]
    assert torch.allclose(A.rloo_baseline(r, 3), torch.tensor(want))
    with pytest.raises(ValueError, match="num_generations"):
        A.rloo_baseline(r, 1)


# ---------------------------------------------------------------- loss objects: one place of validation
@pytest.mark.parametrize("kw, flag", [(dict(loss_type="ppo"), "--loss_type"),
                                      (dict(loss_type="luspo"), "--importance_sampling_level"),
                                      (dict(beta=-1.0), "--beta"), (dict(top_entropy_quantile=0.0),
                                                                     "--top_entropy_quantile"),
                                      (dict(loss_type="dr_grpo"), "--max_completion_length")])
def test_grpo_loss_validates(kw, flag):
    with pytest.raises(ValueError, match=flag):
        GRPOLoss(**kw)


def test_dpo_loss_validates():
    with pytest.raises(ValueError, match="--loss_type"):
        DPOLoss(loss_type="kto")
    with pytest.raises(ValueError, match="label_smoothing"):
        DPOLoss(loss_type="exo_pair")
    with pytest.raises(ValueError, match="--rpo_alpha"):
        DPOLoss(rpo_alpha=-1.0)


@pytest.mark.parametrize("argv, flag", [(["--loss_type", "luspo"], "--importance_sampling_level"),
                                        (["--num_generations", "3"], "--num_generations"),
                                        (["--reward_weights", "1", "2"], "--reward_weights"),
                                        (["--model_name_or_path", "/nonexistent"], "--model_name_or_path")])
def test_grpo_cli_errors_exit_2(argv, flag, capsys):
    from latentfast.train.rl.grpo import GRPOConfig

    with pytest.raises(SystemExit) as e:
        GRPOConfig.parse(argv)
    assert e.value.code == 2 and flag in capsys.readouterr().err


def test_every_engine_loss_type_is_a_grpo_choice():
    from latentfast.ops.objectives.grpo import LOSS_TYPES
    from latentfast.train.rl.grpo import GRPOConfig

    assert GRPOConfig.meta("loss_type")["choices"] == list(LOSS_TYPES)
    for lt in LOSS_TYPES:
        GRPOConfig(loss_type=lt, importance_sampling_level="sequence" if lt == "luspo" else "token")


# ---------------------------------------------------------------- policy: hidden states, head, reference
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from latentfast.models.local import load_causal_lm

    d = tmp_path_factory.mktemp("tiny_hf")
    tok, lm = load_causal_lm("tiny", "cpu")
    lm.save_pretrained(d)
    tok.save_pretrained(d)
    return str(d)


def test_completion_hidden_predicts_the_completion(tiny_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from latentfast.train.rl.policy import CausalLMPolicy

    lm = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    pol = CausalLMPolicy(lm, AutoTokenizer.from_pretrained(tiny_dir), reference=None)
    pid = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 10]])
    pm = (pid != 0).long()
    cid = torch.tensor([[11, 12, 13], [14, 15, 0]])
    cm = torch.tensor([[1, 1, 1], [1, 1, 0]])
    h, aux = pol.module(dict(prompt_ids=pid, prompt_mask=pm, completion_ids=cid, completion_mask=cm))
    W, b = pol.head()
    ids, mask = torch.cat([pid, cid], 1), torch.cat([pm, cm], 1)
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    logits = lm(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, 3:-1]
    mine = h @ W.T + (b if b is not None else 0)
    assert torch.allclose(mine[cm.bool()], logits[cm.bool()], atol=1e-4)
    assert float(aux) == 0.0


def test_lora_reference_is_the_base_with_the_adapter_off(tiny_dir):
    from transformers import AutoTokenizer

    from latentfast.train.rl.trainer import RLConfig, load_policy_model
    from latentfast.train.rl.policy import CausalLMPolicy

    cfg = RLConfig(model_name_or_path=tiny_dir, use_peft=True, lora_r=4, lora_target_modules=["q_proj", "v_proj"],
                   gradient_checkpointing=False)
    tok, lm = load_policy_model(cfg, torch.device("cpu"))
    for n, p in lm.named_parameters():
        if "lora_B" in n:
            p.data.normal_()  # a trained adapter
    pol = CausalLMPolicy(lm, tok, reference="adapter")
    batch = dict(prompt_ids=torch.tensor([[5, 6, 7]]), prompt_mask=torch.ones(1, 3, dtype=torch.long),
                 completion_ids=torch.tensor([[8, 9]]), completion_mask=torch.ones(1, 2, dtype=torch.long))
    with pol.reference() as ref:
        h_ref = ref(batch)[0]
    h_pol = pol.module(batch)[0]
    base = CausalLMPolicy(lm.get_base_model(), AutoTokenizer.from_pretrained(tiny_dir), reference=None)
    with lm.disable_adapter():
        h_base = base.module(batch)[0]
    assert not torch.allclose(h_ref, h_pol, atol=1e-3)
    assert torch.allclose(h_ref, h_base, atol=1e-6)
    assert sum(p.numel() for p in lm.parameters()) < 1.1 * sum(p.numel() for p in lm.get_base_model().parameters())


def test_copy_reference_keeps_its_own_head(tiny_dir):
    """Full fine-tuning (no LoRA): the reference's log-probs come from the frozen copy's lm_head,
    not the policy's, which moves with training (tied to the embeddings in small models)."""
    import copy

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from latentfast.ops.lm_head_engine import lm_head_logps
    from latentfast.train.rl.policy import CausalLMPolicy
    from latentfast.train.rl.trainer import RLTrainer

    lm = AutoModelForCausalLM.from_pretrained(tiny_dir)
    start = copy.deepcopy(lm).eval()
    pol = CausalLMPolicy(lm, AutoTokenizer.from_pretrained(tiny_dir), reference="copy")
    with torch.no_grad():
        pol.head()[0].add_(0.5 * torch.randn_like(pol.head()[0]))  # a trained policy head
    batch = dict(prompt_ids=torch.tensor([[5, 6, 7]]), prompt_mask=torch.ones(1, 3, dtype=torch.long),
                 completion_ids=torch.tensor([[8, 9]]), completion_mask=torch.ones(1, 2, dtype=torch.long))
    trainer = RLTrainer.__new__(RLTrainer)  # only the hooks' helpers: no run
    trainer.policy = pol
    trainer.amp = lambda: torch.enable_grad()
    got = trainer.reference_logps(batch)
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    want = torch.log_softmax(start(input_ids=ids).logits[:, 2:-1].float(), -1).gather(-1, ids[:, 3:, None])[..., 0]
    assert torch.allclose(got, want, atol=1e-4)
    assert not torch.equal(pol.reference_head()[0], pol.head()[0])
    with pol.reference() as ref:
        W, b = pol.head()
        wrong = lm_head_logps(ref(batch)[0], W, batch["completion_ids"], b, mask=batch["completion_mask"])[0]
    assert not torch.allclose(wrong, want, atol=1e-3)  # the policy's head would have been wrong


# ---------------------------------------------------------------- end to end
def _rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _metrics(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("extra", [[], ["--loss_type", "grpo", "--beta", "0.04", "--num_iterations", "2"]])
def test_grpo_cli_conversational_prompts(tiny_dir, tmp_path, extra):
    from latentfast.train.rl.grpo import main

    data = _rows(tmp_path / "p.jsonl", [{"prompt": [{"role": "user", "content": f"What is {i}+{i}?"}],
                                         "answer": str(2 * i)} for i in range(8)])
    out = tmp_path / "out"
    res = main(["--model_name_or_path", tiny_dir, "--dataset_name", data, "--reward_funcs",
                "tests.test_rl_trainer:digit_reward", "--use_peft", "--lora_r", "4", "--num_generations", "4",
                "--per_device_train_batch_size", "8", "--max_completion_length", "8", "--max_steps", "2",
                "--learning_rate", "1e-3", "--output_dir", str(out), "--logging_steps", "0", *extra])
    rows = _metrics(out)
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) and 0 <= r["reward"] <= 1 for r in rows)
    assert "rewards/digit_reward/mean" in rows[0] and 0 < rows[0]["rollout_s"] < rows[0]["step_s"]
    assert (out / "final" / "adapter_config.json").is_file()
    if "--num_iterations" in extra:  # step 2 replays step 1's round: old log-probs, the ratio moved
        assert rows[0]["ratio_mean"] == pytest.approx(1.0, abs=1e-5) and rows[1]["ratio_mean"] != 1.0
    assert res["total"] == 2


def test_grpo_resume_inside_a_generation_round_trains_on_the_saved_round(tiny_dir, tmp_path):
    """num_iterations=2: step 2 replays step 1's round. A run resumed from checkpoint-1 must take
    that round (completions, advantages, old log-probs) from the checkpoint, not roll out anew."""
    import shutil

    from safetensors.torch import load_file

    from latentfast.train.rl.grpo import main

    data = _rows(tmp_path / "p.jsonl", [{"prompt": f"{i}+{i}=", "answer": str(2 * i)} for i in range(8)])
    args = ["--model_name_or_path", tiny_dir, "--dataset_name", data, "--num_generations", "4",
            "--reward_funcs", "tests.test_rl_trainer:digit_reward", "--per_device_train_batch_size", "8",
            "--max_completion_length", "8", "--max_steps", "2", "--num_iterations", "2", "--learning_rate", "1e-3", "--use_peft", "--lora_r", "4",
            "--save_steps", "1", "--logging_steps", "0"]
    whole, part = tmp_path / "whole", tmp_path / "part"
    main([*args, "--output_dir", str(whole)])
    part.mkdir()
    shutil.copytree(whole / "checkpoint-1", part / "checkpoint-1")
    main([*args, "--output_dir", str(part), "--resume_from_checkpoint", "latest"])
    a, b = (load_file(str(d / "checkpoint-2" / "model.safetensors")) for d in (whole, part))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (whole / "checkpoint-1" / "rank_state_0.safetensors").is_file()
    assert _metrics(part)[-1]["ratio_mean"] == pytest.approx(_metrics(whole)[-1]["ratio_mean"], abs=1e-6) != 1.0


def test_rloo_cli(tiny_dir, tmp_path):
    from latentfast.train.rl.rloo import main

    out = tmp_path / "out"
    main(["--model_name_or_path", tiny_dir, "--dataset_name", "arithmetic", "--num_generations", "4",
          "--per_device_train_batch_size", "8", "--max_completion_length", "6", "--max_steps", "1",
          "--output_dir", str(out), "--logging_steps", "0", "--use_peft", "--lora_r", "4"])
    assert math.isfinite(_metrics(out)[0]["loss"])


def test_dpo_cli_formats_and_precomputed_reference(tiny_dir, tmp_path):
    from latentfast.train.rl.dpo import DPO, DPOConfig

    rows = [{"prompt": f"Q{i}:", "chosen": f" right {i}", "rejected": f" wrong {i} !"} for i in range(3)]
    rows += [{"chosen": [{"role": "user", "content": f"say {i}"}, {"role": "assistant", "content": str(i)}],
              "rejected": [{"role": "user", "content": f"say {i}"}, {"role": "assistant", "content": "no"}]}
             for i in range(3)]
    data = _rows(tmp_path / "pairs.jsonl", rows)
    losses = {}
    for pre in (False, True):
        out = tmp_path / f"out{pre}"
        cfg = DPOConfig.parse(["--model_name_or_path", tiny_dir, "--dataset_name", data, "--use_peft", "--lora_r",
                               "4", "--per_device_train_batch_size", "2", "--max_steps", "3", "--learning_rate",
                               "1e-2", "--output_dir", str(out), "--logging_steps", "0",
                               "--precompute_ref_log_probs", str(pre), "--rpo_alpha", "0.5"])
        DPO(cfg).fit()
        losses[pre] = [r["loss"] for r in _metrics(out)]
    assert losses[False][0] == pytest.approx(losses[True][0], rel=1e-5)  # same reference either way
    assert losses[False] == pytest.approx(losses[True], rel=1e-4)
    assert losses[False][2] < losses[False][0] or losses[False][1] < losses[False][0]


# ---------------------------------------------------------------- latentfast-hrpo takes every engine loss type
def test_hrpo_loss_type_takes_every_engine_type(capsys):
    from latentfast.ops.objectives.grpo import LOSS_TYPES
    from latentfast.train import hrpo

    assert hrpo.HRPOConfig.meta("loss_type")["choices"] == list(LOSS_TYPES)
    for lt in LOSS_TYPES:
        hrpo.parse_args(["--loss_type", lt] + (["--importance_sampling_level", "sequence"] if lt == "luspo" else []))
    with pytest.raises(SystemExit) as e:  # validated by the one loss object
        hrpo.parse_args(["--loss_type", "luspo"])
    assert e.value.code == 2 and "--importance_sampling_level" in capsys.readouterr().err


@pytest.mark.parametrize("extra", [["--loss_type", "cispo", "--gradient_accumulation_steps", "2"],
                                   ["--loss_type", "luspo", "--importance_sampling_level", "sequence"]])
def test_hrpo_runs_new_loss_types(tmp_path, extra):
    from latentfast.train import hrpo

    argv = ["--sft_steps", "2", "--max_steps", "1", "--per_device_train_batch_size", "8", "--group_size", "4",
            "--max_completion_length", "8", "--eval_size", "4", "--save_steps", "0", "--seed", "3"]
    res = hrpo.main(argv + extra + ["--output_dir", str(tmp_path / "run")])
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    step = [r for r in rows if "reward" in r][0]
    assert math.isfinite(step["loss"]) and math.isfinite(res["trainable_checksum"])
