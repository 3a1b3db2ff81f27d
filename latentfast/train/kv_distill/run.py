"""The run of ``latentfast-kv-distill`` (``cli.py`` parses its command line, torch-free): the
student, the teachers (``--teacher_model``, ``--teachers`` or a demo's), one fit or ``--compare``.
"""
from __future__ import annotations

import copy
import time
from pathlib import Path

import torch

from latentfast.data.rows import load_rows
from latentfast.models.local import load_causal_lm
from latentfast.runtime import dist
from latentfast.runtime.device import amp_context

from . import demo
from .compare import run_compare, summarize, write_report
from .config import DEMO
from .data import row_tag
from .spec import load_teachers
from .teachers import compression_of, load_teachers_from_config, single_teacher
from .trainer import KVDistill, eval_by_tag


def build_teachers(cfg, tok, student, rows, device):
    """(teachers, their TeachersConfig): the demo's, ``--teachers``'s or ``--teacher_model``'s."""
    if cfg.multi_teacher_demo:
        return demo.demo_teachers(cfg, tok, student.config, rows, device)
    if not cfg.multi_teacher and cfg.teacher_model == DEMO:
        return demo.demo_teacher(cfg, tok, student.config, device)
    tcfg = load_teachers(cfg.teachers) if cfg.teachers is not None else single_teacher(cfg.teacher_model)
    rules = (cfg.teacher_weighting,) if not (cfg.compare and len(tcfg.teachers) > 1) else \
        ("confidence", "entropy", "min_ce")
    teachers = load_teachers_from_config(
        tcfg, student.config, tok, kv_layers=cfg.kv_layers, device=device, importance_layer=cfg.importance_layer,
        compression=compression_of(cfg), need_importance=cfg.use_attention_weighted_kv and cfg.use_teacher_attention,
        need_stats=any(r in ("confidence", "entropy", "min_ce") for r in rules) or (
            cfg.teacher_weighting == "learned" and cfg.router_signal == "answer_nll"))
    return teachers, tcfg


def run(cfg):
    """``latentfast-kv-distill``'s run of a parsed config (``cli.main``)."""
    device, rank, world = dist.setup(cfg.device)
    t_start = time.time()
    out = Path(cfg.output_dir)
    log = (lambda msg: print(msg, flush=True)) if rank == 0 else (lambda msg: None)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    if demo.banner(cfg):
        log("[kv_distill] " + demo.banner(cfg))
    amp = amp_context(device, cfg.bf16)
    tok, student = load_causal_lm(cfg.model_name, device, dtype=torch.float32, seed=cfg.seed)  # fp32 master weights
    rows = load_rows(cfg.dataset_name, cfg.subset_size, cfg.seed)
    eval_rows = load_rows(cfg.eval_data, cfg.eval_size, cfg.seed + 10_000) if cfg.eval_size else []
    if cfg.multi_teacher_demo:
        eval_rows = demo.held_out(rows, eval_rows)
    teachers, tcfg = build_teachers(cfg, tok, student, rows, device)
    names = [t.name for t in teachers]
    tags = sorted({row_tag(r) for r in eval_rows} - {None})
    teacher_rows = []  # the teachers' own held-out scores (rank 0), the first rows of --compare's table
    if rank == 0 and eval_rows:
        for t in teachers:
            if t.model is not None:
                ev = eval_by_tag(t.model, tok, eval_rows, cfg, device, amp)
                label = "teacher" if t.name == "teacher" else f"teacher {t.name}"  # --teacher_model: one, unnamed
                teacher_rows.append({"config": label, **ev, **({"seconds": t.warm_s} if t.warm_s is not None else {})})
                log(f"[kv_distill] {label}: " + ", ".join(f"{k} {v:.3f}" for k, v in ev.items()))

    def fit(c, ts, table):
        return KVDistill(c, student, ts, tok, rows, eval_rows, table).fit()

    if not cfg.compare:
        res = fit(cfg, teachers, tcfg.task_table())
        if rank == 0:
            s = summarize("run", res)
            ev = "".join(f"{k} {v:.3f}; " for k, v in s.items() if k.startswith(("eval_ce", "eval_accuracy")))
            log(f"[kv_distill] CE {s['first_ce']:.3f} -> {s['ce']:.3f}, KV {s['kv']:.4f}; {ev}"
                f"{time.time() - t_start:.0f}s; {out}")
    else:
        init = copy.deepcopy(student.state_dict())  # every configuration starts from the same student

        def fresh_fit(c, ts, table):
            student.load_state_dict(init)
            return fit(c, ts, table)

        results, summary = run_compare(cfg, fresh_fit, teachers, tcfg.task_table(), memo=cfg.multi_teacher_demo,
                                       rank=rank, log=log)
        res = {"compare": summary}
        if rank == 0:
            table = write_report(out, teacher_rows + summary, results, tags, names, cfg.attention_weighted_kv_warmup)
            log(table + f"\n[kv_distill] table {out / 'compare.md'}, plots in {out}; {time.time() - t_start:.0f}s")
    for t in teachers:
        t.remove()
    dist.cleanup()
    return res
