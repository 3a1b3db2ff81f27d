"""Teacher -> student KV-cache distillation (seed note 004).

    latentfast-kv-distill                               # embedded demo: tiny teacher -> tinier student
    latentfast-kv-distill --compare                     # baseline / +attention / +attention+CKA, table + plot
    latentfast-kv-distill --teachers teachers.yaml --teacher_weighting confidence   # several teachers
    latentfast-kv-distill --multi_teacher_demo [--compare]   # two tiny teachers (eq / nl reasoning) -> one student
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
(``latentfast.hf.capture``) and the importance from the fused
``attention_token_importance`` -- no ``output_attentions``. The teacher is frozen
(eval, no grad). Teacher and student must share a tokenizer.

``--teachers teachers.yaml`` (``train/teachers.py``) distils several teachers with
``loss = CE + kv_weight * sum_k w_k L_KV(student, teacher_k) (+ CKA/CODI per teacher)``,
weights per sample from ``--teacher_weighting``; that trainer is ``train/multi_teacher.py``.
"""
from __future__ import annotations

import copy
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from latentfast.data.qa import encode_answers
from latentfast.data.rows import load_rows
from latentfast.eval.answers import answer_ce, answer_metrics
from latentfast.hf import adapter
from latentfast.hf.capture import KVCapture
from latentfast.models.local import load_causal_lm
from latentfast.nn import AttentionWeightedKVLoss, CKALoss, CODILoss, KVProjection, layer_pairs
from latentfast.runtime import dist
from latentfast.runtime.device import amp_context

from .common import SampleStream, check_data_arg, console_entry
from .config import Config, option
from .loop import TrainConfig, Trainer
from .multi_teacher import MT_DEMO_PRESET, run_multi_teacher
from .sft import SFT, SFTConfig
from .teachers import MultiTeacherConfig

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


@dataclass
class KVLossConfig(Config):
    """What ``KVDistiller`` needs: the loss terms and their weights."""

    kv_weight: float = option(1.0, "weight of the KV-cache MSE")
    use_attention_weighted_kv: bool = option(False, "weight the KV loss by attention after the warm-up (demo: on)")
    attention_weighted_kv_warmup: int = option(1000, "steps of plain MSE before the attention weighting")
    use_teacher_attention: bool = option(False, "weight by the teacher's attention (steadier)")
    cka_weight: float = option(0.0, "recipe: 0.05")
    cka_layers: str = option("middle", "'middle' | 'last' | 'all' | 'i,j,...'")
    codi_weight: float = option(0.0, "CODI hidden-state loss at the token before the answer")
    kv_layers: str = option("all", "student blocks whose KV cache is distilled")
    importance_layer: int = option(-1, "block whose attention gives token importance")


@dataclass
class KVDistillConfig(TrainConfig, KVLossConfig, MultiTeacherConfig):
    """Teacher -> student KV-cache distillation (the recipe's experiments/train_with_kv.py flags)."""

    model_name: str = option(DEMO, "student: local HF path; 'tiny' = embedded demo", aliases=("model_name_or_path",))
    teacher_model: str = option(DEMO, "teacher: local HF path; 'tiny' = demo teacher (warmed up in-process)")
    dataset_name: str = option("gsm8k", "JSONL path, 'gsm8k' (shipped sample) or 'synthetic'")
    subset_size: int | None = option(None, "first N training rows")
    num_train_epochs: float = 2
    lr: float = 5e-5
    output_dir: str = "runs/kv_distill"
    max_length: int = option(512, "prompt + answer tokens kept")
    eval_data: str | None = option(None, "default: 'synthetic' for synthetic training, else the GSM8K test sample")
    eval_size: int = option(100, "held-out rows (answer CE and greedy accuracy)")
    max_new_tokens: int = option(256, "greedy decoding length at evaluation")
    compare: bool = option(False, "run baseline, +attention, +attention+CKA (with --teachers / --multi_teacher_demo: "
                                  "each teacher alone, static, per_task, confidence, learned); write table + plot")
    teacher_sft_steps: int = option(0, "demo: CE warm-up of the tiny teacher")
    teacher_sft_lr: float = option(3e-3, "learning rate of the teacher warm-up")

    @property
    def demo(self) -> bool:
        return self.model_name == DEMO

    def check_cli(self, parser):
        super().check_cli(parser)
        check_data_arg(parser, "--dataset_name", self.dataset_name)
        check_data_arg(parser, "--eval_data", self.eval_data)


def build_parser():
    return KVDistillConfig.build_parser(__doc__)


def parse_args(argv=None) -> KVDistillConfig:
    cfg = KVDistillConfig.parse(argv, __doc__)
    if cfg.multi_teacher and "teacher_model" in cfg.explicit:
        build_parser().error("--teacher_model and --teachers / --multi_teacher_demo exclude each other")
    if cfg.multi_teacher_demo:
        cfg = cfg.with_preset(MT_DEMO_PRESET)
    elif cfg.demo:
        cfg = cfg.with_preset(DEMO_PRESET)
    if cfg.eval_data is None:
        synthetic = cfg.dataset_name in ("synthetic", "synthetic_two_mode")
        cfg = cfg.replace(eval_data=cfg.dataset_name if synthetic else "gsm8k_test")
    return cfg


# ----------------------------------------------------------------------------- data
def encode(tok, rows, max_length, device):
    """``encode_answers`` (prompt + answer + eos, targets on the answer) plus ``answer_pos``,
    CODI's position: the token before the answer number (the last '####' token), else the
    last answer token."""
    out = encode_answers(tok, rows, max_length, device)
    marker = getattr(tok, "answer_marker_id", None)
    lens = out["attention_mask"].sum(1).tolist()
    pos = []
    for x, n in zip(out["input_ids"].tolist(), lens):
        hits = [i for i, v in enumerate(x[:n]) if v == marker] if marker is not None else []
        pos.append(hits[-1] if hits else n - 2)
    out["answer_pos"] = torch.tensor(pos, device=device)
    return out


def check_tokenizers(tok_s, tok_t):
    probe = "Question: Tom has 12 apples.\nAnswer:\n12*3=36\n#### 36"
    if len(tok_s) != len(tok_t) or tok_s(probe)["input_ids"] != tok_t(probe)["input_ids"]:
        raise SystemExit("teacher and student must share a tokenizer (KV distillation aligns token positions)")


# ----------------------------------------------------------------------------- model
def _attn_shape(cfg):
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return cfg.num_key_value_heads, d


class KVDistiller(nn.Module):
    """The trainable side: the student plus KV projections (and CODI's width map).
    ``forward(batch, teacher, step)`` -> (loss, metrics); DDP wraps this module."""

    def __init__(self, student, teacher_config, cfg: "KVLossConfig"):
        super().__init__()
        args = KVLossConfig.narrow(cfg)  # only the loss's options (a wider config or namespace is fine)
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
            out = adapter.decoder(self.student)(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
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
        out = adapter.decoder(teacher)(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                       output_hidden_states=distiller.need_hidden)
        res = {"kv": [capture.kv(t) for _, t in distiller.pairs],
               "hidden": out.hidden_states if distiller.need_hidden else None}
        if need_imp:
            from latentfast.ops import attention_token_importance

            q, k = capture.qk(distiller.t_imp)
            res["importance"] = attention_token_importance(q, k, attention_mask=batch["attention_mask"])
    capture.clear()
    return res


# ----------------------------------------------------------------------------- training
class KVDistill(Trainer):
    """The distillation run on the loop: the frozen teacher's outputs are computed per
    micro-batch in ``batches`` (lazily), the distiller's loss in ``loss``."""

    name = "kv_distill"

    def __init__(self, cfg: KVDistillConfig, student, teacher, tok, rows, eval_rows):
        super().__init__(cfg)
        self.student, self.teacher, self.tok, self.rows, self.eval_rows = student, teacher, tok, rows, eval_rows

    def setup(self):
        self.stream = SampleStream(self.rows, self.cfg.seed)

    def build_model(self):
        self.distiller = KVDistiller(self.student, self.teacher.config, self.cfg).to(self.device)
        self.t_capture = KVCapture(self.teacher, [t for _, t in self.distiller.pairs], [self.distiller.t_imp])
        return self.distiller

    def fsdp_layers(self, module):
        return list(adapter.decoder_layers(self.student))

    def num_train_items(self):
        return len(self.rows)

    def batches(self, step):  # lazy: one micro-batch's teacher outputs alive at a time
        c = self.cfg
        for m in range(c.gradient_accumulation_steps):
            batch = encode(self.tok, self.micro_items(self.stream, step, m, c.per_device_train_batch_size),
                           c.max_length, self.device)
            yield batch, teacher_outputs(self.teacher, self.t_capture, self.distiller, batch, step, self.amp)

    def loss(self, mb):
        batch, t_out = mb
        return self.model(batch, t_out, self.step)

    def step_metrics(self, row):
        row["attn_weighted"] = bool(self.distiller.kv is not None and self.distiller.kv.last_weighted)

    def log_line(self, row):
        parts = [f"loss={row['loss']:.4f}", f"ce={row['ce']:.4f}"] + [
            f"{k}={row[k]:.4f}" for k in ("kv", "cka", "codi") if k in row]
        return f"Step {row['step']}: {' '.join(parts)} {self.distiller.status(row['step'])}".rstrip()

    def progress(self, row):
        return dict(loss=f"{row['loss']:.3f}", ce=f"{row['ce']:.3f}", kv=f"{row.get('kv', 0):.4f}")

    def evaluate(self, step):
        if step < self.total or not self.eval_rows:  # the final student only
            return {}
        c = self.cfg
        return answer_metrics(self.student, self.tok, self.eval_rows, c.max_length, c.max_new_tokens, self.device,
                              self.amp, self.rank, self.world)

    def on_train_end(self, result):
        if self.rank == 0:
            self.student.save_pretrained(str(self.out / "student"))
            self.tok.save_pretrained(str(self.out / "student"))
        self.t_capture.remove()
        self.distiller.capture.remove()
        return result


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


def plot_curves(results: dict, path: Path, warmup: int) -> None:
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


def load_models(cfg: KVDistillConfig, device):
    tok, student = load_causal_lm(cfg.model_name, device, dtype=torch.float32, seed=cfg.seed)  # fp32 master weights
    if cfg.teacher_model == DEMO:
        tok_t, teacher = load_causal_lm(DEMO, device, seed=cfg.seed + 1, **DEMO_TEACHER)
    else:
        tok_t, teacher = load_causal_lm(cfg.teacher_model, device)
    check_tokenizers(tok, tok_t)
    if cfg.teacher_model == DEMO and cfg.teacher_sft_steps:
        # the tiny teacher starts random: a short SFT run (on the loop) gives it something to teach
        warm = SFTConfig(output_dir=str(Path(cfg.output_dir) / "teacher_sft"), seed=cfg.seed, device=cfg.device,
                         bf16=cfg.bf16, lr=cfg.teacher_sft_lr, max_steps=cfg.teacher_sft_steps, warmup_ratio=0.05,
                         per_device_train_batch_size=32, max_length=cfg.max_length, logging_steps=0, save_steps=0,
                         eval_size=0, save_model=False)
        sft = SFT(warm, lm=teacher, tok=tok, rows=load_rows(cfg.dataset_name, None, cfg.seed + 1), eval_rows=[])
        sft.name = "teacher warm-up"
        sft.fit()
    teacher.eval().requires_grad_(False)
    return tok, student, teacher


def main(argv=None):
    cfg = parse_args(argv)
    if cfg.multi_teacher:
        return run_multi_teacher(cfg)
    device, rank, world = dist.setup(cfg.device)
    t_start = time.time()
    out = Path(cfg.output_dir)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if cfg.demo:
            print("[kv_distill] embedded demo; presets: " + json.dumps({k: getattr(cfg, k) for k in DEMO_PRESET}),
                  flush=True)
    amp = amp_context(device, cfg.bf16)
    tok, student, teacher = load_models(cfg, device)
    rows = load_rows(cfg.dataset_name, cfg.subset_size, cfg.seed)
    eval_rows = load_rows(cfg.eval_data, cfg.eval_size, cfg.seed + 10_000) if cfg.eval_size else []
    if rank == 0 and eval_rows:
        t_eval = answer_metrics(teacher, tok, eval_rows, cfg.max_length, cfg.max_new_tokens, device, amp)
        print(f"[kv_distill] teacher: eval CE {t_eval['eval_ce']:.3f}, accuracy {t_eval['eval_accuracy']:.3f}",
              flush=True)

    if not cfg.compare:
        res = KVDistill(cfg, student, teacher, tok, rows, eval_rows).fit()
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
        over = {k: v if v is not None else (cfg.cka_weight or 0.05) for k, v in over.items()}
        c = cfg.replace(output_dir=str(out / name.strip("+").replace("+", "_")), **over)
        student.load_state_dict(init)
        if rank == 0:
            print(f"[kv_distill] --compare: {name} {json.dumps(over)}", flush=True)
        results[name] = KVDistill(c, student, teacher, tok, rows, eval_rows).fit()
        rows_out.append(summarize(name, results[name]))
    if rank == 0:
        table = compare_table(rows_out)
        (out / "compare.md").write_text(table + "\n")
        (out / "compare.json").write_text(json.dumps(rows_out, indent=1))
        plot_curves(results, out / "loss_curves.png", cfg.attention_weighted_kv_warmup)
        print(table + f"\n[kv_distill] table {out / 'compare.md'}, plot {out / 'loss_curves.png'}; "
              f"{time.time() - t_start:.0f}s", flush=True)
    dist.cleanup()
    return {"compare": rows_out}


cli = console_entry(main)


if __name__ == "__main__":
    cli()
