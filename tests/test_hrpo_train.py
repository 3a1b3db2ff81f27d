"""HRPO trainer: a short CPU run (exact resume: test_trainer_resume.py), the recipe's optimizer groups, and a
2-process gloo DDP run whose ranks must stay in sync."""
import json
import os
import pathlib

import pytest
import torch
from safetensors.torch import load_file

from latentfast.train import demos, hrpo

pytestmark = pytest.mark.usefixtures("one_thread")


# A few seconds per run: tiny model, short warm-up, three small HRPO steps.
FAST = ["--sft_steps", "5", "--max_steps", "4", "--per_device_train_batch_size", "8", "--group_size", "4",
        "--max_completion_length", "12", "--eval_size", "8", "--save_steps", "2", "--seed", "3"]


def test_short_run_logs_metrics_and_checkpoints(tmp_path):
    out = tmp_path / "run"
    res = hrpo.main(FAST + ["--output_dir", str(out)])
    assert {"eval_accuracy_before", "eval_accuracy_after", "trainable_checksum"} <= res.keys()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "reward" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for key in ("loss", "reward", "reward_std", "accuracy", "kl", "clip_ratio_region", "completion_length",
                "embeds_ratio", "thinking_projection/weight_change", "thinking_projection/grad_norm",
                "tokens_per_s", "peak_mem_mb", "lr"):
        assert key in steps[-1], key
    assert steps[-1]["thinking_projection/weight_change"] > 0  # the projection trains
    assert any(r["thinking_projection/grad_norm"] > 0 for r in steps)
    ckpt = out / "checkpoint-4"
    assert (ckpt / "model.safetensors").exists() and (ckpt / "optimizer.safetensors").exists()
    names = load_file(str(ckpt / "model.safetensors")).keys()
    assert any("thinking_projection" in n for n in names) and any("lora_" in n for n in names)


def test_eval_size_zero_means_no_evaluation(tmp_path, monkeypatch):
    """--eval_size 0: no held-out rows loaded and no evaluation (it used to mean 20,000 rows)."""
    calls = []
    monkeypatch.setattr(hrpo.hrpo_eval, "evaluate", lambda *a, **k: calls.append(1))
    argv = ["--sft_steps", "0", "--max_steps", "1", "--per_device_train_batch_size", "4", "--group_size", "4",
            "--max_completion_length", "4", "--eval_size", "0", "--eval_steps", "1", "--save_steps", "0"]
    res = hrpo.main(argv + ["--output_dir", str(tmp_path / "run")])
    assert not calls and "eval_accuracy_after" not in res and "trainable_checksum" in res
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows and not any(k.startswith("eval_") for r in rows for k in r)


def test_gradient_checkpointing_trains_the_same_model(tmp_path):
    short = FAST[:FAST.index("--max_steps") + 1] + ["2"] + FAST[FAST.index("--max_steps") + 2:]
    plain = hrpo.main(short + ["--output_dir", str(tmp_path / "plain")])
    ckpt = hrpo.main(short + ["--output_dir", str(tmp_path / "ckpt"), "--gradient_checkpointing"])
    assert ckpt["trainable_checksum"] == pytest.approx(plain["trainable_checksum"], rel=1e-5)


def test_optimizer_groups_follow_the_recipe():
    args = hrpo.parse_args(["--model_name", "tiny", "--lr", "5e-6", "--lr_residual_gate", "1e-4",
                            "--lr_residual_Lambda", "1e-3", "--lr_thinking_projection", "1e-4"])
    from latentfast.data import build_tokenizer
    from latentfast.models import HybridThinkingLM, build_tiny_causal_lm

    m = HybridThinkingLM(build_tiny_causal_lm(build_tokenizer()))  # full model: norms fill the no-decay group
    groups = hrpo.optimizer_groups(m, args)
    assert [g["lr"] for g in groups] == [5e-6, 5e-6, 1e-4, 1e-3, 1e-4]
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0, 0.1, 0.0, 0.1]
    n_trainable = sum(1 for p in m.parameters() if p.requires_grad)
    assert sum(len(g["params"]) for g in groups) == n_trainable
    lora = hrpo.optimizer_groups(HybridThinkingLM(build_tiny_causal_lm(build_tokenizer())).add_lora(4), args)
    assert [g["lr"] for g in lora] == [5e-6, 1e-4, 1e-3, 1e-4]  # LoRA matrices all decay


def test_group_advantages():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    adv = hrpo.group_advantages(r, 4)
    assert adv[:4].sum().abs() < 1e-5 and adv[0] > 0 > adv[1]
    assert torch.all(adv[4:] == 0)  # no signal in a uniform group


@pytest.mark.parametrize("loss_type", hrpo.LOSS_TYPES)
def test_hrpo_objective_is_the_loss_the_model_used_to_compute(loss_type):
    """The loss left the model: HRPOConfig's objective on HybridThinkingLM's hidden states equals, bit for
    bit (values and gradients), the fused op as HybridThinkingLM.forward called it with the recipe's options."""
    from latentfast.data import build_tokenizer, format_prompt, make_arithmetic
    from latentfast.generation import generate
    from latentfast.models import HybridThinkingLM, build_tiny_causal_lm
    from latentfast.ops.grpo_loss import fused_linear_grpo_loss

    level = ["--importance_sampling_level", "sequence"] if loss_type == "luspo" else []
    c = hrpo.parse_args(["--loss_type", loss_type, "--max_completion_length", "12", "--beta", "0.04"] + level)
    tok = build_tokenizer()
    torch.manual_seed(0)
    m = HybridThinkingLM(build_tiny_causal_lm(tok)).add_lora(4)
    enc = tok([format_prompt(r["question"]) for r in make_arithmetic(4, seed=1)], return_tensors="pt", padding=True)
    ro = generate(m, enc.input_ids, enc.attention_mask, 12, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.pad_token_id, marker_ids=[tok.answer_marker_id], do_sample=True, temperature=1.0,
                  generator=torch.Generator().manual_seed(0))
    b = ro.as_batch()
    with m.reference():
        ref = m.per_token_logps(b) - 0.1
    old = m.per_token_logps(b) + 0.05 * torch.randn(b["completion_ids"].shape)
    adv, n = torch.randn(4), int(b["completion_mask"].sum())

    def run(new):
        m.zero_grad(set_to_none=True)
        if new:
            hidden, aux = m(b)
            loss, _ = c.objective()(hidden, m.lm_head_weight(), m.lm_head_bias(), b["completion_ids"],
                                    b["completion_mask"], adv, ref=ref, old=old, num_items_in_batch=n)
            loss = loss + aux
        else:
            hidden, _ = m.completion_hidden(b)
            loss, _ = fused_linear_grpo_loss(
                hidden, m.lm_head_weight(), b["completion_ids"], b["completion_mask"], adv, m.lm_head_bias(), ref,
                old, beta=c.beta, epsilon_low=c.epsilon_low, epsilon_high=c.epsilon_high, loss_type=c.loss_type,
                importance_sampling_level=c.importance_sampling_level, max_completion_length=c.max_completion_length,
                temperature=1.0, num_items_in_batch=n)
        loss.backward()
        return loss.detach(), {k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None}

    (l_new, g_new), (l_old, g_old) = run(True), run(False)
    assert torch.equal(l_new, l_old) and g_new.keys() == g_old.keys() and g_new
    for k in g_new:
        assert torch.equal(g_new[k], g_old[k]), k


def test_thinking_policy_is_an_rl_policy():
    """ThinkingLMPolicy: rollouts think until the marker (the engine with marker_ids), the module's forward
    gives the hidden states the head turns into the rollout's greedy tokens, and the reference is the
    adapters-disabled model (None without LoRA)."""
    from latentfast.data import build_tokenizer, format_prompt, make_arithmetic
    from latentfast.models import HybridThinkingLM, build_tiny_causal_lm
    from latentfast.train.rl.policy import Sampling
    from latentfast.train.rl.thinking import ThinkingLMPolicy

    tok = build_tokenizer()
    torch.manual_seed(0)
    m = HybridThinkingLM(build_tiny_causal_lm(tok)).add_lora(4).eval()
    policy = ThinkingLMPolicy(m, tok)
    assert policy.marker_ids == [tok.answer_marker_id] and tok.eos_token_id in policy.eos
    enc = tok([format_prompt(r["question"]) for r in make_arithmetic(3, seed=1)], return_tensors="pt", padding=True)
    ro = policy.rollout(enc.input_ids, enc.attention_mask, Sampling(10, do_sample=False))
    b = ro.as_batch()
    assert int(ro.thinking_mask.sum()) > 0 and ro.thinking_hidden.shape[0] == int(ro.thinking_mask.sum())
    hidden, aux = policy.module(b)
    W, bias = policy.head()
    keep = b["completion_mask"].bool()
    assert torch.equal((hidden @ W.T).argmax(-1)[keep], b["completion_ids"][keep]) and float(aux) == 0.0
    with torch.no_grad():
        start = policy.module(b)[0]
        for n, p in m.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))  # the policy moves away from its reference
    with policy.reference() as ref:
        h_ref, _ = ref(b)
        assert not torch.is_grad_enabled()
    torch.testing.assert_close(h_ref, start)  # LoRA B starts at 0 and HRPO's copies at the base's values
    assert not torch.allclose(h_ref, policy.module(b)[0])
    assert ThinkingLMPolicy(HybridThinkingLM(build_tiny_causal_lm(tok)), tok).reference() is None


def test_demo_presets_only_fill_unset_args(tmp_path):
    args = hrpo.parse_args(["--lr", "1e-5"])
    assert args.demo and args.lr == 1e-5 and args.group_size == demos.HRPO["group_size"]
    real = hrpo.parse_args(["--model_name", str(tmp_path)])  # a model folder (the parser checks it exists)
    assert not real.demo and real.lr == 5e-6 and real.lora_rank == 32 and real.beta == 0.005
    assert real.residual_r_min == 0.99 and real.temperature == 0.5 and real.group_size == 4
    # presets that differ from the defaults (the demo's group_size is the recipe's 4: it proves nothing)
    assert args.beta == demos.HRPO["beta"] != real.beta and args.sft_steps == demos.HRPO["sft_steps"] != real.sft_steps



def _worker(rank, world, port, argv, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    res = hrpo.main(argv)
    pathlib.Path(out, f"rank{rank}.json").write_text(json.dumps(res))


# plain DDP is covered by the dapo + accumulation case (the same code path, plus no_sync)
@pytest.mark.parametrize("extra", [["--fsdp"], ["--loss_type", "dapo", "--gradient_accumulation_steps", "2"]],
                         ids=["fsdp2", "ddp-dapo-ga2"])
def test_two_process_gloo_stays_in_sync(tmp_path, extra, two_ranks):
    argv = FAST + ["--output_dir", str(tmp_path / "run"), "--max_steps", "2"] + extra
    two_ranks(_worker, argv, str(tmp_path))
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert r0["trainable_checksum"] == pytest.approx(r1["trainable_checksum"], rel=1e-6)
    assert r0["eval_accuracy_after"] == r1["eval_accuracy_after"]  # all-reduced
    assert (tmp_path / "run" / "checkpoint-2" / "model.safetensors").exists()


@pytest.mark.cuda
def test_cuda_short_run_bf16(tmp_path):
    res = hrpo.main(FAST + ["--output_dir", str(tmp_path / "run"), "--device", "cuda"])
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-2]["peak_mem_mb"] > 0 and res["trainable_checksum"] > 0


def _early_stop_run(rank, out):
    from torch.distributed.fsdp import fully_shard

    from latentfast.data import build_tokenizer
    from latentfast.generation import generate
    from latentfast.models import HybridThinkingLM, build_tiny_causal_lm
    from latentfast.runtime import dist as tdist

    tok = build_tokenizer()
    model = HybridThinkingLM(build_tiny_causal_lm(tok, seed=0))
    for layer in model.transformer.layers:
        fully_shard(layer)
    fully_shard(model)
    ids = torch.tensor([[5, 6, 7, 8]]) + rank  # rank-dependent prompts
    mask = torch.ones_like(ids)
    kw = dict(pad_token_id=tok.pad_token_id, marker_ids=[1, 2], do_sample=False, check_every=1)
    with torch.no_grad(), tdist.gathered(model):
        first = generate(model, ids, mask, 1, eos_token_id=-1, **kw).completion_ids[0, 0].item()
        forwards = []
        hook = model.transformer.register_forward_pre_hook(lambda *_: forwards.append(1))
        # rank 0 finishes at its first token, rank 1 never: rank 0 must keep stepping
        ro = generate(model, ids, mask, 6, eos_token_id=first if rank == 0 else -1, **kw)
        hook.remove()
    pathlib.Path(out, f"rank{rank}.json").write_text(json.dumps(
        {"forwards": len(forwards), "steps": ro.completion_ids.shape[1], "length": int(ro.completion_mask.sum())}))


def _early_stop_worker(rank, world, port, out):
    import datetime
    import gc

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world,
                                         timeout=datetime.timedelta(seconds=60))
    try:
        _early_stop_run(rank, out)
    finally:
        # drop the FSDP modules (they hold the process group) before tearing it down, or
        # gloo's threads can outlive it and abort the process at exit
        gc.collect()
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def test_generate_early_stop_is_collective_under_fsdp(tmp_path, two_ranks):
    two_ranks(_early_stop_worker, str(tmp_path))
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    # prefill + 5 decode steps on both ranks; rank 0's padding-only steps are trimmed
    assert r0 == {"forwards": 6, "steps": 1, "length": 1}
    assert r1 == {"forwards": 6, "steps": 6, "length": 6}


@pytest.mark.parametrize("lora_rank,bf16,expected", [(0, None, torch.float32), (32, None, torch.bfloat16),
                                                      (32, False, torch.float32)])
def test_full_finetune_loads_fp32_master_weights(monkeypatch, tmp_path, lora_rank, bf16, expected):
    seen = {}
    monkeypatch.setattr(hrpo, "load_causal_lm", lambda name, device, dtype=None, seed=0: seen.update(dtype=dtype)
                        or ("tok", "lm"))
    args = hrpo.parse_args(["--model_name", str(tmp_path), "--lora_rank", str(lora_rank), "--output_dir",
                            str(tmp_path)] + ([] if bf16 is None else ["--no-bf16"]))
    hrpo.load_model(args, torch.device("cuda"))
    assert seen["dtype"] == expected


def test_checkpoint_load_rejects_a_different_model_layout(tmp_path):
    from latentfast.data import build_tokenizer
    from latentfast.models import HybridConfig, HybridThinkingLM, build_tiny_causal_lm
    from latentfast.runtime import checkpoint

    tok = build_tokenizer()

    def make(projection="linear", lora=4, freeze_projection=False):
        torch.manual_seed(0)
        m = HybridThinkingLM(build_tiny_causal_lm(tok, num_hidden_layers=1), HybridConfig(projection=projection))
        if lora:
            m.add_lora(lora)
        for n, p in m.named_parameters():
            if freeze_projection and "thinking_projection" in n:
                p.requires_grad_(False)
        return m

    def save(m, name):
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad])
        return checkpoint.save(str(tmp_path / name), 1, m, opt)

    full = save(make(), "full")
    checkpoint.load(full, make())  # same layout
    with pytest.raises(RuntimeError, match="does not match"):
        checkpoint.load(full, make(projection="mlp"))  # different projection
    with pytest.raises(RuntimeError, match="unexpected keys"):
        checkpoint.load(full, make(lora=0))  # LoRA on -> off
    stage1 = save(make(freeze_projection=True), "stage1")
    checkpoint.load(stage1, make())  # two-stage schedule: the frozen projection is unfrozen
    with pytest.raises(RuntimeError, match="missing trainable parameters"):
        checkpoint.load(stage1, make(projection="mlp"))
