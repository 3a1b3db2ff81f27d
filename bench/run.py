"""Run the benchmarks and record the results.

    python bench/run.py                       # the quick set, on CUDA if present else CPU
    python bench/run.py --slow                # + the long ones (minimind_pretrain: ~7 min on 2 CPU cores)
    python bench/run.py --only thinking_residual grpo_loss
    python bench/run.py --out bench/results   # update the committed results
    python bench/run.py --compare bench/results/cpu.json   # this run against an earlier one

Each ``bench/bench_<name>.py`` exposes ``run(device, quick) -> list[dict]``; ``quick``
selects the small CPU shapes. Results go to ``<out>/<device>.json`` (one key per
benchmark, merged with earlier runs there) and a Markdown table beside it. ``--out``
defaults to ``bench/out/`` (git-ignored), so a run never dirties the checkout unless asked.
A peer that cannot run on this device (Liger's Triton-only kernels on a CPU) shows as
"skipped: needs CUDA". Run-to-run history: keep the JSON of each run and ``--compare``
prints each implementation's time and memory as a ratio of the earlier run's.
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import json
import pathlib
import sys
import time

import torch

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from measure import device_name  # noqa: E402

BENCHMARKS = ["thinking_residual", "grpo_loss", "lm_head_losses", "attention_importance", "hrpo_step",
              "kv_distill_step", "generation", "minimind_pretrain"]
SLOW = {"minimind_pretrain"}  # minutes on a small CPU: only with --slow or --only


def _slug(s: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in s.lower()).strip("-").replace("--", "-")


def to_markdown(results: dict) -> str:
    lines = []
    for bench, entry in results["benchmarks"].items():
        lines.append(f"### {bench}\n")
        for case in entry.get("cases", []):
            meta = {k: v for k, v in case.items() if k != "impls"}
            lines.append("`" + json.dumps(meta) + "`\n")
            saved = any("saved_activation_mb" in r for r in case["impls"].values())
            extra = " saved activations MB (ratio) |" if saved else ""
            lines.append("| impl | ms | peak extra MB | speed ratio | memory ratio |" + extra)
            lines.append("|---|---|---|---|---|" + ("---|" if saved else ""))
            for name, r in case["impls"].items():
                if "skipped" in r:
                    lines.append(f"| {name} | skipped: {r['skipped']} | | | |" + (" |" if saved else ""))
                    continue
                if "error" in r:
                    lines.append(f"| {name} | error: {r['error']} | | | |" + (" |" if saved else ""))
                    continue
                sp = next((f"{v} ({k[len('speedup_vs_'):]})" for k, v in r.items() if k.startswith("speedup_vs_")), "")
                mr = next((f"{v} ({k[len('memory_vs_'):]})" for k, v in r.items() if k.startswith("memory_vs_")), "")
                row = f"| {name} | {r['ms']} | {r['peak_extra_mb']} | {sp} | {mr} |"
                if saved:
                    row += f" {r.get('saved_activation_mb', '')} ({r.get('saved_activation_vs_eager', '')}) |"
                lines.append(row)
            lines.append("")
    return "\n".join(lines)


def compare_runs(new: dict, old: dict) -> str:
    """Each implementation's ms and peak memory now, as a ratio of an earlier run's (< 1: better now)."""
    lines = ["| benchmark | case | impl | ms now / before | peak MB now / before |", "|---|---|---|---|---|"]
    for bench, entry in new["benchmarks"].items():
        before = old.get("benchmarks", {}).get(bench, {}).get("cases", [])
        for i, case in enumerate(entry.get("cases", [])):
            prev = before[i]["impls"] if i < len(before) else {}
            for name, r in case["impls"].items():
                p = prev.get(name, {})
                if "ms" not in r or "ms" not in p:
                    continue
                mem = (f"{r['peak_extra_mb'] / p['peak_extra_mb']:.2f}"
                       if r.get("peak_extra_mb") and p.get("peak_extra_mb") else "")
                lines.append(f"| {bench} | {i} | {name} | {r['ms'] / p['ms']:.2f} | {mem} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--only", nargs="*", default=None, choices=BENCHMARKS)
    p.add_argument("--slow", action="store_true", help=f"also run the long benchmarks ({', '.join(sorted(SLOW))})")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--full", action="store_true", help="GPU-size shapes even on CPU (slow)")
    p.add_argument("--out", default=str(HERE / "out"),
                   help="results folder (default bench/out/, git-ignored; bench/results/ holds the committed ones)")
    p.add_argument("--compare", metavar="JSON", help="an earlier run's <device>.json to compare this run against")
    args = p.parse_args(argv)
    if args.compare and not pathlib.Path(args.compare).is_file():
        p.error(f"--compare: {args.compare} is not a file (expected an earlier run's <device>.json)")

    device = torch.device(args.device)
    quick = device.type == "cpu" and not args.full
    name = device_name(device)
    out_dir = pathlib.Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "cpu" if device.type == "cpu" else _slug(name)
    out_json = out_dir / f"{stem}.json"
    results = json.loads(out_json.read_text()) if out_json.exists() else {"benchmarks": {}}
    results.update(device=name, torch=torch.__version__, updated=datetime.datetime.now().isoformat(timespec="seconds"))

    failed = []
    for bench in args.only or [b for b in BENCHMARKS if args.slow or b not in SLOW]:
        try:
            mod = importlib.import_module(f"bench_{bench}")
        except ModuleNotFoundError as exc:
            print(f"[skip] {bench}: {exc}")
            continue
        print(f"[run ] {bench} on {name} ({'small' if quick else 'full'} shapes)", flush=True)
        t0 = time.time()
        try:
            cases = mod.run(device, quick)
        except Exception as exc:
            print(f"[fail] {bench}: {type(exc).__name__}: {exc}")
            failed.append(bench)
            continue
        results["benchmarks"][bench] = {"cases": cases, "seconds": round(time.time() - t0, 1)}
        out_json.write_text(json.dumps(results, indent=2))
        print(to_markdown({"benchmarks": {bench: results["benchmarks"][bench]}}), flush=True)
    (out_dir / f"{stem}.md").write_text(f"# {name} (torch {torch.__version__})\n\n" + to_markdown(results))
    print(f"results: {out_json}")
    if args.compare:
        print(compare_runs(results, json.loads(pathlib.Path(args.compare).read_text())))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
