"""Run every benchmark and record the results.

    python bench/run.py                 # all benchmarks, on CUDA if present else CPU
    python bench/run.py --only thinking_residual grpo_loss
    python bench/run.py --device cpu

Each ``bench/bench_<name>.py`` exposes ``run(device, quick) -> list[dict]``; ``quick``
selects the small CPU shapes. Results go to ``bench/results/<device>.json``
(one key per benchmark, merged with earlier runs) and a Markdown table beside it.
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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="*", default=None, choices=BENCHMARKS)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--full", action="store_true", help="GPU-size shapes even on CPU (slow)")
    p.add_argument("--out", default=str(HERE / "results"))
    args = p.parse_args(argv)

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
    for bench in args.only or BENCHMARKS:
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
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
