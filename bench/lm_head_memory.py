"""CPU peak-RSS check of the fused lm_head losses (issue 12's target): extra peak RSS of one
fwd+bwd step over the RSS after the inputs exist, each impl in a fresh process, default
settings (native backend built unless LATENTFAST_NATIVE=0), plus the median step time.

    python bench/lm_head_memory.py                  # B*T = 2048, H = 64, V = 151936, fp32
    python bench/lm_head_memory.py --bt 1024 --json out.json

impls: grpo_eager (latentfast.reference: full logits), grpo_fused (default chunk),
grpo_fused_1gib (the previous default: ~1 GiB of logits per chunk), ce_eager
(F.cross_entropy on full logits), ce_fused.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

IMPLS = ("grpo_eager", "grpo_fused", "grpo_fused_1gib", "ce_eager", "ce_fused")


def _rss_kb() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def child(impl: str, bt: int, H: int, V: int, reps: int) -> dict:
    import torch
    import torch.nn.functional as F

    from latentfast.ops import _native, fused_linear_cross_entropy, fused_linear_grpo_loss
    from latentfast.reference.grpo_loss import grpo_loss

    native = _native.enabled()
    B, T = 2, bt // 2
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(B, T, H, generator=g) * 0.5).requires_grad_()
    W = (torch.randn(V, H, generator=g) * H ** -0.5).requires_grad_()
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    adv = torch.randn(B, generator=g)
    ref = torch.full((B, T), -8.0) + 0.1 * torch.randn(B, T, generator=g)
    kw = dict(beta=0.04, epsilon_low=0.2, epsilon_high=0.28, loss_type="dapo")
    steps = {
        "grpo_eager": lambda: grpo_loss(x, W, ids, mask, adv, None, ref, None, **kw)[0],
        "grpo_fused": lambda: fused_linear_grpo_loss(x, W, ids, mask, adv, None, ref, None, **kw)[0],
        "grpo_fused_1gib": lambda: fused_linear_grpo_loss(x, W, ids, mask, adv, None, ref, None,
                                                         chunk_size=max(1, (1 << 30) // (V * 4) // T), **kw)[0],
        "ce_eager": lambda: F.cross_entropy((x.view(-1, H) @ W.t()).float(), ids.view(-1)),
        "ce_fused": lambda: fused_linear_cross_entropy(x.view(-1, H), W, ids.view(-1)),
    }
    step = steps[impl]

    def run():
        loss = step()
        loss.backward()
        x.grad = W.grad = None

    base = _rss_kb()
    t0 = time.perf_counter()
    run()
    first = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return {"impl": impl, "extra_peak_rss_mb": round((peak - base) / 1024, 1), "ms": round(1e3 * statistics.median(times), 1),
            "first_ms": round(1e3 * first, 1), "native": native, "threads": torch.get_num_threads()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--bt", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--only", nargs="*", default=list(IMPLS), choices=IMPLS)
    p.add_argument("--json", default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(child(a.child, a.bt, a.hidden, a.vocab, a.reps)))
        return 0
    rows = {}
    for impl in a.only:
        cmd = [sys.executable, __file__, "--child", impl, "--bt", str(a.bt), "--hidden", str(a.hidden),
               "--vocab", str(a.vocab), "--reps", str(a.reps)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            rows[impl] = {"error": r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"rc={r.returncode}"}
        else:
            rows[impl] = json.loads(r.stdout.strip().splitlines()[-1])
        print(impl, rows[impl], flush=True)
    for fam in ("grpo", "ce"):
        e = rows.get(f"{fam}_eager", {})
        for name, r in rows.items():
            if name.startswith(fam) and "extra_peak_rss_mb" in r and e.get("extra_peak_rss_mb"):
                r["rss_vs_eager"] = round(r["extra_peak_rss_mb"] / e["extra_peak_rss_mb"], 3)
                r["speedup_vs_eager"] = round(e["ms"] / r["ms"], 2)
    out = {"shape": {"BT": a.bt, "H": a.hidden, "V": a.vocab}, "dtype": "float32", "impls": rows}
    print(json.dumps(out, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
