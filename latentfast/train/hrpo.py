"""HRPO: GRPO training of hybrid latent reasoning (seed notes 000/001).

    latentfast-hrpo                                   # embedded demo: tiny model + SFT warm-up + HRPO
    python -m latentfast.train.hrpo --model_name /models/Qwen2.5-1.5B-Instruct --train_data gsm8k/train.jsonl
    torchrun --nproc_per_node 8 -m latentfast.train.hrpo --model_name ... [--fsdp]
    # two-stage schedule from the recipe: freeze the projection, then unfreeze it
    latentfast-hrpo --lr_thinking_projection 0 ...
    latentfast-hrpo --resume_from_checkpoint runs/hrpo/checkpoint-250 --lr_thinking_projection 5e-5 ...

Arguments and defaults are the recipe's (hrpo_gsm8k.py); ``--task`` picks the recipe's task
(gsm8k, math, mmlu, mmlu_stem, arc_c, openbookqa, qasc, rag: ``latentfast.data.tasks``),
prompts go through the tokenizer's chat template with the recipe's system prompt, and the
reward is the recipe's (``--reward_funcs hrpo``). Checkpoints record their model, so
``latentfast-hrpo-eval --checkpoint_path <dir>`` evaluates them. With no ``--model_name`` the
embedded demo runs: a small Qwen2 model built from a config and a tokenizer built in
code, a short supervised warm-up on the synthetic arithmetic task, then HRPO; demo
presets (printed at start) replace the defaults of the arguments you do not set.
"""
from __future__ import annotations

import argparse
import json
import math
import pathlib
import random
import time
import warnings

import torch
from tqdm.auto import tqdm

from latentfast.data import get_reward_funcs, make_arithmetic
from latentfast.data import prompts as prompting
from latentfast.data.tasks import TASKS, get_task, load_task_rows
from latentfast.eval import hrpo as hrpo_eval
from latentfast.models import HybridConfig, HybridThinkingLM, eos_token_ids, generate

from . import checkpoint, dist
from .common import (JsonlLogger, SampleStream, amp_context, check_data_arg, check_resume_arg, console_entry,
                     load_causal_lm, no_sync_unless, optimizer_step, parse_with_demo, peak_mem_mb, reset_peak_mem)
from .guard import NonFiniteGuard

DEMO_MODEL = "tiny"
# Small-model presets for the embedded demo (only for arguments not given explicitly).
DEMO_PRESET = dict(lr=5e-4, lora_rank=16, lr_residual_gate=5e-4, lr_residual_Lambda=1e-3, lr_thinking_projection=5e-4,
                   beta=0.005, group_size=8, per_device_train_batch_size=64, gradient_accumulation_steps=1,
                   temperature=1.0, max_prompt_length=96, max_completion_length=28, max_steps=400, warmup_ratio=0.05,
                   max_grad_norm=1.0, train_data="synthetic", eval_data="synthetic", eval_size=256, eval_steps=100,
                   sft_steps=250, save_steps=100,
                   system_prompt="")  # the tiny tokenizer's chat template, without the 132-token system turn


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    # --- the recipe's arguments (hrpo_gsm8k.py) ---
    a("--model_name", default=DEMO_MODEL, help="local HF model path; 'tiny' = embedded demo")
    a("--lora_rank", type=int, default=32, help="LoRA rank (alpha = 2*rank, q/k/v/o/gate/up/down); 0 = full")
    a("--lr", type=float, default=5e-6)
    a("--beta", type=float, default=0.005, help="KL coefficient (reference = adapters disabled)")
    a("--residual_r_min", type=float, default=0.99)
    a("--residual_r_max", type=float, default=0.999)
    a("--lr_residual_gate", type=float, default=1e-4)
    a("--lr_residual_Lambda", type=float, default=1e-3)
    a("--lr_thinking_projection", type=float, default=1e-4, help="0 freezes the projection (two-stage schedule)")
    a("--weight_decay", type=float, default=0.1)
    a("--warmup_ratio", type=float, default=0.1)
    a("--lr_scheduler_type", default="cosine", choices=["cosine", "linear", "constant"])
    a("--optimizer", default="adamw_torch", help="adamw_torch, or paged_adamw_8bit (needs bitsandbytes)")
    a("--max_grad_norm", type=float, default=0.1)
    a("--group_size", type=int, default=4)
    a("--temperature", type=float, default=0.5)
    a("--top_p", type=float, default=1.0)
    a("--gradient_accumulation_steps", type=int, default=4)
    a("--per_device_train_batch_size", type=int, default=8, help="completions per device per micro-batch")
    a("--max_prompt_length", type=int, default=1024)
    a("--max_completion_length", type=int, default=1024)
    a("--seed", type=int, default=42)
    a("--loss_type", default="grpo", choices=["grpo", "bnpo", "dr_grpo", "dapo"])
    a("--epsilon_low", type=float, default=0.2)
    a("--epsilon_high", type=float, default=0.2)
    a("--num_train_epochs", type=float, default=1.0)
    a("--max_steps", type=int, default=-1, help="> 0 overrides num_train_epochs")
    a("--save_steps", type=int, default=250)
    a("--resume_from_checkpoint", default=None, help="checkpoint dir, or 'latest' in --output_dir")
    # --- HRPO model switches ---
    a("--thinking_state", default="projection", choices=["projection", "soft_embedding"])
    a("--projection", default="linear", choices=["linear", "layernorm", "mlp"])
    a("--recompute", default="stored", choices=["stored", "two_pass", "two_pass_clean"],
      help="stored = this design; two_pass = the recipe's extra no-grad forward (for comparison)")
    # --- data / eval / output ---
    a("--task", default="gsm8k", choices=sorted(TASKS), help="the recipe's task (data fields, prompt, reward)")
    a("--train_data", default=None, help="file/folder; default: --dataset_root's train split, else for gsm8k the "
                                         "shipped sample ('gsm8k_sample'); 'synthetic' = arithmetic")
    a("--eval_data", default=None, help="file/folder; default: --dataset_root's test split, else for gsm8k "
                                        "'gsm8k_sample_test'")
    a("--dataset_root", default=None, help="folder with the task's splits (the recipe's --dataset_root)")
    a("--system_prompt", default=None, help="default: the recipe's (chat template); '' = no system turn")
    a("--no_chat_template", action="store_true", help="plain 'Question: ...\\nAnswer:' prompts (base models)")
    a("--eval_size", type=int, default=100)
    a("--eval_steps", type=int, default=0, help="evaluate every N steps (0: only before and after)")
    a("--reward_funcs", nargs="+", default=["hrpo"],
      help="hrpo = the recipe's (correct AND exactly one ####); or the split correctness / format")
    a("--output_dir", default="runs/hrpo")
    a("--sft_steps", type=int, default=0, help="supervised warm-up steps before HRPO (demo)")
    a("--sft_lr", type=float, default=3e-3)
    a("--device", default=None)
    a("--bf16", action=argparse.BooleanOptionalAction, default=None, help="bf16 autocast (default: on for CUDA)")
    a("--fsdp", action="store_true", help="shard with PyTorch FSDP2 (torchrun)")
    a("--gradient_checkpointing", action="store_true",
      help="recompute decoder-layer activations in backward (less memory, ~1/3 more compute)")
    a("--wandb_project", default=None)
    a("--max_nonfinite_steps", type=int, default=10,
      help="stop after this many consecutive steps with a non-finite loss or gradient norm (each is skipped)")
    return p


def parse_args(argv=None):
    parser = build_parser()
    args = parse_with_demo(parser, argv, "model_name", DEMO_MODEL, DEMO_PRESET)
    validate_args(parser, args)
    return args


def validate_args(parser, args) -> None:
    """The common mistakes, reported at argument parsing with the flag's name."""
    if args.group_size < 1:
        parser.error(f"--group_size must be >= 1, got {args.group_size}")
    if args.per_device_train_batch_size % args.group_size:
        parser.error(f"--per_device_train_batch_size ({args.per_device_train_batch_size}) must be a multiple of "
                     f"--group_size ({args.group_size})")
    if args.group_size == 1:
        warnings.warn("--group_size 1: a group of one completion has no spread, so every group-normalised "
                      "advantage is 0 and only the KL term (--beta) trains; use --group_size >= 2 for GRPO",
                      UserWarning, stacklevel=3)
    for flag, spec in (("--train_data", args.train_data), ("--eval_data", args.eval_data)):
        if args.task == "gsm8k":
            check_data_arg(parser, flag, spec)
        elif spec is not None and not pathlib.Path(spec).exists():  # rows are checked by the task's loader
            parser.error(f"{flag} {spec!r}: no such file or folder (task {args.task}: expected "
                         f"{TASKS[args.task].doc})")
    if args.dataset_root is not None and not pathlib.Path(args.dataset_root).is_dir():
        parser.error(f"--dataset_root {args.dataset_root!r}: no such folder")
    check_resume_arg(parser, args.resume_from_checkpoint)


# ----------------------------------------------------------------------------- data
def encode_prompts(tok, rows, max_len, device, args):
    return prompting.encode_prompts(tok, [r["question"] for r in rows], max_len, device, args.system_prompt,
                                    False if args.no_chat_template else None)


def decode_completions(tok, rollout) -> list[str]:
    ids = rollout.completion_ids.masked_fill(rollout.completion_mask == 0, tok.pad_token_id)
    return tok.batch_decode(ids.tolist(), skip_special_tokens=True)


def group_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(r - mean_group) / (std_group + 1e-4), TRL's GRPO normalisation. A group of one has no
    spread (its sample std is NaN): its advantage is 0, never NaN."""
    g = rewards.view(-1, group_size)
    std = g.std(1, keepdim=True) if group_size > 1 else torch.zeros_like(g)
    return ((g - g.mean(1, keepdim=True)) / (std + 1e-4)).view(-1)


# ----------------------------------------------------------------------------- model
def load_model(args, device):
    """(tokenizer, HF causal LM, warmed up?). The demo builds both in code."""
    base = pathlib.Path(args.output_dir) / "base_model"
    if args.demo and (base / "config.json").exists():  # resumed demo: reuse the warmed-up base
        from transformers import AutoModelForCausalLM

        from latentfast.data import build_tokenizer
        from latentfast.models.local import from_local

        tok = build_tokenizer()
        return tok, from_local(AutoModelForCausalLM, base).to(device), True
    # fp32 master weights under bf16 autocast (as codi.py and HF Trainer's --bf16): AdamW steps on
    # bf16 weights lose most updates; only a frozen LoRA base may stay bf16
    use_bf16 = args.bf16 if args.bf16 is not None else device.type == "cuda"
    dtype = torch.bfloat16 if (args.lora_rank > 0 and use_bf16 and not args.demo) else torch.float32
    tok, lm = load_causal_lm(args.model_name, device, dtype=dtype, seed=args.seed)
    return tok, lm, not args.demo


def sft_warmup(lm, tok, args, device, rank):
    """Teacher-forced cross-entropy on the answers (the demo's tiny model starts random)."""
    rows = make_arithmetic(20000, seed=args.seed + 7)
    opt = torch.optim.AdamW(lm.parameters(), lr=args.sft_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20)
                                              * 0.5 * (1 + math.cos(math.pi * s / args.sft_steps)))
    rng = random.Random(args.seed)  # same batches on every rank -> identical weights without a sync
    lm.train()
    bar = tqdm(range(args.sft_steps), desc="sft warm-up", disable=rank != 0)
    guard = NonFiniteGuard(args.max_nonfinite_steps, "sft warm-up")
    for step in bar:
        batch = rng.sample(rows, 64)
        prompts = [prompting.render_prompt(tok, r["question"], args.system_prompt,
                                           False if args.no_chat_template else None) for r in batch]
        full = [p + r["answer"] + tok.eos_token for p, r in zip(prompts, batch)]
        tok.padding_side = "right"
        enc = tok(full, return_tensors="pt", padding=True).to(device)
        plen = [len(tok(p)["input_ids"]) for p in prompts]
        labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
        for i, n in enumerate(plen):
            labels[i, :n] = -100  # loss on the answer only
        loss = lm(input_ids=enc.input_ids, attention_mask=enc.attention_mask, labels=labels).loss
        loss.backward()
        optimizer_step(lm.parameters(), opt, sched, 1.0, guard=guard, loss=loss, step=step + 1)
        bar.set_postfix(loss=f"{loss.item():.3f}")


def optimizer_groups(model, args) -> list[dict]:
    """The recipe's groups (patch.py): decay / no-decay / gates / Lambda / projection."""
    def special(n):
        return "thinking_residual" in n or "thinking_projection" in n

    def decays(n, p):
        return p.dim() >= 2 and not n.endswith("bias") and "norm" not in n.lower()

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        dict(params=[p for n, p in named if not special(n) and decays(n, p)], lr=args.lr, weight_decay=args.weight_decay),
        dict(params=[p for n, p in named if not special(n) and not decays(n, p)], lr=args.lr, weight_decay=0.0),
        dict(params=[p for n, p in named if "thinking_residual_gate" in n], lr=args.lr_residual_gate,
             weight_decay=args.weight_decay),
        dict(params=[p for n, p in named if "thinking_residual_Lambda" in n], lr=args.lr_residual_Lambda,
             weight_decay=0.0),
        dict(params=[p for n, p in named if "thinking_projection" in n], lr=args.lr_thinking_projection,
             weight_decay=args.weight_decay),
    ]
    return [g for g in groups if g["params"]]


def make_optimizer(groups, args):
    if args.optimizer == "paged_adamw_8bit":
        try:
            import bitsandbytes as bnb

            return bnb.optim.PagedAdamW8bit(groups)
        except ImportError:
            print("[hrpo] bitsandbytes not installed: using torch AdamW", flush=True)
    return torch.optim.AdamW(groups, betas=(0.9, 0.99))


def make_scheduler(opt, args, total):
    warm = max(1, int(args.warmup_ratio * total))

    def f(s):
        if s < warm:
            return (s + 1) / warm
        if args.lr_scheduler_type == "constant":
            return 1.0
        t = (s - warm) / max(1, total - warm)
        return 0.5 * (1 + math.cos(math.pi * t)) if args.lr_scheduler_type == "cosine" else 1 - t
    return torch.optim.lr_scheduler.LambdaLR(opt, f)


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def projection_weight(model):
    proj = model.thinking.projection
    if proj is None:
        return None
    if hasattr(proj, "weight"):  # (PEFT resolves .weight to the trainable copy)
        return proj.weight
    mats = [p for p in proj.parameters() if p.dim() == 2]  # LayerNorm/MLP variants: first matrix
    return next((p for p in mats if p.requires_grad), mats[0])


# ----------------------------------------------------------------------------- loop
def evaluate(model, wrapped, tok, rows, args, amp) -> dict:
    """Greedy hybrid decoding of ``rows``, split across ranks: ``latentfast.eval.hrpo``'s
    metrics (accuracy, reward, format, ...), as ``latentfast-hrpo-eval`` computes them."""
    metrics, _ = hrpo_eval.evaluate(model, tok, args.task, rows, max_prompt_length=args.max_prompt_length,
                                    max_new_tokens=args.max_completion_length, batch_size=64, greedy=True,
                                    temperature=args.temperature, system_prompt=args.system_prompt,
                                    chat_template=False if args.no_chat_template else None, amp=amp,
                                    gathered=lambda: dist.gathered(wrapped))
    return metrics


def main(argv=None):
    args = parse_args(argv)
    device, rank, world = dist.setup(args.device)
    if args.demo and device.type == "cpu":
        torch.set_num_threads(1)  # tiny shapes: more intra-op threads only contend (much slower on a busy box)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    amp = amp_context(device, args.bf16)
    out = pathlib.Path(args.output_dir)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if args.demo:
            print("[hrpo] embedded demo; presets: " + json.dumps({k: getattr(args, k) for k in DEMO_PRESET}),
                  flush=True)

    tok, lm, warmed = load_model(args, device)
    prompting.prepare_tokenizer(tok)
    task = get_task(args.task)
    if args.sft_steps > 0 and not warmed:
        sft_warmup(lm, tok, args, device, rank)
        if rank == 0 and args.demo:
            lm.save_pretrained(str(out / "base_model"))  # resume needs the warmed-up base
    torch.manual_seed(args.seed)  # identical thinking-module init on every rank
    cfg = HybridConfig(thinking_state=args.thinking_state, projection=args.projection,
                       r_min=args.residual_r_min, r_max=args.residual_r_max)
    model = HybridThinkingLM(lm, cfg)
    if args.lora_rank > 0:
        model.add_lora(args.lora_rank)
    elif args.beta != 0.0:
        raise SystemExit("--beta > 0 needs a reference policy: use --lora_rank > 0 (adapters disabled = reference)")
    if args.gradient_checkpointing:
        model.enable_activation_checkpointing()
    if args.lr_thinking_projection == 0:  # stage 1 of the two-stage schedule: projection frozen
        for n, p in model.named_parameters():
            if "thinking_projection" in n:
                p.requires_grad_(False)
    wrapped = dist.wrap(model, device, args.fsdp, layers=list(model.transformer.layers))
    model = dist.unwrap(wrapped)
    proj_w = projection_weight(model)  # after wrapping: FSDP2 replaces parameters
    groups = optimizer_groups(model, args)
    opt = make_optimizer(groups, args)

    train_rows = load_task_rows(task, args.train_data, "train", None, args.seed, args.dataset_root)
    eval_rows = load_task_rows(task, args.eval_data, "test", args.eval_size, args.seed + 10_000, args.dataset_root)
    stream = SampleStream(train_rows, args.seed)
    ppm = args.per_device_train_batch_size // args.group_size  # prompts per micro-batch
    per_step = ppm * args.gradient_accumulation_steps * world
    total = args.max_steps if args.max_steps > 0 else max(1, int(args.num_train_epochs * len(train_rows) / per_step))
    sched = make_scheduler(opt, args, total)
    marker_ids = tok.encode(cfg.answer_marker, add_special_tokens=False)
    eos_ids = eos_token_ids(tok, model.hf_model)
    reward_fns = get_reward_funcs(args.reward_funcs, task)
    demo_base = args.demo and (warmed or args.sft_steps > 0)  # the demo's warmed-up base, saved in output_dir
    spec = hrpo_eval.hrpo_spec(args, str((out / "base_model").resolve()) if demo_base else args.model_name)

    start = 0
    guard = NonFiniteGuard(args.max_nonfinite_steps, "hrpo")
    resume = checkpoint.latest(args.output_dir) if args.resume_from_checkpoint == "latest" else args.resume_from_checkpoint
    w0 = None if proj_w is None else _full(proj_w).detach().float().clone()
    if resume:
        target = [g["initial_lr"] for g in opt.param_groups]  # this run's lrs (e.g. projection unfrozen)
        saved = json.loads((pathlib.Path(resume) / "trainer_state.json").read_text())
        same_groups = len(saved["param_groups"]) == len(opt.param_groups)
        state = checkpoint.load(resume, wrapped, opt if same_groups else None, sched)
        start = state["step"]
        guard.load_state_dict(state["extra"].get("nonfinite", {}))
        sched.base_lrs = target
        for g, lr in zip(opt.param_groups, target):
            g["initial_lr"], g["lr"] = lr, lr * sched.lr_lambdas[0](sched.last_epoch)
        if rank == 0:
            note = "" if same_groups else " (optimizer groups changed: fresh optimizer state)"
            print(f"[hrpo] resumed from {resume} at step {start}{note}", flush=True)
    wandb = None
    if args.wandb_project and rank == 0:
        import wandb

        wandb.init(project=args.wandb_project, config=vars(args))
    log = JsonlLogger(out / "metrics.jsonl", enabled=rank == 0)

    def record(row):
        log.log(row)
        if wandb is not None:  # (rank 0 only, as the metrics file)
            wandb.log(row, step=row.get("step"))

    def held_out():
        m = evaluate(model, wrapped, tok, eval_rows, args, amp)
        return {f"eval_{k}": v for k, v in m.items() if isinstance(v, (int, float))}

    ev0 = held_out()
    acc0 = ev0["eval_accuracy"]
    record({"step": start, **ev0})
    if rank == 0:
        print(f"[hrpo] step {start}: held-out accuracy {acc0:.3f} (reward {ev0['eval_reward']:.3f}, "
              f"format {ev0['eval_format']:.3f})", flush=True)

    params = [p for g in opt.param_groups for p in g["params"]]  # (also for the checksum of a finished run)
    gen = torch.Generator(device=device).manual_seed(args.seed * 1000 + rank)
    bar = tqdm(range(start, total), desc="hrpo", disable=rank != 0, initial=start, total=total)
    for step in bar:
        reset_peak_mem(device)
        gen.manual_seed(args.seed * 100003 + step * 1009 + rank)  # resumable sampling
        t0 = time.perf_counter()
        # 1) rollouts for every micro-batch (no grad), rewards, advantages, reference log-probs
        micro, stats = [], {"reward": [], "accuracy": [], "completion_length": [], "thinking_fraction": [],
                            "embeds_ratio": []}
        model.eval()
        for m in range(args.gradient_accumulation_steps):
            base = (step * args.gradient_accumulation_steps + m) * ppm * world + rank * ppm
            rows = [stream[base + i] for i in range(ppm)]
            rows_g = [r for r in rows for _ in range(args.group_size)]
            ids, mask = encode_prompts(tok, rows_g, args.max_prompt_length, device, args)
            with torch.no_grad(), amp(), dist.gathered(wrapped):
                ro = generate(model, ids, mask, args.max_completion_length, eos_token_id=eos_ids,
                              pad_token_id=tok.pad_token_id, marker_ids=marker_ids, temperature=args.temperature,
                              top_p=args.top_p, generator=gen)
                batch = ro.as_batch()
                ref = None
                if args.beta != 0.0:
                    with model.reference():
                        ref = model.per_token_logps(batch)
            texts = decode_completions(tok, ro)
            answers = [r["answer"] for r in rows_g]
            rewards = torch.tensor([sum(v) for v in zip(*[fn(texts, answers) for fn in reward_fns])],
                                   device=device, dtype=torch.float32)
            micro.append((batch, group_advantages(rewards, args.group_size), ref))
            lens = ro.completion_mask.sum(1).float()
            stats["reward"].append(rewards.mean().item())
            stats["accuracy"].append(sum(task.accuracy(texts, answers)) / len(texts))
            stats["completion_length"].append(lens.mean().item())
            stats["thinking_fraction"].append((ro.thinking_mask.sum() / lens.sum().clamp(min=1)).item())
            if ro.embeds_ratio.numel():
                stats["embeds_ratio"].append(ro.embeds_ratio.mean().item())
            stats.setdefault("reward_std", []).append(rewards.std().item())
        t_roll = time.perf_counter() - t0
        n_tokens = sum(int(b["prompt_mask"].sum() + b["completion_mask"].sum()) for b, _, _ in micro)
        n_items = None
        if args.loss_type == "dapo":  # the op's convention: completion tokens of the whole step, all ranks and
            # micro-batches (it divides by world itself; micro-batch losses then add up to one token-mean)
            t = torch.tensor(sum(int(b["completion_mask"].sum()) for b, _, _ in micro), device=device,
                             dtype=torch.int64)
            if world > 1:
                torch.distributed.all_reduce(t)
            n_items = int(t.item())
        ga_scale = 1 if n_items is not None else args.gradient_accumulation_steps  # dapo: already normalised

        # 2) policy-gradient step over the micro-batches
        model.train()
        t1 = time.perf_counter()
        loss_kw = dict(beta=args.beta, epsilon_low=args.epsilon_low, epsilon_high=args.epsilon_high,
                       loss_type=args.loss_type, max_completion_length=args.max_completion_length)
        if n_items is not None:
            loss_kw["num_items_in_batch"] = n_items
        losses, lmetrics = [], {}
        for m, (batch, adv, ref) in enumerate(micro):
            with no_sync_unless(wrapped, m == len(micro) - 1), amp():
                loss, met = wrapped(batch, adv, ref_per_token_logps=ref, recompute=args.recompute, loss_kwargs=loss_kw)
                (loss / ga_scale).backward()
            losses.append(loss.item())
            for k, v in met.items():
                lmetrics.setdefault(k, []).append(float(v))
        proj_grad = None
        if proj_w is not None and proj_w.grad is not None:
            proj_grad = _full(proj_w.grad).float().norm().item()
        step_loss = sum(losses) if n_items is not None else sum(losses) / len(losses)  # dapo: parts of one mean
        grad_norm = optimizer_step(params, opt, sched, args.max_grad_norm, guard=guard, loss=step_loss, step=step + 1)
        t_train = time.perf_counter() - t1

        row = {"step": step + 1, "loss": step_loss, "grad_norm": float(_full(grad_norm)),
               "lr": sched.get_last_lr()[0]}
        row.update({k: sum(v) / len(v) for k, v in stats.items() if v})
        row.update({k: sum(v) / len(v) for k, v in lmetrics.items()})
        if proj_w is not None:
            row["thinking_projection/weight_change"] = (_full(proj_w).detach().float() - w0).abs().mean().item()
            row["thinking_projection/grad_norm"] = proj_grad if proj_grad is not None else 0.0
        row = dist.all_mean(row, device)
        row["step"], row["skipped_nonfinite"] = step + 1, guard.skipped
        row["tokens_per_s"] = n_tokens * world / (t_roll + t_train)
        row["train_tokens_per_s"] = n_tokens * world / t_train
        row["rollout_s"], row["train_s"] = t_roll, t_train
        row["peak_mem_mb"] = peak_mem_mb(device)
        if args.eval_steps and (step + 1) % args.eval_steps == 0 and step + 1 < total:
            row.update(held_out())
        record(row)
        bar.set_postfix(reward=f"{row['reward']:.2f}", acc=f"{row['accuracy']:.2f}", kl=f"{row.get('kl', 0):.4f}")
        if args.save_steps and (step + 1) % args.save_steps == 0:
            checkpoint.save(args.output_dir, step + 1, wrapped, opt, sched, full=False,
                            extra={"nonfinite": guard.state_dict(), "hrpo": spec})

    ev1 = held_out()
    acc1 = ev1["eval_accuracy"]
    record({"step": total, **ev1})
    final = checkpoint.save(args.output_dir, total, wrapped, opt, sched, full=False,
                            extra={"nonfinite": guard.state_dict(), "hrpo": spec})
    if rank == 0:
        print(f"[hrpo] held-out accuracy {acc0:.3f} -> {acc1:.3f} (recipe reward {ev0['eval_reward']:.3f} -> "
              f"{ev1['eval_reward']:.3f}, format {ev0['eval_format']:.3f} -> {ev1['eval_format']:.3f}); "
              f"checkpoint {final}; metrics {out / 'metrics.jsonl'}", flush=True)
    log.close()
    # one number per rank over the trainable weights: DDP/FSDP ranks must agree
    checksum = sum(_full(p.detach()).double().abs().sum().item() for p in params)
    del wrapped, model, opt, sched, params, proj_w  # DDP/FSDP state holds the process group: release it first
    dist.cleanup()
    return {"eval_accuracy_before": acc0, "eval_accuracy_after": acc1, "eval_reward_before": ev0["eval_reward"],
            "eval_reward_after": ev1["eval_reward"], "trainable_checksum": checksum}


cli = console_entry(main)


if __name__ == "__main__":
    cli()
