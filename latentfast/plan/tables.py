"""The README's predicted tables: every trainer family at the seed notes' settings
(``presets.SEED_SETTINGS``), the peers' way (recipe) vs latentfast, on a 4090 and an A100 80 GB.

    latentfast-plan --tables            # prints the markdown and writes bench/results/plan_tables.md

Memory does not depend on the card (the fused ops' chunk is sized for CUDA either way), so
each step is planned once per implementation and set against both devices."""
from __future__ import annotations

import pathlib
import time

from . import devices as D
from .planner import plan, step_time
from .presets import SEED_SETTINGS

TABLE_DEVICES = ("4090", "a100-80")


def _cell(p, dev) -> str:
    need = p.needed_bytes + D.CUDA_CONTEXT_BYTES
    return f"{need / (1 << 30):.1f} GB {'fits' if need <= dev.memory_bytes else '**OOM**'}"


def breakdown(label: str, plans) -> str:
    """One row's peaks by category (GiB), each implementation's at its own peak phase."""
    lines = [f"- {label}:"]
    for p in plans:
        parts = ", ".join(f"{k} {v / (1 << 30):.2f}" for k, v in p.breakdown.items())
        lines.append(f"  - {p.workload.impl}: peak {p.peak_bytes / (1 << 30):.2f} GiB in '{p.peak_phase}' = {parts}")
    return "\n".join(lines)


def build_table(settings=SEED_SETTINGS, out=print, details: list | None = None) -> str:
    """The markdown table; ``details`` (a list) receives each row's breakdown."""
    devs = [D.get_device(d) for d in TABLE_DEVICES]
    head = ["setting"] + [f"{k} on {d.name}" for d in devs for k in ("recipe", "latentfast")] + \
        [f"latentfast step on {d.name}" for d in devs]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, w in settings:
        t0 = time.perf_counter()
        lf = plan(w, devs[0], options=False)
        rc = plan(w.replace(impl="recipe"), devs[0], options=False)
        cells = [label]
        for d in devs:
            cells += [_cell(rc, d), _cell(lf, d)]
        for d in devs:
            cells.append(f"~{sum(step_time(w, lf.stats, lf.flops, d).values()):.1f} s")
        rows.append("| " + " | ".join(cells) + " |")
        if details is not None:
            details.append(breakdown(label, (lf, rc)))
        out(rows[-1] + f"  <!-- planned in {time.perf_counter() - t0:.0f} s -->")
    note = (f"Predicted by `latentfast-plan --tables` (fake-tensor step on a CPU; no GPU measured). Memory: allocator "
            f"peak + {D.ALLOCATOR_OVERHEAD:.0%} rounding/fragmentation + {D.CUDA_CONTEXT_BYTES / (1 << 30):.1f} GiB "
            f"CUDA context, against the card's memory (4090: 23.99 GiB, A100 80 GB: 80 GiB). Step time: roofline at "
            f"{D.COMPUTE_EFFICIENCY:.0%} of the dense bf16 peak (4090 165.2, A100 312 TFLOP/s) and "
            f"{D.BANDWIDTH_EFFICIENCY:.0%} of the bandwidth (1008 / 2039 GB/s), a lower bound: per op "
            f"(RuntimeEstimator's cost model) over the trainer's own step.")
    return "\n".join(rows) + "\n\n" + note + "\n"


def main() -> int:
    details: list = []
    text = build_table(details=details)
    path = pathlib.Path("bench/results/plan_tables.md")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\nPeak memory by category (allocator peak, before the rounding reserve and the CUDA "
                           "context):\n\n" + "\n".join(details) + "\n")
    print(text)
    print(f"written to {path}")
    return 0
