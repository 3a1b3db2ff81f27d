"""``--compare``: several students from one initial state, then one table, JSON and plots.

One teacher: the recipe's three configurations (``COMPARE``: baseline, +attention,
+attention+CKA). Several: each teacher alone at weight 1, then every weighting rule.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import time
from pathlib import Path
from typing import Sequence


COMPARE = {  # the recipe's three configurations (seed note 004)
    "baseline": dict(use_attention_weighted_kv=False, use_teacher_attention=False, cka_weight=0.0),
    "+attention": dict(use_attention_weighted_kv=True, use_teacher_attention=False, cka_weight=0.0),
    "+attention+cka": dict(use_attention_weighted_kv=True, use_teacher_attention=True, cka_weight=None),
}
COMPARE_RULES = ("static", "per_task", "confidence", "entropy", "min_ce", "learned")


def runs(cfg, teachers, task_table: dict) -> list[tuple[str, object, list, dict | None]]:
    """(name, config, teachers, task table) of each student to train."""
    if len(teachers) == 1:
        out = []
        for name, over in COMPARE.items():
            over = {k: v if v is not None else (cfg.cka_weight or 0.05) for k, v in over.items()}
            out.append((name, cfg.replace(output_dir=str(Path(cfg.output_dir) / name.strip("+").replace("+", "_")),
                                          **over), teachers, None))
        return out
    out = []
    for t in teachers:
        alone = copy.copy(t)
        alone.spec = dataclasses.replace(t.spec, weight=1.0)
        out.append((f"only {t.name}", "static", [alone], None))
    has_tags = any(k != "default" for k in task_table)
    out += [(rule, rule, teachers, task_table) for rule in COMPARE_RULES if rule != "per_task" or has_tags]
    return [(name, cfg.replace(output_dir=str(Path(cfg.output_dir) / name.replace(" ", "_")), teacher_weighting=rule),
             ts, table) for name, rule, ts, table in out]


def run_compare(cfg, fit, teachers, task_table: dict, *, memo: bool, rank: int = 0, log=print) -> tuple[dict, list]:
    """Train every student of ``runs`` from the same initial state (``fit(config, teachers,
    table)`` -> the loop's result); returns (results by name, summary rows)."""
    if memo:  # every run draws the same batches: frozen teachers' targets computed once and kept
        for t in teachers:
            t.memo = {}
    results, summary = {}, []
    for name, c, ts, table in runs(cfg, teachers, task_table):
        if rank == 0:
            log(f"[kv_distill] --compare: {name} (teachers {[t.name for t in ts]}, weighting {c.teacher_weighting}, "
                f"attention {c.use_attention_weighted_kv}, teacher attention {c.use_teacher_attention}, "
                f"cka {c.cka_weight})")
        t0 = time.time()
        results[name] = fit(c, ts, table)
        summary.append(dict(summarize(name, results[name]), seconds=time.time() - t0))
    return results, summary


def summarize(name: str, res: dict) -> dict:
    """A run's means over the last 10% of steps (less noisy than the last one) and its final metrics."""
    h = res["history"]
    tail = h[-max(1, len(h) // 10):]
    mean = (lambda k: sum(r[k] for r in tail if k in r) / max(1, sum(k in r for r in tail)))
    keys = sorted({k for r in tail for k in r if k.startswith(("w/", "kv/"))})
    return {"config": name, "first_ce": h[0]["ce"] if h else float("nan"),
            **{k: mean(k) for k in ("ce", "kv", "kv_mse", "cka", "loss", "w_entropy")},
            **{k: mean(k) for k in keys}, **res["final"],
            "step_ms": 1e3 * sum(r["step_s"] for r in h[1:]) / max(1, len(h) - 1),
            "peak_mem_mb": max((r["peak_mem_mb"] for r in h), default=0.0)}


def compare_table(rows: list[dict], tags: Sequence[str], names: Sequence[str]) -> str:
    """Markdown: held-out accuracy and CE (per task/mode tag when there are tags), the KV
    losses (per teacher when several), CKA, the routing weights per tag, time and memory."""
    nan = float("nan")
    several = len(names) > 1
    cols = [("config", lambda r: r["config"])]
    cols += [(f"acc [{t}]", lambda r, t=t: f"{r.get(f'eval_accuracy/{t}', nan):.3f}") for t in tags]
    cols += [("acc (all)", lambda r: f"{r.get('eval_accuracy', nan):.3f}"),
             ("eval CE", lambda r: f"{r.get('eval_ce', nan):.3f}")]
    cols += [(f"CE [{t}]", lambda r, t=t: f"{r.get(f'eval_ce/{t}', nan):.3f}") for t in tags]
    num = (lambda key, fmt=".4f": lambda r: format(r[key], fmt) if key in r else "-")
    cols += [("train CE (first -> last)", lambda r: f"{r['first_ce']:.3f} -> {r['ce']:.3f}" if "ce" in r else "-"),
             ("KV loss", num("kv")), ("KV MSE (unweighted)", num("kv_mse"))]
    if several:
        cols += [(f"KV vs {n}", num(f"kv/{n}")) for n in names]
        cols += [(f"w [{t}]", lambda r, t=t: " / ".join(f"{n} {r[f'w/{t}/{n}']:.2f}" for n in names
                                                          if f"w/{t}/{n}" in r) or "-") for t in tags]
        cols += [("w entropy", num("w_entropy", ".3f"))]
    cols += [("CKA", num("cka")), ("step ms", num("step_ms", ".0f")), ("peak MB", num("peak_mem_mb", ".0f")),
             ("run s", num("seconds", ".0f"))]
    lines = ["| " + " | ".join(h for h, _ in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(f(r) for _, f in cols) + " |" for r in rows]
    return "\n".join(lines)


def write_report(out: Path, rows: list[dict], results: dict, tags, names, warmup: int) -> str:
    """compare.md, compare.json, loss_curves.png (and routing_weights.png with several teachers)."""
    table = compare_table(rows, tags, names)
    (out / "compare.md").write_text(table + "\n")
    (out / "compare.json").write_text(json.dumps(rows, indent=1))
    plot_curves(results, out / "loss_curves.png", warmup)
    if len(names) > 1:
        plot_weights(results, out / "routing_weights.png", names, tags)
    return table


def _pyplot():
    import matplotlib  # plots only: matplotlib is loaded when a report is drawn, not at start-up

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(results: dict, path: Path, warmup: int) -> None:
    """loss, CE, unweighted KV MSE and CKA over training, one colour per configuration."""
    plt = _pyplot()
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


def plot_weights(results: dict, path, names: Sequence[str], tags: Sequence[str]) -> None:
    """One panel per routed configuration: each teacher's mean weight per task/mode tag over training."""
    plt = _pyplot()
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
