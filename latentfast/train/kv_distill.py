"""Teacher -> student KV-cache distillation (seed note 004).

    latentfast-kv-distill                               # embedded demo: tiny teacher -> tinier student
    latentfast-kv-distill --compare                     # baseline / +attention / +attention+CKA, table + plot
    python -m latentfast.train.kv_distill --model_name /models/Qwen2-1.5B --teacher_model /models/Qwen2-7B \\
        --dataset_name gsm8k_train.jsonl --subset_size 5000 --epochs 2 --batch_size 8 \\
        --use_attention_weighted_kv --use_teacher_attention --attention_weighted_kv_warmup 300 \\
        --cka_weight 0.05 --cka_layers middle --output_dir outputs/attn_weighted_teacher_cka
    torchrun --nproc_per_node 8 -m latentfast.train.kv_distill ...

    loss = CE(student, answer tokens) + kv_weight * KV + cka_weight * CKA + codi_weight * CODI

KV: per distilled layer pair (``--kv_layers``, student block -> teacher block at the
same relative depth) a ``KVProjection`` maps the student's cache to the teacher's
heads/dims, then MSE on K and V; with ``--use_attention_weighted_kv`` each token is
weighted by the attention it receives (from the student, or the teacher with
``--use_teacher_attention``) once ``--attention_weighted_kv_warmup`` steps have passed.
Both models run their normal SDPA/flash attention: K/V/Q come from hooks
(``latentfast.models.capture``) and the importance from the fused
``attention_token_importance`` -- no ``output_attentions``. The teacher is frozen
(eval, no grad). Teacher and student must share a tokenizer.
"""
from __future__ import annotations

import argparse
import copy
import json
import pathlib
import random
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from latentfast.data import format_prompt
from latentfast.data.rewards import correctness_reward
from latentfast.generation import generate
from latentfast.models.capture import KVCapture
from latentfast.nn import AttentionWeightedKVLoss, CKALoss, CODILoss, KVProjection, layer_pairs

from . import checkpoint, dist
from .common import (JsonlLogger, accumulate_grads, amp_context, check_data_arg, check_resume_arg, console_entry,
                     load_causal_lm, load_rows, optimizer_step, parse_with_demo, peak_mem_mb, reset_peak_mem,
                     warmup_schedule)
from .guard import NonFiniteGuard

DEMO = "tiny"
# the demo teacher: wider/deeper than the tiny student, other KV-head count (exercises KVProjection)
DEMO_TEACHER = dict(hidden_size=192, num_hidden_layers=6, num_attention_heads=6, num_key_value_heads=3,
                    intermediate_size=512)
DEMO_PRESET = dict(lr=2e-3, batch_size=32, max_steps=120, warmup_ratio=0.05, attention_weighted_kv_warmup=40,
                   dataset_name="synthetic", subset_size=4000, eval_size=64, max_length=128, logging_steps=20,
                   save_steps=0, teacher_sft_steps=200, max_new_tokens=32, use_attention_weighted_kv=True)
COMPARE = {  # the recipe's three configurations (seed note 004)
    "baseline": dict(use_attention_weighted_kv=False, use_teacher_attention=False, cka_weight=0.0),
    "+attention": dict(use_attention_weighted_kv=True, use_teacher_attention=False, cka_weight=0.0),
    "+attention+cka": dict(use_attention_weighted_kv=True, use_teacher_attention=True, cka_weight=None),
}


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    # --- the recipe's arguments (experiments/train_with_kv.py) ---
    a("--model_name", default=DEMO, help="student: local HF path; 'tiny' = embedded demo")
    a("--teacher_model", default=DEMO, help="teacher: local HF path; 'tiny' = demo teacher (warmed up in-process)")
    a("--dataset_name", default="gsm8k", help="JSONL path, 'gsm8k' (shipped sample) or 'synthetic'")
    a("--subset_size", type=int, default=None)
    a("--epochs", type=float, default=2)
    a("--batch_size", type=int, default=8)
    a("--lr", type=float, default=5e-5)
    a("--output_dir", default="runs/kv_distill")
    a("--kv_weight", type=float, default=1.0)
    a("--use_attention_weighted_kv", action=argparse.BooleanOptionalAction, default=False,
      help="weight the KV loss by attention after the warm-up (demo: on)")
    a("--attention_weighted_kv_warmup", type=int, default=1000)
    a("--use_teacher_attention", action="store_true", help="weight by the teacher's attention (steadier)")
    a("--cka_weight", type=float, default=0.0, help="recipe: 0.05")
    a("--cka_layers", default="middle", help="'middle' | 'last' | 'all' | 'i,j,...'")
    a("--codi_weight", type=float, default=0.0, help="CODI hidden-state loss at the token before the answer")
    # --- more knobs ---
    a("--kv_layers", default="all", help="student blocks whose KV cache is distilled")
    a("--importance_layer", type=int, default=-1, help="block whose attention gives token importance")
    a("--gradient_accumulation_steps", type=int, default=1)
    a("--weight_decay", type=float, default=0.0)
    a("--warmup_ratio", type=float, default=0.03)
    a("--max_grad_norm", type=float, default=1.0)
    a("--max_steps", type=int, default=-1, help="> 0 overrides --epochs")
    a("--max_length", type=int, default=512)
    a("--eval_data", default=None, help="default: 'synthetic' for synthetic training, else the GSM8K test sample")
    a("--eval_size", type=int, default=100)
    a("--max_new_tokens", type=int, default=256)
    a("--logging_steps", type=int, default=10)
    a("--save_steps", type=int, default=500)
    a("--resume_from_checkpoint", default=None)
    a("--seed", type=int, default=42)
    a("--bf16", action=argparse.BooleanOptionalAction, default=None)
    a("--device", default=None)
    a("--compare", action="store_true", help="run baseline, +attention, +attention+CKA; write table + plot")
    a("--teacher_sft_steps", type=int, default=0, help="demo: CE warm-up of the tiny teacher")
    a("--teacher_sft_lr", type=float, default=3e-3)
    a("--max_nonfinite_steps", type=int, default=10,
      help="stop after this many consecutive steps with a non-finite loss or gradient norm (each is skipped)")
    return p


def parse_args(argv=None):
    parser = build_parser()
    args = parse_with_demo(parser, argv, "model_name", DEMO, DEMO_PRESET)
    if args.eval_data is None:
        args.eval_data = "synthetic" if args.dataset_name == "synthetic" else "gsm8k_test"
    check_data_arg(parser, "--dataset_name", args.dataset_name)
    check_data_arg(parser, "--eval_data", args.eval_data)
    check_resume_arg(parser, args.resume_from_checkpoint)
    return args


# ----------------------------------------------------------------------------- data
def encode(tok, rows, max_length, device):
    """Right-padded prompt+answer+eos; targets (next token) on the answer only."""
    ids, tgts = [], []
    for r in rows:
        p = tok(format_prompt(r["question"]))["input_ids"]
        a = tok(r["answer"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        x = (p + a)[:max_length]
        t = ([-100] * (len(p) - 1) + a)[:len(x) - 1] + [-100]
        ids.append(x)
        tgts.append(t)
    T = max(map(len, ids))
    out = torch.full((len(rows), T), tok.pad_token_id, dtype=torch.long)
    tgt = torch.full((len(rows), T), -100, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for b, (x, t) in enumerate(zip(ids, tgts)):
        out[b, :len(x)], tgt[b, :len(t)], mask[b, :len(x)] = torch.tensor(x), torch.tensor(t), 1
    # CODI position: the token before the answer number (the last '####' token), else the last answer token
    marker = getattr(tok, "answer_marker_id", None)
    pos = []
    for b, x in enumerate(ids):
        hits = [i for i, v in enumerate(x) if v == marker] if marker is not None else []
        pos.append(hits[-1] if hits else len(x) - 2)
    return {"input_ids": out.to(device), "attention_mask": mask.to(device), "targets": tgt.to(device),
            "answer_pos": torch.tensor(pos, device=device)}


def check_tokenizers(tok_s, tok_t):
    probe = "Question: Tom has 12 apples.\nAnswer:\n12*3=36\n#### 36"
    if len(tok_s) != len(tok_t) or tok_s(probe)["input_ids"] != tok_t(probe)["input_ids"]:
        raise SystemExit("teacher and student must share a tokenizer (KV distillation aligns token positions)")


# ----------------------------------------------------------------------------- model
def _attn_shape(cfg):
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return cfg.num_key_value_heads, d


def answer_ce(lm, hidden, targets):
    sel = targets != -100
    return F.cross_entropy(lm.get_output_embeddings()(hidden[sel]).float(), targets[sel])


class KVDistiller(nn.Module):
    """The trainable side: the student plus KV projections (and CODI's width map).
    ``forward(batch, teacher, step)`` -> (loss, metrics); DDP wraps this module."""

    def __init__(self, student, teacher_config, args):
        super().__init__()
        self.student = student
        s_cfg, t_cfg = student.config, teacher_config
        self.pairs = layer_pairs(s_cfg.num_hidden_layers, t_cfg.num_hidden_layers, args.kv_layers)
        self.kv_weight, self.cka_weight, self.codi_weight = args.kv_weight, args.cka_weight, args.codi_weight
        self.weighted = args.use_attention_weighted_kv
        self.use_teacher_attention = args.use_teacher_attention
        self.s_imp = args.importance_layer % s_cfg.num_hidden_layers
        self.t_imp = args.importance_layer % t_cfg.num_hidden_layers
        self.kv = None
        if self.kv_weight:
            (sh, sd), (th, td) = _attn_shape(s_cfg), _attn_shape(t_cfg)
            projs = [KVProjection(sh, sd, th, td) for _ in self.pairs]
            warm = args.attention_weighted_kv_warmup if self.weighted else sys.maxsize
            self.kv = AttentionWeightedKVLoss(warm, args.use_teacher_attention, projs)
        self.cka = CKALoss(args.cka_layers) if self.cka_weight else None
        self.codi = CODILoss("blocks", student_dim=s_cfg.hidden_size, teacher_dim=t_cfg.hidden_size) \
            if self.codi_weight else None
        self.capture = KVCapture(student, [s for s, _ in self.pairs], [self.s_imp])

    @property
    def need_hidden(self) -> bool:
        return self.cka is not None or self.codi is not None

    def status(self, step: int) -> str:
        return self.kv.status(step) if (self.kv is not None and self.weighted) else ""

    def forward(self, batch, teacher: dict, step: int):
        weighting = self.kv is not None and self.kv.weighting_active(step)
        with self.capture:
            out = self.student.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                     output_hidden_states=self.need_hidden)
        ce = answer_ce(self.student, out.last_hidden_state, batch["targets"])
        loss, met = ce, {"ce": ce.detach()}
        if self.kv is not None:
            s_kv = [self.capture.kv(s) for s, _ in self.pairs]
            if weighting:  # the plain MSE too, so weighted and unweighted runs compare on one scale
                with torch.no_grad():
                    met["kv_mse"] = self.kv(s_kv, teacher["kv"], step=-1, attention_mask=batch["attention_mask"])
            kv = self.kv(s_kv, teacher["kv"], step=step, attention_mask=batch["attention_mask"],
                         student_attention=self.capture.qk(self.s_imp) if weighting else None,
                         teacher_importance=teacher.get("importance"))
            loss = loss + self.kv_weight * kv
            met["kv"] = kv.detach()
            met.setdefault("kv_mse", met["kv"])
        if self.cka is not None:
            cka = self.cka(out.hidden_states, teacher["hidden"], batch["attention_mask"])
            loss = loss + self.cka_weight * cka
            met["cka"] = cka.detach()
        if self.codi is not None:
            codi = self.codi(out.hidden_states, teacher["hidden"], batch["answer_pos"], batch["answer_pos"])
            loss = loss + self.codi_weight * codi
            met["codi"] = codi.detach()
        self.capture.clear()
        met["loss"] = loss.detach()
        return loss, met


@torch.no_grad()
def teacher_outputs(teacher, capture: KVCapture, distiller: KVDistiller, batch, step, amp) -> dict:
    """Frozen teacher: K/V of the paired layers, importance if weighting by its attention,
    hidden states if CKA/CODI need them."""
    need_imp = distiller.kv is not None and distiller.use_teacher_attention and distiller.kv.weighting_active(step)
    with capture, amp():
        out = teacher.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            output_hidden_states=distiller.need_hidden)
        res = {"kv": [capture.kv(t) for _, t in distiller.pairs],
               "hidden": out.hidden_states if distiller.need_hidden else None}
        if need_imp:
            from latentfast.ops import attention_token_importance

            q, k = capture.qk(distiller.t_imp)
            res["importance"] = attention_token_importance(q, k, attention_mask=batch["attention_mask"])
    capture.clear()
    return res


def teacher_sft(teacher, tok, rows, args, device, rank, amp):
    """Demo: the tiny teacher starts random; a short CE warm-up gives it something to teach."""
    opt = torch.optim.AdamW(teacher.parameters(), lr=args.teacher_sft_lr, weight_decay=0.0)
    sched = warmup_schedule(opt, args.teacher_sft_steps, 0.05)
    rng = random.Random(args.seed)  # same batches on every rank -> identical teachers
    teacher.train()
    guard = NonFiniteGuard(args.max_nonfinite_steps, "teacher warm-up")
    for step in tqdm(range(args.teacher_sft_steps), desc="teacher warm-up", disable=rank != 0):
        b = encode(tok, rng.sample(rows, 32), args.max_length, device)
        with amp():
            loss = answer_ce(teacher, teacher.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
                             .last_hidden_state, b["targets"])
        loss.backward()
        optimizer_step(teacher.parameters(), opt, sched, 1.0, guard=guard, loss=loss, step=step + 1)
    teacher.eval()


@torch.no_grad()
def evaluate(lm, tok, rows, args, device, amp, rank=0, world=1) -> dict:
    """Held-out answer CE and greedy accuracy of ``lm``."""
    was = lm.training
    lm.eval()
    mine = rows[rank::world]
    sums = torch.zeros(4, dtype=torch.float64)
    for i in range(0, len(mine), 32):
        chunk = mine[i:i + 32]
        b = encode(tok, chunk, args.max_length, device)
        with amp():
            h = lm.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
            ce = answer_ce(lm, h, b["targets"])
        n_tok = int((b["targets"] != -100).sum())
        tok.padding_side = "left"
        enc = tok([format_prompt(r["question"]) for r in chunk], return_tensors="pt", padding=True).to(device)
        with amp():  # greedy, token-identical to lm.generate(do_sample=False); ranks decode independently
            ro = generate(lm, enc.input_ids, enc.attention_mask, args.max_new_tokens, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id, sync_ranks=False)
        texts = tok.batch_decode(ro.completion_ids, skip_special_tokens=True)
        sums += torch.tensor([ce.item() * n_tok, n_tok, sum(correctness_reward(texts, [r["answer"] for r in chunk])),
                              len(chunk)], dtype=torch.float64)
    if world > 1:
        t = sums.to(device)
        torch.distributed.all_reduce(t)
        sums = t.cpu()
    lm.train(was)
    return {"eval_ce": sums[0].item() / max(1, sums[1].item()), "eval_accuracy": sums[2].item() / max(1, sums[3].item())}


# ----------------------------------------------------------------------------- training
def train(args, student, teacher, tok, rows, eval_rows, device, rank, world, out: pathlib.Path) -> dict:
    """One distillation run; returns the loss history and final eval."""
    amp = amp_context(device, args.bf16)
    torch.manual_seed(args.seed)
    distiller = KVDistiller(student, teacher.config, args).to(device)
    t_capture = KVCapture(teacher, [t for _, t in distiller.pairs], [distiller.t_imp])
    params = [p for p in distiller.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": args.weight_decay},
                             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}], lr=args.lr)
    per_step = args.batch_size * args.gradient_accumulation_steps * world
    total = args.max_steps if args.max_steps > 0 else max(1, int(args.epochs * len(rows) / per_step))
    sched = warmup_schedule(opt, total, args.warmup_ratio)
    wrapped = dist.wrap(distiller, device)
    start = 0
    guard = NonFiniteGuard(args.max_nonfinite_steps, "kv_distill")
    resume = checkpoint.latest(str(out)) if args.resume_from_checkpoint == "latest" else args.resume_from_checkpoint
    if resume:
        state = checkpoint.load(resume, wrapped, opt, sched)
        start = state["step"]
        guard.load_state_dict(state["extra"].get("nonfinite", {}))
    log = JsonlLogger(out / "metrics.jsonl", enabled=rank == 0)
    history = []
    bar = tqdm(range(start, total), desc=out.name, disable=rank != 0, initial=start, total=total)
    for step in bar:
        reset_peak_mem(device)
        t0 = time.perf_counter()
        distiller.train()

        def micro_batches():  # (batch, teacher outputs, step) per micro-batch
            for m in range(args.gradient_accumulation_steps):
                base = ((step * args.gradient_accumulation_steps + m) * world + rank) * args.batch_size
                order = random.Random(args.seed + base // len(rows)).sample(range(len(rows)), len(rows))
                batch = encode(tok, [rows[order[(base + i) % len(rows)]] for i in range(args.batch_size)],
                               args.max_length, device)
                yield batch, teacher_outputs(teacher, t_capture, distiller, batch, step, amp), step

        sums = accumulate_grads(wrapped, micro_batches(), args.gradient_accumulation_steps, amp)
        grad_norm = optimizer_step(params, opt, sched, args.max_grad_norm, guard=guard, loss=sums.get("loss"),
                                   step=step + 1)
        row = dist.all_mean(sums, device)
        row.update(step=step + 1, lr=sched.get_last_lr()[0], grad_norm=float(grad_norm),
                   step_s=time.perf_counter() - t0, peak_mem_mb=peak_mem_mb(device), skipped_nonfinite=guard.skipped,
                   attn_weighted=bool(distiller.kv is not None and distiller.kv.last_weighted))
        log.log(row)
        history.append(row)
        tag = distiller.status(step + 1)
        bar.set_postfix(loss=f"{row['loss']:.3f}", ce=f"{row['ce']:.3f}", kv=f"{row.get('kv', 0):.4f}")
        if rank == 0 and args.logging_steps and ((step + 1) % args.logging_steps == 0 or step == start):
            parts = [f"loss={row['loss']:.4f}", f"ce={row['ce']:.4f}"] + [
                f"{k}={row[k]:.4f}" for k in ("kv", "cka", "codi") if k in row]
            tqdm.write(f"Step {step + 1}: {' '.join(parts)} {tag}".rstrip())
        if args.save_steps and (step + 1) % args.save_steps == 0:
            checkpoint.save(str(out), step + 1, wrapped, opt, sched, extra={"nonfinite": guard.state_dict()})
    checkpoint.save(str(out), total, wrapped, opt, sched, extra={"nonfinite": guard.state_dict()})
    if rank == 0:
        student.save_pretrained(str(out / "student"))
        tok.save_pretrained(str(out / "student"))
    final = evaluate(student, tok, eval_rows, args, device, amp, rank, world) if eval_rows else {}
    log.log({"step": total, **final})
    log.close()
    t_capture.remove()
    distiller.capture.remove()
    return {"history": history, "final": final, "total": total}


def summarize(name, res) -> dict:
    h = res["history"]
    tail = h[-max(1, len(h) // 10):]  # mean of the last 10% of steps: less noisy than the last one
    mean = (lambda k: sum(r.get(k, 0.0) for r in tail) / len(tail))
    return {"config": name, "ce": mean("ce"), "kv": mean("kv"), "kv_mse": mean("kv_mse"), "cka": mean("cka"),
            "loss": mean("loss"),
            "first_ce": h[0]["ce"] if h else float("nan"), **res["final"],
            "step_ms": 1e3 * sum(r["step_s"] for r in h[1:]) / max(1, len(h) - 1),
            "peak_mem_mb": max((r["peak_mem_mb"] for r in h), default=0.0)}


def compare_table(rows: list[dict]) -> str:
    lines = ["| config | CE (first -> last) | KV loss | KV MSE (unweighted) | CKA | eval CE | eval acc | step ms | peak MB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['config']} | {r['first_ce']:.3f} -> {r['ce']:.3f} | {r['kv']:.4f} | {r['kv_mse']:.4f} | "
                     f"{r['cka']:.4f} | "
                     f"{r.get('eval_ce', float('nan')):.3f} | {r.get('eval_accuracy', float('nan')):.3f} | "
                     f"{r['step_ms']:.0f} | {r['peak_mem_mb']:.0f} |")
    return "\n".join(lines)


def plot_curves(results: dict, path: pathlib.Path, warmup: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ["loss", "ce", "kv_mse", "cka"]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.4))
    for ax, k in zip(axes, keys):
        for i, (name, res) in enumerate(results.items()):
            pts = [(r["step"], r[k]) for r in res["history"] if k in r]
            if pts:
                ax.plot(*zip(*pts), label=name, lw=1.2, color=f"C{i}")  # one colour per config on every panel
        ax.axvline(warmup, color="gray", ls=":", lw=0.8)
        ax.set_title(k)
        ax.set_xlabel("step")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def load_models(args, device, rank, amp):
    tok, student = load_causal_lm(args.model_name, device, dtype=torch.float32, seed=args.seed)  # fp32 master weights
    if args.teacher_model == DEMO:
        tok_t, teacher = load_causal_lm(DEMO, device, seed=args.seed + 1, **DEMO_TEACHER)
    else:
        tok_t, teacher = load_causal_lm(args.teacher_model, device)
    check_tokenizers(tok, tok_t)
    if args.teacher_model == DEMO and args.teacher_sft_steps:
        teacher_sft(teacher, tok, load_rows(args.dataset_name, None, args.seed + 1), args, device, rank, amp)
    teacher.eval().requires_grad_(False)
    return tok, student, teacher


def main(argv=None):
    args = parse_args(argv)
    device, rank, world = dist.setup(args.device)
    t_start = time.time()
    out = pathlib.Path(args.output_dir)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if args.demo:
            print("[kv_distill] embedded demo; presets: " + json.dumps({k: getattr(args, k) for k in DEMO_PRESET}),
                  flush=True)
    amp = amp_context(device, args.bf16)
    tok, student, teacher = load_models(args, device, rank, amp)
    rows = load_rows(args.dataset_name, args.subset_size, args.seed)
    eval_rows = load_rows(args.eval_data, args.eval_size, args.seed + 10_000) if args.eval_size else []
    if rank == 0 and eval_rows:
        t_eval = evaluate(teacher, tok, eval_rows, args, device, amp)
        print(f"[kv_distill] teacher: eval CE {t_eval['eval_ce']:.3f}, accuracy {t_eval['eval_accuracy']:.3f}",
              flush=True)

    if not args.compare:
        res = train(args, student, teacher, tok, rows, eval_rows, device, rank, world, out)
        if rank == 0:
            s = summarize("run", res)
            print(f"[kv_distill] CE {s['first_ce']:.3f} -> {s['ce']:.3f}, KV {s['kv']:.4f}; "
                  f"eval CE {s.get('eval_ce', float('nan')):.3f}, accuracy {s.get('eval_accuracy', float('nan')):.3f}; "
                  f"{time.time() - t_start:.0f}s; {out}", flush=True)
        dist.cleanup()
        return res

    init = copy.deepcopy(student.state_dict())  # every configuration starts from the same student
    results, rows_out = {}, []
    for name, over in COMPARE.items():
        a = copy.copy(args)
        for k, v in over.items():
            setattr(a, k, v if v is not None else (args.cka_weight or 0.05))
        student.load_state_dict(init)
        if rank == 0:
            print(f"[kv_distill] --compare: {name} {json.dumps({k: getattr(a, k) for k in over})}", flush=True)
        results[name] = train(a, student, teacher, tok, rows, eval_rows, device, rank, world,
                              out / name.strip("+").replace("+", "_"))
        rows_out.append(summarize(name, results[name]))
    if rank == 0:
        table = compare_table(rows_out)
        (out / "compare.md").write_text(table + "\n")
        (out / "compare.json").write_text(json.dumps(rows_out, indent=1))
        plot_curves(results, out / "loss_curves.png", args.attention_weighted_kv_warmup)
        print(table + f"\n[kv_distill] table {out / 'compare.md'}, plot {out / 'loss_curves.png'}; "
              f"{time.time() - t_start:.0f}s", flush=True)
    dist.cleanup()
    return {"compare": rows_out}


cli = console_entry(main)


if __name__ == "__main__":
    cli()
