"""Teachers of a multi-teacher KV distillation run: loading, and their targets per batch.

    teachers = load_teachers_from_config(cfg, student.config, tok, kv_layers="all", device=dev)
    targets = [t.targets(batch, need_importance=..., stats=..., compression=...) for t in teachers]

An online teacher runs one no-grad forward per step (under ``inference_mode``, in its
``dtype``; one teacher's activations at a time, only its targets are kept); an offline one
(``source: offline:<dir>``) reads what ``latentfast-kv-cache`` wrote. Both return the same
dict, so the loss cannot tell them apart:

    kv          [(K, V) (B, H, T, d) per layer pair]   (full targets), or
    rkv         [compressed target per layer pair]      (--kv_compression rkv)
    importance  (B, T) the teacher's attention importance, when asked for
    nll/entropy (B,) the teacher's mean NLL / predictive entropy on the gold answer tokens
"""
from __future__ import annotations

import contextlib
import dataclasses
import pathlib
import sys
import time
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from latentfast.data.kv_cache import KVCacheReader
from latentfast.eval.answers import answer_ce, answer_metrics
from latentfast.hf import adapter
from latentfast.hf.capture import KVCapture
from latentfast.nn import CKALoss, CODILoss
from latentfast.nn.kv_adapter import kv_adapters, layer_map
from latentfast.nn.multi_teacher_kv import MultiTeacherKVLoss
from latentfast.nn.teacher_weighting import answer_nll_entropy, weight_entropy
from latentfast.ops.kv_compression import cot_answer_spans, rkv_compress

from .common import SampleStream
from .loop import Trainer
from .teachers import COMPRESSIONS, TeacherSpec, TeachersConfig


@dataclass
class Compression:
    slots: int = 24
    lam: float = 0.1


def _detached(x):
    """Inference tensors cannot be saved for the student's backward: plain copies."""
    if x is None:
        return None
    if isinstance(x, torch.Tensor):
        return x.clone()
    if isinstance(x, dict):
        return {k: _detached(v) for k, v in x.items()}
    return type(x)(_detached(v) for v in x)


def teacher_targets(teacher, capture: KVCapture, batch: dict, layers, *, importance_layer: int | None = None,
                    stats: bool = False, compression: Compression | None = None, hidden: bool = False,
                    amp=contextlib.nullcontext) -> dict:
    """One teacher's targets for ``batch`` (``kv_distill.encode``'s dict) at teacher ``layers``
    (``hidden``: also its hidden states, for CKA / CODI)."""
    out = {"kv": None, "rkv": None, "importance": None, "nll": None, "entropy": None, "hidden": None}
    mask = batch["attention_mask"]
    with torch.inference_mode(), capture, amp():
        o = teacher.model(input_ids=batch["input_ids"], attention_mask=mask, output_hidden_states=hidden)
        if hidden:
            out["hidden"] = o.hidden_states
        if compression is not None:
            cot, start = cot_answer_spans(batch["targets"], batch["answer_pos"])
            out["rkv"] = [rkv_compress(*capture.qk(L), capture.kv(L)[1], attention_mask=mask, cot_mask=cot,
                                       answer_start=start, slots=compression.slots, lam=compression.lam)
                          for L in layers]
        else:
            out["kv"] = [capture.kv(L) for L in layers]
        if importance_layer is not None:
            from latentfast.ops import attention_token_importance

            out["importance"] = attention_token_importance(*capture.qk(importance_layer), attention_mask=mask)
        if stats:
            out["nll"], out["entropy"] = answer_nll_entropy(teacher.get_output_embeddings(), o.last_hidden_state,
                                                            batch["targets"])
    capture.clear()
    return _detached(out)


class Teacher:
    """One teacher: its spec, config, layer pairs and either a frozen model (online) or a
    cache reader (offline)."""

    def __init__(self, spec: TeacherSpec, config, pairs, model=None, reader: KVCacheReader | None = None,
                 importance_layer: int = -1, compression: Compression | None = None):
        self.spec, self.config, self.pairs = spec, config, list(pairs)
        self.model, self.reader = model, reader
        self.layers = [t for _, t in self.pairs]
        self.importance_layer = importance_layer % config.num_hidden_layers
        self.compression = compression
        self.memo = None  # the demo's --compare: {batch key: targets}, shared by every run (same sample stream)
        self.warm_s = None  # the demo's warm-up seconds (--compare's table)
        self.capture = None
        if model is not None:
            q_layers = set(self.layers) if compression is not None else set()
            self.capture = KVCapture(model, self.layers, sorted(q_layers | {self.importance_layer}))

    @property
    def name(self) -> str:
        return self.spec.name

    def targets(self, batch: dict, *, need_importance: bool, stats: bool, hidden: bool = False,
                amp=contextlib.nullcontext) -> dict:
        if self.memo is not None:  # computed once for all runs, with the statistics every rule may read
            key = (tuple(batch["row_ids"]), need_importance, hidden)
            if key not in self.memo:
                self.memo[key] = self._targets(batch, need_importance=need_importance, stats=True, hidden=hidden,
                                               amp=amp)
            return self.memo[key]
        return self._targets(batch, need_importance=need_importance, stats=stats, hidden=hidden, amp=amp)

    def _targets(self, batch: dict, *, need_importance: bool, stats: bool, hidden: bool, amp) -> dict:
        if self.reader is not None:
            if hidden:
                raise ValueError(f"teacher {self.name!r} is offline (source {self.spec.source}): its cache holds no "
                                 f"hidden states, which --cka_weight / --codi_weight need; use source: online")
            return self.reader.batch(batch["row_ids"], batch["input_ids"], batch["attention_mask"], self.layers,
                                     batch["input_ids"].device)
        return teacher_targets(self.model, self.capture, batch, self.layers,
                               importance_layer=self.importance_layer if need_importance else None, stats=stats,
                               compression=self.compression, hidden=hidden, amp=amp)

    def remove(self):
        if self.capture is not None:
            self.capture.remove()


def _teacher_config(spec: TeacherSpec):
    from transformers import AutoConfig

    from latentfast.models.local import from_local

    return from_local(AutoConfig, spec.model)


def load_teachers_from_config(cfg: TeachersConfig, student_config, tok, *, kv_layers="all", device="cpu",
                              importance_layer: int = -1, compression: Compression | None = None,
                              need_importance: bool = False, need_stats: bool = False) -> list[Teacher]:
    """Build every teacher of ``cfg``: online ones loaded frozen in their dtype (tokenizer
    checked against the student's), offline ones as cache readers (checked for the layers,
    importance and statistics this run needs)."""
    from latentfast.models.local import load_causal_lm

    out = []
    for spec in cfg.teachers:
        if spec.offline_dir is not None:
            config = _teacher_config(spec)
            pairs = layer_map(student_config.num_hidden_layers, config.num_hidden_layers, spec.layer_map, kv_layers)
            reader = KVCacheReader(spec.offline_dir)
            reader.check([t for _, t in pairs], need_importance, need_stats)
            if bool(reader.compressed) != (compression is not None):
                raise ValueError(f"teacher {spec.name!r}: offline cache {spec.offline_dir} was built "
                                 f"{'with' if reader.compressed else 'without'} --kv_compression rkv, this run "
                                 f"{'uses' if compression is not None else 'does not use'} it")
            out.append(Teacher(spec, config, pairs, reader=reader, importance_layer=importance_layer))
            continue
        tok_t, model = load_causal_lm(spec.model, device, dtype=spec.torch_dtype(device))
        check_same_tokenizer(tok, tok_t, spec.name)
        out.append(online_teacher(spec, model, student_config, kv_layers=kv_layers, importance_layer=importance_layer,
                                  compression=compression))
    return out


def online_teacher(spec: TeacherSpec, model, student_config, *, kv_layers="all", importance_layer: int = -1,
                   compression: Compression | None = None) -> Teacher:
    """A ``Teacher`` around a model already in memory (frozen here): the Python API and the demo."""
    model.eval().requires_grad_(False)
    pairs = layer_map(student_config.num_hidden_layers, model.config.num_hidden_layers, spec.layer_map, kv_layers)
    return Teacher(spec, model.config, pairs, model=model, importance_layer=importance_layer, compression=compression)


def check_same_tokenizer(tok_s, tok_t, name: str = "teacher") -> None:
    probe = "Question: Tom has 12 apples.\nAnswer:\n12*3=36\n#### 36"
    if len(tok_s) != len(tok_t) or tok_s(probe)["input_ids"] != tok_t(probe)["input_ids"]:
        raise SystemExit(f"{name} and the student must share a tokenizer (KV distillation aligns token positions)")


# ----------------------------------------------------------------------------- the trainable side
def row_tag(row: dict) -> str | None:
    """A training row's task/mode tag (``per_task`` weighting, per-task weight logs)."""
    return row.get("mode") or row.get("task")


class MultiTeacherDistiller(nn.Module):
    """The student, every teacher's KV adapters (in ``MultiTeacherKVLoss``), the learned
    router and per-teacher CODI maps; ``forward(batch, targets, step)`` -> (loss, metrics):

        loss = CE + kv_weight * sum_k w_k L_KV(student, teacher_k) + router_reg_weight * reg
                  + cka_weight * sum_k wbar_k CKA_k + codi_weight * sum_k wbar_k CODI_k

    ``w`` (B, K) per sample from ``--teacher_weighting``; CKA / CODI are batch-level, so
    they take the batch mean ``wbar_k``. With one teacher at weight 1 every term is the
    single-teacher ``KVDistiller``'s, computed the same way."""

    def __init__(self, student, teachers: Sequence[Teacher], cfg, task_table: dict | None = None,
                 tags: Sequence[str] = ()):
        super().__init__()
        self.student = student
        s_cfg = student.config
        self.names = [t.name for t in teachers]
        self.kv_weight, self.cka_weight, self.codi_weight = cfg.kv_weight, cfg.cka_weight, cfg.codi_weight
        self.router_reg_weight = cfg.router_reg_weight
        self.weighted = cfg.use_attention_weighted_kv
        self.use_teacher_attention = cfg.use_teacher_attention
        self.s_imp = cfg.importance_layer % s_cfg.num_hidden_layers
        self.tags = sorted(set(tags))
        adapters = [kv_adapters(t.spec.kv_adapter, t.pairs, s_cfg, t.config) for t in teachers]
        warm = cfg.attention_weighted_kv_warmup if self.weighted else sys.maxsize
        self.mt = MultiTeacherKVLoss([t.pairs for t in teachers], adapters, self.names, cfg.teacher_weighting,
                                     [t.spec.weight for t in teachers], task_table,
                                     router_hidden_size=s_cfg.hidden_size, router_hidden=cfg.router_hidden,
                                     router_regularizer=cfg.router_regularizer, warmup_steps=warm,
                                     use_teacher_attention=cfg.use_teacher_attention)
        self.cka = CKALoss(cfg.cka_layers) if self.cka_weight else None
        self.codi = nn.ModuleList(CODILoss("blocks", student_dim=s_cfg.hidden_size, teacher_dim=t.config.hidden_size)
                                  for t in teachers) if self.codi_weight else None
        self.capture = KVCapture(student, self.mt.student_layers, [self.s_imp])

    @property
    def need_hidden(self) -> bool:
        return self.cka is not None or self.codi is not None

    def need_importance(self, step: int) -> bool:
        return self.use_teacher_attention and self.mt.weighting_active(step)

    def status(self, step: int) -> str:
        return self.mt.kv[0].status(step) if self.weighted else ""

    def forward(self, batch, targets: Sequence[dict], step: int):
        mask, tags = batch["attention_mask"], batch.get("tags")
        weighting = self.mt.weighting_active(step)
        with self.capture:
            out = adapter.decoder(self.student)(input_ids=batch["input_ids"], attention_mask=mask,
                                                output_hidden_states=self.need_hidden)
        ce = answer_ce(self.student, out.last_hidden_state, batch["targets"])
        loss, met = ce, {"ce": ce.detach()}
        stat = (lambda key: torch.stack([t[key] for t in targets], 1)) if self.mt.needs_stats else (lambda key: None)
        w = self.mt.weights(batch_size=mask.shape[0], nll=stat("nll"), entropy=stat("entropy"), tags=tags,
                            hidden=out.last_hidden_state, attention_mask=mask, device=mask.device)
        s_kv = {s: self.capture.kv(s) for s in self.mt.student_layers}
        if self.kv_weight:
            if weighting:  # the plain MSE too, so weighted and unweighted runs compare on one scale
                with torch.no_grad():
                    met["kv_mse"] = self.mt(s_kv, targets, w.detach(), step=-1, attention_mask=mask)[0]
            student_attention = self.capture.qk(self.s_imp) if weighting and not self.use_teacher_attention else None
            kv, reg, m = self.mt(s_kv, targets, w, step=step, attention_mask=mask, student_attention=student_attention)
            loss = loss + self.kv_weight * kv
            if self.mt.router is not None:
                loss = loss + self.router_reg_weight * reg
            met.update(m, kv=kv.detach())
            met.setdefault("kv_mse", met["kv"])
        wbar = w.mean(0)
        if self.cka is not None:
            cka = [self.cka(out.hidden_states, t["hidden"], mask) for t in targets]
            loss = loss + self.cka_weight * sum(wbar[k] * c for k, c in enumerate(cka))
            met["cka"] = sum(wbar[k].detach() * c.detach() for k, c in enumerate(cka))
        if self.codi is not None:
            pos = batch["answer_pos"]
            codi = [f(out.hidden_states, t["hidden"], pos, pos) for f, t in zip(self.codi, targets)]
            loss = loss + self.codi_weight * sum(wbar[k] * c for k, c in enumerate(codi))
            met["codi"] = sum(wbar[k].detach() * c.detach() for k, c in enumerate(codi))
        wd = w.detach()
        met["w_entropy"] = weight_entropy(wd)
        for k, name in enumerate(self.names):
            met[f"w/{name}"] = wd[:, k].mean()
        if tags is not None:  # sums and counts (same keys on every rank); step_metrics turns them into means
            for tag in self.tags:
                sel = torch.tensor([t == tag for t in tags], device=wd.device)
                met[f"_n/{tag}"] = sel.sum().float()
                for k, name in enumerate(self.names):
                    met[f"_wsum/{tag}/{name}"] = wd[sel, k].sum()
        self.capture.clear()
        met["loss"] = loss.detach()
        return loss, met


def per_task_weight_means(row: dict) -> None:
    """``w/<tag>/<teacher>`` = the step's mean weight of that teacher on samples tagged
    ``tag``, from the ``_wsum``/``_n`` sums ``MultiTeacherDistiller`` logs (dropped after)."""
    for key in [k for k in row if k.startswith("_wsum/")]:
        _, tag, name = key.split("/", 2)
        n = row.get(f"_n/{tag}", 0.0)
        if n > 0:
            row[f"w/{tag}/{name}"] = row[key] / n
        del row[key]
    for key in [k for k in row if k.startswith("_n/")]:
        del row[key]


# ----------------------------------------------------------------------------- the trainer
class MultiTeacherKVDistill(Trainer):
    """``latentfast-kv-distill --teachers``: every teacher's targets are computed per
    micro-batch in ``batches`` (one teacher's activations alive at a time, only targets
    kept), the weighted loss in ``loss``. The eval rows are scored per task/mode tag."""

    name = "kv_distill"

    def __init__(self, cfg, student, teachers: Sequence[Teacher], tok, rows, eval_rows, task_table=None):
        super().__init__(cfg)
        self.student, self.teachers, self.tok, self.rows, self.eval_rows = student, list(teachers), tok, rows, eval_rows
        self.task_table = task_table

    def setup(self):
        self.stream = SampleStream(list(range(len(self.rows))), self.cfg.seed)  # row ids: the offline cache's keys
        self.row_tags = [row_tag(r) for r in self.rows]

    def build_model(self):
        self.distiller = MultiTeacherDistiller(self.student, self.teachers, self.cfg, self.task_table,
                                               [t for t in self.row_tags if t is not None]).to(self.device)
        return self.distiller

    def fsdp_layers(self, module):
        return list(adapter.decoder_layers(self.student))

    def num_train_items(self):
        return len(self.rows)

    def batches(self, step):  # lazy: one micro-batch's teacher targets alive at a time
        from .kv_distill import encode

        c, d = self.cfg, self.distiller
        for m in range(c.gradient_accumulation_steps):
            ids = self.micro_items(self.stream, step, m, c.per_device_train_batch_size)
            batch = encode(self.tok, [self.rows[i] for i in ids], c.max_length, self.device)
            batch["row_ids"], batch["tags"] = ids, [self.row_tags[i] for i in ids]
            yield batch, [t.targets(batch, need_importance=d.need_importance(step), stats=d.mt.needs_stats,
                                    hidden=d.need_hidden, amp=self.amp) for t in self.teachers]

    def loss(self, mb):
        batch, targets = mb
        return self.model(batch, targets, self.step)

    def state_dict(self):  # the router's running loss levels (a buffer; checkpoints keep trainable weights)
        scale = getattr(self.distiller.mt, "router_loss_scale", None)
        return {} if scale is None else {"router_loss_scale": scale.tolist()}

    def load_state_dict(self, state):
        if "router_loss_scale" in state and getattr(self.distiller.mt, "router_loss_scale", None) is not None:
            self.distiller.mt.router_loss_scale.copy_(torch.tensor(state["router_loss_scale"]))

    def step_metrics(self, row):
        per_task_weight_means(row)
        row["attn_weighted"] = bool(self.distiller.mt.last_weighted)

    def log_line(self, row):
        parts = [f"loss={row['loss']:.4f}", f"ce={row['ce']:.4f}"] + [
            f"{k}={row[k]:.4f}" for k in ("kv", "cka", "codi") if k in row] + [
            f"w/{n}={row[f'w/{n}']:.2f}" for n in self.distiller.names]
        return f"Step {row['step']}: {' '.join(parts)} {self.distiller.status(row['step'])}".rstrip()

    def progress(self, row):
        return dict(loss=f"{row['loss']:.3f}", ce=f"{row['ce']:.3f}", kv=f"{row.get('kv', 0):.4f}")

    def evaluate(self, step):
        if step < self.total or not self.eval_rows:  # the final student only
            return {}
        return eval_by_tag(self.student, self.tok, self.eval_rows, self.cfg, self.device, self.amp, self.rank,
                           self.world)

    def on_train_end(self, result):
        if self.rank == 0:
            self.student.save_pretrained(str(self.out / "student"))
            self.tok.save_pretrained(str(self.out / "student"))
        self.distiller.capture.remove()
        return result


def eval_by_tag(lm, tok, rows, cfg, device, amp, rank=0, world=1) -> dict:
    """``answer_metrics`` per task/mode tag (``eval_ce/<tag>``, ``eval_accuracy/<tag>``)
    and over all rows: ``eval_accuracy`` exactly, ``eval_ce`` as the row-weighted mean of
    the tags' (token-weighted) CEs. Rows without tags: plain ``answer_metrics``."""
    groups: dict = {}
    for r in rows:
        groups.setdefault(row_tag(r), []).append(r)
    if len(groups) < 2:
        return answer_metrics(lm, tok, rows, cfg.max_length, cfg.max_new_tokens, device, amp, rank, world)
    res, n = {}, len(rows)
    for tag in sorted(groups, key=str):
        sub = answer_metrics(lm, tok, groups[tag], cfg.max_length, cfg.max_new_tokens, device, amp, rank, world)
        res.update({f"{k}/{tag}": v for k, v in sub.items()})
        for k, v in sub.items():
            res[k] = res.get(k, 0.0) + v * len(groups[tag]) / n
    return res


# ----------------------------------------------------------------------------- demo, --compare, the run
DEMO = "tiny"
# two tiny teachers of other shapes than the student (128 wide, 4 blocks, 4/2 heads) and than each other
DEMO_TEACHERS = {
    "eq": dict(hidden_size=192, num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=3,
               intermediate_size=512),
    "nl": dict(hidden_size=160, num_hidden_layers=4, num_attention_heads=5, num_key_value_heads=5,
               intermediate_size=448),
}
# sized so that --compare (two teacher warm-ups + eight students) stays within ~15 min at one CPU thread:
# one-step problems (~40 tokens), 300 teacher steps (~80% held-out on their own mode), 80 student steps
MT_DEMO_PRESET = dict(lr=2e-3, batch_size=32, max_steps=80, warmup_ratio=0.05, dataset_name="synthetic_two_mode",
                      eval_data="synthetic_two_mode", subset_size=4000, eval_size=160, max_length=64,
                      logging_steps=20, save_steps=0, teacher_sft_steps=300, teacher_sft_lr=3e-3, max_new_tokens=20,
                      teacher_weighting="learned", router_reg_weight=1.0)
COMPARE_RULES = ("static", "per_task", "confidence", "entropy", "min_ce", "learned")


def demo_teachers(cfg, tok, student_config, rows, device) -> tuple[list[Teacher], TeachersConfig]:
    """Two tiny teachers, each warmed up (SFT on the loop) on one reasoning mode of ``rows``."""
    from latentfast.models.local import load_causal_lm
    from .sft import SFT, SFTConfig

    specs, teachers = [], []
    for i, (mode, shape) in enumerate(DEMO_TEACHERS.items()):
        spec = TeacherSpec(model=f"{DEMO}:{mode}", name=mode, mode=mode, kv_adapter="linear" if i == 0 else "mlp")
        _, model = load_causal_lm(DEMO, device, seed=cfg.seed + 1 + i, **shape)
        if cfg.teacher_sft_steps:
            warm = SFTConfig(output_dir=str(pathlib.Path(cfg.output_dir) / f"teacher_{mode}"), seed=cfg.seed + i,
                             device=cfg.device, bf16=cfg.bf16, lr=cfg.teacher_sft_lr, max_steps=cfg.teacher_sft_steps,
                             warmup_ratio=0.05, per_device_train_batch_size=cfg.per_device_train_batch_size,
                             max_length=cfg.max_length,
                             logging_steps=0, save_steps=0, eval_size=0, save_model=False)
            sft = SFT(warm, lm=model, tok=tok, rows=[r for r in rows if r.get("mode") == mode], eval_rows=[])
            sft.name = f"teacher {mode} warm-up"
            t0 = time.time()
            sft.fit()
            warm_s = time.time() - t0
        specs.append(spec)
        teachers.append(online_teacher(spec, model, student_config, kv_layers=cfg.kv_layers,
                                       importance_layer=cfg.importance_layer, compression=_compression(cfg)))
        if cfg.teacher_sft_steps:
            teachers[-1].warm_s = warm_s
    return teachers, TeachersConfig(specs)


def _compression(cfg) -> Compression | None:
    return Compression(cfg.kv_slots, cfg.kv_lambda) if cfg.kv_compression == "rkv" else None


def held_out(rows: list[dict], eval_rows: list[dict]) -> list[dict]:
    """``eval_rows`` minus the problems that occur in ``rows`` (synthetic data repeats)."""
    seen = {r["question"] for r in rows}
    return [r for r in eval_rows if r["question"] not in seen]


def summarize_run(name: str, res: dict, names: Sequence[str]) -> dict:
    h = res["history"]
    tail = h[-max(1, len(h) // 10):]  # mean of the last 10% of steps
    mean = (lambda k: sum(r[k] for r in tail if k in r) / max(1, sum(k in r for r in tail)))
    keys = sorted({k for r in tail for k in r if k.startswith(("w/", "kv/"))})
    return {"config": name, "ce": mean("ce"), "kv": mean("kv"), "first_ce": h[0]["ce"] if h else float("nan"),
            **{k: mean(k) for k in keys}, "w_entropy": mean("w_entropy"), **res["final"],
            "step_ms": 1e3 * sum(r["step_s"] for r in h[1:]) / max(1, len(h) - 1)}


def compare_table(rows: list[dict], tags: Sequence[str], names: Sequence[str]) -> str:
    head = ["config"] + [f"acc [{t}]" for t in tags] + ["acc (all)"] + [f"CE [{t}]" for t in tags] + \
        ["KV loss"] + [f"KV vs {n}" for n in names] + [f"w [{t}]" for t in tags] + ["w entropy", "step ms", "run s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    nan = float("nan")
    for r in rows:
        cells = [r["config"]] + [f"{r.get(f'eval_accuracy/{t}', nan):.3f}" for t in tags] + \
            [f"{r.get('eval_accuracy', nan):.3f}"] + [f"{r.get(f'eval_ce/{t}', nan):.3f}" for t in tags] + \
            [f"{r['kv']:.4f}" if "kv" in r else "-"] + \
            [f"{r[f'kv/{n}']:.4f}" if f"kv/{n}" in r else "-" for n in names] + \
            [" / ".join(f"{n} {r[f'w/{t}/{n}']:.2f}" for n in names if f"w/{t}/{n}" in r) or "-" for t in tags] + \
            [f"{r['w_entropy']:.3f}" if "w_entropy" in r else "-", f"{r['step_ms']:.0f}" if "step_ms" in r else "-",
             f"{r['seconds']:.0f}" if "seconds" in r else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_weights(results: dict, path, names: Sequence[str], tags: Sequence[str]) -> None:
    """One panel per routed configuration: each teacher's mean weight per task/mode tag over training."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    routed = {k: v for k, v in results.items() if not k.startswith("only ")}
    fig, axes = plt.subplots(1, max(1, len(routed)), figsize=(4.0 * max(1, len(routed)), 3.3), squeeze=False)
    for ax, (cname, res) in zip(axes[0], routed.items()):
        for i, tag in enumerate(tags):
            for j, n in enumerate(names):
                pts = [(r["step"], r[f"w/{tag}/{n}"]) for r in res["history"] if f"w/{tag}/{n}" in r]
                if pts:
                    ax.plot(*zip(*pts), color=f"C{j}", ls=("-", "--", ":", "-.")[i % 4], lw=1.2,
                            label=f"[{tag}] samples: w({n})")
        ax.set_ylim(-0.03, 1.03)
        ax.set_title(cname)
        ax.set_xlabel("step")
    axes[0][0].set_ylabel("mean teacher weight")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_multi_teacher(cfg):
    """``latentfast-kv-distill --teachers ...`` / ``--multi_teacher_demo`` [``--compare``]."""
    import copy
    import json

    from latentfast.runtime import dist
    from latentfast.data.rows import load_rows
    from latentfast.models.local import load_causal_lm
    from latentfast.runtime.device import amp_context
    from .teachers import load_teachers

    device, rank, world = dist.setup(cfg.device)
    t_start = time.time()
    out = pathlib.Path(cfg.output_dir)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    amp = amp_context(device, cfg.bf16)
    tok, student = load_causal_lm(cfg.model_name, device, dtype=torch.float32, seed=cfg.seed)  # fp32 master weights
    rows = load_rows(cfg.dataset_name, cfg.subset_size, cfg.seed)
    eval_rows = load_rows(cfg.eval_data, cfg.eval_size, cfg.seed + 10_000) if cfg.eval_size else []
    if cfg.multi_teacher_demo:
        if rank == 0:
            print("[kv_distill] multi-teacher demo; presets: " + json.dumps(
                {k: getattr(cfg, k) for k in MT_DEMO_PRESET}), flush=True)
        eval_rows = held_out(rows, eval_rows)
        teachers, tcfg = demo_teachers(cfg, tok, student.config, rows, device)
    else:
        tcfg = load_teachers(cfg.teachers)
        rules = (cfg.teacher_weighting,) if not cfg.compare else COMPARE_RULES
        teachers = load_teachers_from_config(
            tcfg, student.config, tok, kv_layers=cfg.kv_layers, device=device, importance_layer=cfg.importance_layer,
            compression=_compression(cfg), need_importance=cfg.use_attention_weighted_kv and cfg.use_teacher_attention,
            need_stats=any(r in ("confidence", "entropy", "min_ce") for r in rules))
    names = [t.name for t in teachers]
    tags = sorted({row_tag(r) for r in eval_rows} - {None})
    teacher_rows = []  # the teachers' own held-out scores (rank 0), the first rows of --compare's table
    if rank == 0 and eval_rows:
        for t in teachers:
            if t.model is not None:
                ev = eval_by_tag(t.model, tok, eval_rows, cfg, device, amp)
                teacher_rows.append({"config": f"teacher {t.name}", **ev,
                                     **({"seconds": t.warm_s} if t.warm_s is not None else {})})
                print(f"[kv_distill] teacher {t.name}: " + ", ".join(
                    f"{k} {v:.3f}" for k, v in ev.items() if k.startswith("eval_accuracy")), flush=True)

    def fit(c, ts, table):
        return MultiTeacherKVDistill(c, student, ts, tok, rows, eval_rows, table).fit()

    if not cfg.compare:
        res = fit(cfg, teachers, tcfg.task_table())
        if rank == 0:
            s = summarize_run("run", res, names)
            acc = "".join(f"{k} {v:.3f}; " for k, v in s.items() if k.startswith("eval_accuracy"))
            print(f"[kv_distill] CE {s['first_ce']:.3f} -> {s['ce']:.3f}, KV {s['kv']:.4f}; {acc}"
                  f"{time.time() - t_start:.0f}s; {out}", flush=True)
    else:
        init = copy.deepcopy(student.state_dict())  # every configuration starts from the same student
        if cfg.multi_teacher_demo:
            # every run draws the same batches: the frozen teachers' targets are computed once and kept
            # (tiny models: ~tens of MB per step; real teachers recompute, or use offline caches)
            for t in teachers:
                t.memo = {}
        runs = [(f"only {t.name}", [t], "static") for t in teachers]
        has_tags = any(k != "default" for k in tcfg.task_table())
        runs += [(rule, teachers, rule) for rule in COMPARE_RULES if rule != "per_task" or has_tags]
        results, summary = {}, []
        for cname, ts, rule in runs:
            c = cfg.replace(output_dir=str(out / cname.replace(" ", "_")), teacher_weighting=rule)
            if len(ts) == 1:
                ts = [copy.copy(ts[0])]
                ts[0].spec = dataclasses.replace(ts[0].spec, weight=1.0)
            student.load_state_dict(init)
            if rank == 0:
                print(f"[kv_distill] --compare: {cname} (teachers {[t.name for t in ts]}, weighting {rule})",
                      flush=True)
            t0 = time.time()
            results[cname] = fit(c, ts, tcfg.task_table() if len(ts) > 1 else None)
            summary.append(dict(summarize_run(cname, results[cname], names), seconds=time.time() - t0))
        res = {"compare": summary}
        if rank == 0:
            table = compare_table(teacher_rows + summary, tags, names)
            (out / "compare.md").write_text(table + "\n")
            (out / "compare.json").write_text(json.dumps(teacher_rows + summary, indent=1))
            plot_weights(results, out / "routing_weights.png", names, tags)
            print(table + f"\n[kv_distill] table {out / 'compare.md'}, plot {out / 'routing_weights.png'}; "
                  f"{time.time() - t_start:.0f}s", flush=True)
    for t in teachers:
        t.remove()
    dist.cleanup()
    return res
