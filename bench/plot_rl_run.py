"""Reward curve of an RL run (``metrics.jsonl`` of latentfast-grpo / -rloo) -> PNG + JSON + Markdown.

    python bench/plot_rl_run.py runs/grpo/metrics.jsonl --out bench/results/grpo_gemma_learning \\
        --title "GRPO LoRA on gemma-3-270m" --note "settings ..."

The curve: the per-step mean reward (sampled completions) and its moving average over
``--window`` steps; the summary compares the first and last ``--window`` steps.
"""
from __future__ import annotations

import argparse
import json
import pathlib


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("metrics")
    p.add_argument("--out", required=True, help="path prefix: <out>.png / .json / .md")
    p.add_argument("--title", default="RL run")
    p.add_argument("--note", default="")
    p.add_argument("--window", type=int, default=8)
    a = p.parse_args()
    rows = [json.loads(x) for x in pathlib.Path(a.metrics).read_text().splitlines() if x.strip()]
    rows = [r for r in rows if "reward" in r]
    steps = [r["step"] for r in rows]
    reward = [r["reward"] for r in rows]
    w = max(1, min(a.window, len(reward) // 2))
    avg = [sum(reward[max(0, i - w + 1):i + 1]) / len(reward[max(0, i - w + 1):i + 1]) for i in range(len(reward))]
    first, last = sum(reward[:w]) / w, sum(reward[-w:]) / w
    summary = dict(steps=len(rows), window=w, reward_first=first, reward_last=last,
                   reward_first_half=sum(reward[:len(reward) // 2]) / max(1, len(reward) // 2),
                   reward_second_half=sum(reward[len(reward) // 2:]) / max(1, len(reward) - len(reward) // 2),
                   step_s_median=sorted(r["step_s"] for r in rows)[len(rows) // 2],
                   rollout_s_median=(sorted(r["rollout_s"] for r in rows)[len(rows) // 2] if "rollout_s" in rows[0]
                                     else None),
                   peak_mem_mb=max(r.get("peak_mem_mb", 0) for r in rows), note=a.note)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, reward, ".", alpha=0.5, label="mean reward of the step's completions")
    ax.plot(steps, avg, "-", lw=2, label=f"moving average ({w} steps)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("reward (accuracy)")
    ax.set_title(a.title)
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    out = pathlib.Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out.with_suffix(".png"), dpi=110)
    out.with_suffix(".json").write_text(json.dumps(dict(summary=summary, steps=steps, reward=reward,
                                                        step_s=[r["step_s"] for r in rows]), indent=1))
    md = [f"# {a.title}", "", a.note, "",
          f"steps {len(rows)}; mean reward of the first {w} steps {first:.3f} -> last {w} steps {last:.3f}; "
          f"first half {summary['reward_first_half']:.3f} -> second half {summary['reward_second_half']:.3f}; "
          f"median {summary['step_s_median']:.0f} s/step wall; peak RSS {summary['peak_mem_mb']:.0f} MB", "",
          f"![reward curve]({out.with_suffix('.png').name})", ""]
    out.with_suffix(".md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
