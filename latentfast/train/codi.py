"""CODI hybrid explicit/implicit training (seed note 003).

    latentfast-codi                                    # embedded demo (tiny model, synthetic data)
    python -m latentfast.train.codi --model_name_or_path /models/Llama-3.2-1B-Instruct \\
        --hybrid_data_path data/hybrid_training/hybrid_training_data.json --output_dir checkpoints/hybrid_codi \\
        --num_train_epochs 5 --per_device_train_batch_size 4 --learning_rate 2e-5 \\
        --num_latent 6 --prj_dim 2048 --hybrid_cot_only_ratio 0.2 --bf16
    ... --restore_from ./CODI/pretrained/CODI-llama3.2-1b-Instruct   # continue from a CODI checkpoint
    torchrun --nproc_per_node 8 -m latentfast.train.codi ...
    ... --data_name icot --train_data gsm8k_aug.jsonl --use_lora True --lora_r 128 --lora_alpha 32 --lora_init \
        --distill_loss_div_std True --distill_loss_factor 20 --remove_eos True --max_token_num 200  # original CODI

The original CODI's flags (zhenyi4/codi train.py) keep its meanings and defaults
(distillation: every hidden state incl. the embeddings, smooth L1, no std division);
``--data_name`` reads its datasets from a local ``--train_data`` file (``codi_data.from_original``).

One model is both teacher (explicit CoT) and student (latent steps, see
``latentfast.models.codi``). Per sample, with probability ``--hybrid_cot_only_ratio``
the latent part is skipped (pure CoT: teacher CE only); otherwise the sample's
latent steps (from the phase-1 JSON of ``latentfast.train.codi_data``, or every step
for a plain GSM8K JSONL = original CODI) become latent blocks, and

    loss = CE(student) + distill_loss_factor * CODI distill + ref_loss_factor * CE(teacher)

The demo (no ``--model_name_or_path``) runs the whole pipeline on a tiny model: an
explicit-CoT warm-up (it stands in for the pretrained model), phase-1 entropies,
hybrid training, then ``latentfast.eval.adaptive`` in the three modes.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import random
import time

import torch
from tqdm.auto import tqdm

from latentfast.eval import adaptive
from latentfast.models.codi import CODIModel, encode_example, load_weights, prepare_tokenizer, split_batch
from latentfast.nn.codi import LOSS_TYPES

from . import checkpoint, codi_data, dist
from .common import (JsonlLogger, SampleStream, accumulate_grads, add_bool, amp_context, check_data_arg,
                     check_resume_arg, console_entry, load_causal_lm, load_rows, optimizer_step, parse_with_demo,
                     peak_mem_mb, reset_peak_mem, warmup_schedule)
from .guard import NonFiniteGuard

DEMO = "tiny"
DEMO_PRESET = dict(learning_rate=1e-3, per_device_train_batch_size=32, max_steps=200, warmup_ratio=0.05,
                   prj_dim=256, num_latent=3, sft_steps=200, hybrid_samples=1024, eval_size=100, save_steps=0,
                   logging_steps=25, max_new_tokens=40, train_data="synthetic", eval_data="synthetic",
                   distill_loss_factor=1.0, remove_eos=True)


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    # --- the recipe's arguments (phase2_train_compatible.py) ---
    a("--model_name_or_path", default=DEMO, help="local HF model path; 'tiny' = embedded demo")
    a("--hybrid_data_path", default=None, help="phase-1 JSON (latentfast.train.codi_data); default: --train_data")
    a("--output_dir", default="runs/codi")
    a("--num_train_epochs", type=float, default=5)
    a("--per_device_train_batch_size", type=int, default=4)
    a("--gradient_accumulation_steps", type=int, default=1)
    a("--learning_rate", type=float, default=2e-5)
    a("--warmup_ratio", type=float, default=0.1)
    a("--weight_decay", type=float, default=0.0)
    a("--lr_scheduler_type", default="cosine", choices=["cosine", "linear", "constant"])
    a("--max_grad_norm", type=float, default=2.0)
    a("--max_steps", type=int, default=-1, help="> 0 overrides num_train_epochs")
    a("--num_latent", type=int, default=6, help="latent steps per latent block")
    a("--prj_dim", type=int, default=2048)
    add_bool(p, "--use_prj", True, "latent projection (Linear-GELU-Linear-LayerNorm)")
    a("--prj_dropout", type=float, default=0.0)
    a("--distill_loss_factor", type=float, default=1.0)
    a("--ref_loss_factor", type=float, default=1.0)
    # --- the original CODI's flags (zhenyi4/codi train.py / src/model.py), its meanings and defaults ---
    a("--distill_loss_type", default="smooth_l1", choices=list(LOSS_TYPES),
      help="smooth_l1 / l2 (the original's) or l1")
    add_bool(p, "--distill_loss_div_std", False, "divide the distillation loss by the teacher's std (twice for l2)")
    a("--distill_layers", default="all",
      help="'all' (every hidden state incl. the embedding output, as the original) | 'blocks' | 'middle' | "
           "'last' | 'i,j,...'")
    a("--hybrid_cot_only_ratio", type=float, default=None,
      help="share of samples trained as pure explicit CoT (default 0.2; 0 with --data_name, as the original)")
    a("--restore_from", default=None, help="CODI checkpoint to start from (ours or original CODI weights)")
    a("--resume_from_checkpoint", default=None, help="checkpoint dir, or 'latest' in --output_dir")
    add_bool(p, "--use_lora", None, "LoRA adapters (True: rank --lora_r, default 128); default: --lora_rank decides")
    a("--lora_rank", "--lora_r", type=int, default=None, help="0 = full fine-tuning (default); CODI uses 128")
    a("--lora_alpha", type=int, default=16, help="the original's default 16 (its scripts pass 32)")
    add_bool(p, "--lora_init", None, "PEFT's zero/Gaussian LoRA init (the only one here; the original's "
             "False = LoftQ is not supported)")
    add_bool(p, "--remove_eos", False, "no <eos> after the question and before the answer (the original's scripts "
             "pass True; latentfast's eval decodes without them)")
    a("--max_token_num", type=int, default=1000, help="drop samples longer than this many tokens (question+CoT+answer)")
    a("--model_max_length", type=int, default=28000, help="the tokenizer's model_max_length (as the original)")
    a("--data_name", default=None, choices=sorted(codi_data.DATA_NAMES),
      help="the original's datasets, read from the local file --train_data: "
           + "; ".join(f"{k} = {v}" for k, v in codi_data.DATA_NAMES.items()))
    add_bool(p, "--include_last_cot", False, "keep the last CoT step (--data_name icot / icot-full)")
    add_bool(p, "--print_ref_model_stats", False, "log the teacher's probability of the first answer token")
    a("--seed", type=int, default=42)
    a("--bf16", action=argparse.BooleanOptionalAction, default=None, help="bf16 autocast (default: on for CUDA)")
    a("--device", default=None)
    # --- data / eval / logging ---
    a("--train_data", default="gsm8k", help="without --hybrid_data_path: JSONL path, 'gsm8k' sample or 'synthetic'"
      " (every step latent = original CODI); with --data_name: the local file of that dataset")
    a("--eval_data", default="gsm8k_test", help="JSONL path, 'gsm8k_test' sample, 'synthetic' or 'none'")
    a("--eval_size", type=int, default=100)
    a("--eval_modes", default="latent,explicit,adaptive")
    a("--max_new_tokens", type=int, default=256)
    a("--save_steps", type=int, default=500)
    a("--logging_steps", type=int, default=10)
    # --- demo only ---
    a("--sft_steps", type=int, default=0, help="explicit-CoT warm-up steps before phase 1 (demo)")
    a("--sft_lr", type=float, default=3e-3)
    a("--hybrid_samples", type=int, default=0, help="demo: phase-1 samples generated in-process")
    a("--max_nonfinite_steps", type=int, default=10,
      help="stop after this many consecutive steps with a non-finite loss or gradient norm (each is skipped)")
    return p


def parse_args(argv=None):
    parser = build_parser()
    args = parse_with_demo(parser, argv, "model_name_or_path", DEMO, DEMO_PRESET)
    if not args.data_name:  # with --data_name, codi_data.from_original checks the rows
        check_data_arg(parser, "--train_data", args.train_data)
    check_data_arg(parser, "--eval_data", args.eval_data, allowed=("none",))
    if args.hybrid_data_path is not None and not pathlib.Path(args.hybrid_data_path).is_file():
        parser.error(f"--hybrid_data_path {args.hybrid_data_path!r}: no such file")
    check_resume_arg(parser, args.resume_from_checkpoint)
    if args.data_name and not pathlib.Path(args.train_data).is_file():
        parser.error(f"--data_name {args.data_name} reads --train_data as a local file "
                     f"({codi_data.DATA_NAMES[args.data_name]}); not a file: {args.train_data!r}")
    if args.hybrid_cot_only_ratio is None:  # the original trains the student on every sample
        args.hybrid_cot_only_ratio = 0.0 if args.data_name else 0.2
    if args.use_lora is not None:  # the original's switch; --lora_r / --lora_rank give the rank
        args.lora_rank = (args.lora_rank or 128) if args.use_lora else 0
    args.lora_rank = args.lora_rank or 0
    if args.lora_rank < 0:
        parser.error(f"--lora_rank must be >= 0, got {args.lora_rank}")
    if args.lora_rank and args.lora_init is False:
        parser.error("--lora_init False (LoftQ adapters) is not supported: drop it or pass --lora_init")
    if args.max_token_num < 1:
        parser.error(f"--max_token_num must be >= 1, got {args.max_token_num}")
    return args


def make_batch(tok, samples, index0, args, device):
    """Encode samples; each one is pure CoT with probability hybrid_cot_only_ratio (seeded by
    its stream index, so a resumed run draws the same)."""
    exs, cot = [], []
    for j, s in enumerate(samples):
        pure = random.Random(args.seed * 7919 + index0 + j).random() < args.hybrid_cot_only_ratio
        latent = s.get("latent", [True] * len(s["steps"]))  # no phase-1 flags: original CODI
        if not any(latent):
            pure = True
        exs.append(encode_example(tok, s["question"], s["steps"], s["final"], None if pure else latent,
                                  args.num_latent, eos_delimiters=not args.remove_eos))
        cot.append(pure)
    batch, idx = split_batch(exs, cot, tok.pad_token_id)
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    return batch, idx.to(device)


def sft_warmup(model: CODIModel, tok, rows, args, device, rank, amp):
    """Explicit-CoT CE only (the demo's tiny model starts random; real runs start pretrained)."""
    opt = torch.optim.AdamW(model.codi.parameters(), lr=args.sft_lr, weight_decay=0.0)
    sched = warmup_schedule(opt, args.sft_steps, 0.05)
    rng = random.Random(args.seed)  # same batches on every rank -> identical weights without a sync
    model.train()
    bar = tqdm(range(args.sft_steps), desc="explicit CoT warm-up", disable=rank != 0)
    guard = NonFiniteGuard(args.max_nonfinite_steps, "explicit CoT warm-up")
    for step in bar:
        exs = [encode_example(tok, s["question"], s["steps"], s["final"]) for s in rng.sample(rows, 64)]
        batch, _ = split_batch(exs, [True] * len(exs), tok.pad_token_id)
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        with amp():
            loss, _ = model.teacher_forward(batch)
        loss.backward()
        optimizer_step(model.codi.parameters(), opt, sched, 1.0, guard=guard, loss=loss, step=step + 1)
        bar.set_postfix(ce=f"{loss.item():.3f}")


def load_samples(args, tok, model, device, rank, amp):
    if args.data_name:
        return codi_data.from_original(codi_data.read_rows(args.train_data), args.data_name, tok,
                                       args.max_token_num, args.include_last_cot)
    if args.hybrid_data_path:
        return codi_data.drop_long(codi_data.load_hybrid(args.hybrid_data_path), tok, args.max_token_num)
    rows = load_rows(args.train_data, None, args.seed)
    samples = codi_data.drop_long(codi_data.from_rows(rows), tok, args.max_token_num)
    if args.demo and args.hybrid_samples:
        # phase 1 in-process with the warmed-up model: entropy-guided + random hybrid samples
        saved = pathlib.Path(args.output_dir) / codi_data.OUTPUT_NAME
        if args.resume_from_checkpoint and saved.exists():  # the resumed run keeps its data
            return codi_data.load_hybrid(str(saved))
        sub = rows[:args.hybrid_samples]
        ents = codi_data.step_entropies(model.lm, tok, sub, 64, amp, progress=rank == 0)
        samples = codi_data.make_hybrid(sub, ents, seed=args.seed)
        if rank == 0:
            saved.write_text(json.dumps(samples, indent=1))
            print(f"[codi] phase 1 (in-process): {json.dumps(codi_data.summary(samples))} -> {saved}", flush=True)
    return samples


def main(argv=None):
    args = parse_args(argv)
    device, rank, world = dist.setup(args.device)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    amp = amp_context(device, args.bf16)
    out = pathlib.Path(args.output_dir)
    t_start = time.time()
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if args.demo:
            print("[codi] embedded demo; presets: " + json.dumps({k: getattr(args, k) for k in DEMO_PRESET}),
                  flush=True)

    # fp32 master weights under bf16 autocast (as HF Trainer's --bf16); a frozen LoRA base may stay bf16
    use_bf16 = args.bf16 if args.bf16 is not None else device.type == "cuda"
    dtype = torch.bfloat16 if (args.lora_rank and use_bf16) else torch.float32
    tok, lm = load_causal_lm(args.model_name_or_path, device, dtype=dtype, seed=args.seed)
    prepare_tokenizer(tok, lm)
    tok.model_max_length = args.model_max_length
    torch.manual_seed(args.seed)  # identical prj init on every rank
    model = CODIModel(lm, tok.bot_token_id, tok.eot_token_id, num_latent=args.num_latent, prj_dim=args.prj_dim,
                      use_prj=args.use_prj, prj_dropout=args.prj_dropout, distill_loss_factor=args.distill_loss_factor,
                      ref_loss_factor=args.ref_loss_factor, distill_layers=args.distill_layers,
                      distill_loss_type=args.distill_loss_type, distill_div_std=args.distill_loss_div_std,
                      ref_stats=args.print_ref_model_stats).to(device)
    if args.lora_rank:
        model.add_lora(args.lora_rank, args.lora_alpha)
    if args.restore_from:
        res = load_weights(model, args.restore_from)
        if rank == 0:
            print(f"[codi] restored {args.restore_from}: {len(res['loaded'])} keys loaded, {len(res['tied'])} tied, "
                  f"{len(res['fresh_lora'])} new LoRA adapters, {len(res['frozen'])} frozen kept from the base",
                  flush=True)
    if rank == 0:
        cfg = {k: getattr(args, k) for k in ("model_name_or_path", "num_latent", "prj_dim", "use_prj", "lora_rank",
                                             "lora_alpha", "remove_eos")}
        (out / "codi_config.json").write_text(json.dumps(cfg, indent=1))
    if args.demo and args.sft_steps and not args.resume_from_checkpoint:
        sft_warmup(model, tok, codi_data.from_rows(load_rows(args.train_data, None, args.seed + 1)), args, device,
                   rank, amp)

    samples = load_samples(args, tok, model, device, rank, amp)
    if not samples:
        raise ValueError("no training samples left (check --train_data / --data_name / --max_token_num)")
    if rank == 0 and not args.remove_eos and args.eval_data != "none":
        print("[codi] note: training with <eos> delimiters (--remove_eos False, the original's default); "
              "latentfast.eval.adaptive decodes without them -- pass --remove_eos True as the original's "
              "scripts do to evaluate in-process", flush=True)
    eval_rows = [] if args.eval_data == "none" else load_rows(args.eval_data, args.eval_size, args.seed + 10_000)
    B = args.per_device_train_batch_size
    per_step = B * args.gradient_accumulation_steps * world
    total = args.max_steps if args.max_steps > 0 else max(1, int(args.num_train_epochs * len(samples) / per_step))
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                            lr=args.learning_rate)
    sched = warmup_schedule(opt, total, args.warmup_ratio, args.lr_scheduler_type)
    wrapped = dist.wrap(model, device)
    start = 0
    guard = NonFiniteGuard(args.max_nonfinite_steps, "codi")
    resume = checkpoint.latest(args.output_dir) if args.resume_from_checkpoint == "latest" else args.resume_from_checkpoint
    if resume:
        state = checkpoint.load(resume, wrapped, opt, sched)
        start = state["step"]
        guard.load_state_dict(state["extra"].get("nonfinite", {}))
        if rank == 0:
            print(f"[codi] resumed from {resume} at step {start}", flush=True)
    log = JsonlLogger(out / "metrics.jsonl", enabled=rank == 0)
    modes = [m for m in args.eval_modes.split(",") if m]

    def run_eval(step, tag):
        res = []
        for m in modes:
            r = adaptive.evaluate(model, tok, eval_rows, m, 64, args.max_new_tokens, amp=amp, rank=rank, world=world)
            log.log({"step": step, "eval": tag, **r})
            res.append(r)
        return res

    stream = SampleStream(samples, args.seed)
    bar = tqdm(range(start, total), desc="codi", disable=rank != 0, initial=start, total=total)
    first = None
    for step in bar:
        reset_peak_mem(device)
        t0 = time.perf_counter()
        model.train()

        def micro_batches():  # (batch, student indices) per micro-batch
            for m in range(args.gradient_accumulation_steps):
                base = ((step * args.gradient_accumulation_steps + m) * world + rank) * B
                yield make_batch(tok, [stream[base + i] for i in range(B)], base, args, device)

        sums = accumulate_grads(wrapped, micro_batches(), args.gradient_accumulation_steps, amp)
        grad_norm = optimizer_step(params, opt, sched, args.max_grad_norm, guard=guard, loss=sums.get("loss"),
                                   step=step + 1)
        row = dist.all_mean(sums, device)
        row.update(step=step + 1, lr=sched.get_last_lr()[0], grad_norm=float(grad_norm),
                   step_s=time.perf_counter() - t0, peak_mem_mb=peak_mem_mb(device), skipped_nonfinite=guard.skipped)
        first = first or row
        log.log(row)
        bar.set_postfix(loss=f"{row['loss']:.3f}", ce=f"{row.get('ce', 0):.3f}", ref=f"{row['ref_ce']:.3f}",
                        distill=f"{row.get('distill', 0):.3f}")
        if rank == 0 and args.logging_steps and (step + 1) % args.logging_steps == 0:
            stats = f" ref_answer_prob={row['ref_answer_prob']:.4f}" if "ref_answer_prob" in row else ""
            tqdm.write(f"Step {step + 1}: loss={row['loss']:.4f} ce={row.get('ce', 0):.4f} "
                       f"ref_ce={row['ref_ce']:.4f} distill={row.get('distill', 0):.4f} lr={row['lr']:.2e}{stats}")
        if args.save_steps and (step + 1) % args.save_steps == 0:
            checkpoint.save(args.output_dir, step + 1, wrapped, opt, sched, extra={"nonfinite": guard.state_dict()})
    final = checkpoint.save(args.output_dir, total, wrapped, opt, sched, extra={"nonfinite": guard.state_dict()})
    results = run_eval(total, "final") if eval_rows and modes else []
    if rank == 0:
        if results:
            table = adaptive.results_table(results)
            (out / "eval.md").write_text(table + "\n")
            print(table, flush=True)
        if first is not None:
            print(f"[codi] loss {first['loss']:.3f} -> {row['loss']:.3f} (ce {first.get('ce', 0):.3f} -> "
                  f"{row.get('ce', 0):.3f}, ref_ce {first['ref_ce']:.3f} -> {row['ref_ce']:.3f}); checkpoint {final}; "
                  f"metrics {out / 'metrics.jsonl'}; {time.time() - t_start:.0f}s", flush=True)
    log.close()
    dist.cleanup()
    return {"first": first, "last": row if first is not None else None, "eval": results}


cli = console_entry(main)


if __name__ == "__main__":
    cli()
