"""Where the fused thinking residual's time goes on a GPU: per-kernel CUDA time of one
fwd+bwd (torch.profiler), next to eager's and the GEMMs alone.

    python bench/profile_thinking_residual.py [--N 8192] [--D 1536] [--out DIR]
"""
from __future__ import annotations

import argparse
import pathlib

import torch
from torch.profiler import ProfilerActivity, profile

from bench_thinking_residual import _fwd_bwd, _gemms_only, _inputs
from latentfast.ops import thinking_residual
from latentfast.reference.thinking_residual import thinking_residual as eager


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--N", type=int, default=8192)
    p.add_argument("--D", type=int, default=1536)
    p.add_argument("--out", default=None, help="also write the tables to DIR/profile_thinking_residual.txt")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    tensors = _inputs(args.N, args.D, torch.bfloat16, torch.device("cuda"))
    grad_out = torch.randn(args.N, args.D, device="cuda", dtype=torch.bfloat16)
    report = []
    for name, step in (("latentfast", _fwd_bwd(thinking_residual, tensors, grad_out)),
                       ("eager", _fwd_bwd(eager, tensors, grad_out)),
                       ("gemms_only", _gemms_only(tensors, grad_out))):
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                step()
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=20)
        report.append(f"## {name}: N={args.N} D={args.D} bf16, 5 calls\n{table}\n")
    text = "\n".join(report)
    print(text)
    if args.out:
        pathlib.Path(args.out, "profile_thinking_residual.txt").write_text(text)


if __name__ == "__main__":
    main()
