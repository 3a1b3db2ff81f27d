"""Fused lm_head losses on the engine (fwd+bwd): cross-entropy (SFT), DPO, JSD distillation.

impls per objective: eager (plain PyTorch on full fp32 logits), torch_compile (of eager),
liger (Liger-Kernel's counterpart; on CPU its chunked DPO/JSD with compiled=False and their
default chunk sizes, its CE is Triton-only), latentfast (default settings; on CPU the native
kernels when built), three_matmuls (forward GEMM + the two backward GEMMs: the floor).
The GRPO loss has its own benchmark (bench_grpo_loss.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from measure import compare, needs

from latentfast.nn import FusedLinearCrossEntropyLoss, FusedLinearDPOLoss, FusedLinearJSDLoss


def _three_matmuls(x, W):
    x2, Wd = x.detach().reshape(-1, x.shape[-1]), W.detach()

    def step():
        logits = x2 @ Wd.t()
        return logits @ Wd, logits.t() @ x2
    return step


def _step(fn, *params):
    def step():
        loss = fn()
        loss = loss[0] if isinstance(loss, tuple) else loss
        loss.backward()
        for p in params:
            p.grad = None
    return step


def _liger(name, build):
    try:
        from liger_kernel import chunked_loss  # noqa: F401
    except ImportError:
        return needs("liger-kernel not installed (pip install -e '.[bench]')")
    return build()


def _ce_case(B, T, H, V, dtype, device):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(B * T, H, generator=g) * 0.5).to(device, dtype).requires_grad_()
    W = (torch.randn(V, H, generator=g) * H ** -0.5).to(device, dtype).requires_grad_()
    y = torch.randint(0, V, (B * T,), generator=g).to(device)
    y[::7] = -100

    def eager():
        return F.cross_entropy((x @ W.t()).float(), y)

    compiled = torch.compile(eager)
    fused = FusedLinearCrossEntropyLoss()

    def liger_build():
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        if device.type != "cuda":
            return needs("needs CUDA (Liger's fused linear CE is Triton-only)")
        mod = LigerFusedLinearCrossEntropyLoss()
        return _step(lambda: mod(W, x, y), x, W)

    impls = {"eager": _step(eager, x, W), "torch_compile": _step(compiled, x, W),
             "liger": _liger("ce", liger_build), "latentfast": _step(lambda: fused(W, x, y), x, W),
             "three_matmuls": _three_matmuls(x, W)}
    return "cross-entropy (SFT)", {"N": B * T, "H": H, "V": V}, impls


def _dpo_case(P, T, H, V, dtype, device):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(2 * P, T, H, generator=g) * 0.5).to(device, dtype).requires_grad_()
    x_ref = (torch.randn(2 * P, T, H, generator=g) * 0.5).to(device, dtype)
    W = (torch.randn(V, H, generator=g) * H ** -0.5).to(device, dtype).requires_grad_()
    y = torch.randint(0, V, (2 * P, T), generator=g).to(device)
    y[:, : T // 4] = -100
    m = (y != -100)

    def seq_logps(h):
        lp = torch.log_softmax((h @ W.t()).float(), -1).gather(-1, y.clamp(min=0)[..., None])[..., 0]
        return (lp * m).sum(-1)

    def eager():
        pi = seq_logps(x)
        with torch.no_grad():
            ref = seq_logps(x_ref)
        return -F.logsigmoid(0.1 * ((pi[:P] - pi[P:]) - (ref[:P] - ref[P:]))).mean()

    compiled = torch.compile(eager)
    fused = FusedLinearDPOLoss(beta=0.1)

    def liger_build():
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss
        mod = LigerFusedLinearDPOLoss(beta=0.1, compiled=device.type == "cuda")
        # its own target/inputs: Liger marks dims of them dynamic, which breaks torch_compile's guards
        xl, yl, rl = x.detach().clone().requires_grad_(), y.clone(), x_ref.clone()
        return _step(lambda: mod(W, xl, yl, ref_input=rl, ref_weight=W), xl, W)

    impls = {"eager": _step(eager, x, W), "torch_compile": _step(compiled, x, W),
             "liger": _liger("dpo", liger_build), "latentfast": _step(lambda: fused(W, x, y, ref_input=x_ref), x, W),
             "three_matmuls": _three_matmuls(x, W)}
    return "DPO (sigmoid, reference from ref_input)", {"pairs": P, "T": T, "H": H, "V": V}, impls


def _jsd_case(N, HS, HT, V, dtype, device):
    g = torch.Generator().manual_seed(0)
    xs = (torch.randn(N, HS, generator=g) * 0.5).to(device, dtype).requires_grad_()
    xt = (torch.randn(N, HT, generator=g) * 0.5).to(device, dtype)
    Ws = (torch.randn(V, HS, generator=g) * HS ** -0.5).to(device, dtype).requires_grad_()
    Wt = (torch.randn(V, HT, generator=g) * HT ** -0.5).to(device, dtype)
    y = torch.randint(0, V, (N,), generator=g).to(device)

    def eager():  # Liger's formula on full logits, beta = 0.5, T = 1, weights 0.5 / 0.5
        s = torch.log_softmax((xs @ Ws.t()).float(), -1)
        with torch.no_grad():
            t = torch.log_softmax((xt @ Wt.t()).float(), -1)
        mix = torch.logsumexp(torch.stack([s, t]), 0) - torch.log(torch.tensor(2.0))
        jsd = (0.5 * t.exp() * (t - mix) + 0.5 * s.exp() * (s - mix)).sum(-1).mean()
        hard = F.nll_loss(s, y)
        return 0.5 * jsd + 0.5 * hard

    compiled = torch.compile(eager)
    fused = FusedLinearJSDLoss()

    def liger_build():
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
        mod = LigerFusedLinearJSDLoss(compiled=device.type == "cuda")
        return _step(lambda: mod(xs, Ws, xt, Wt, y), xs, Ws)

    impls = {"eager": _step(eager, xs, Ws), "torch_compile": _step(compiled, xs, Ws),
             "liger": _liger("jsd", liger_build), "latentfast": _step(lambda: fused(xs, Ws, xt, Wt, y), xs, Ws),
             "three_matmuls": _three_matmuls(xs, Ws)}
    return "JSD distillation (beta 0.5)", {"N": N, "H_student": HS, "H_teacher": HT, "V": V}, impls


def run(device: torch.device, quick: bool) -> list[dict]:
    if quick:
        dtype = torch.float32
        specs = [(_ce_case, (4, 256, 128, 16384)), (_dpo_case, (4, 128, 128, 16384)),
                 (_jsd_case, (1024, 128, 192, 16384))]
    else:  # Qwen2.5-1.5B lm_head
        dtype = torch.bfloat16
        specs = [(_ce_case, (8, 1024, 1536, 151936)), (_dpo_case, (4, 1024, 1536, 151936)),
                 (_jsd_case, (8192, 1536, 2048, 151936))]
    cases = []
    for build, args in specs:
        op, shape, impls = build(*args, dtype, device)
        rows = compare(impls, device, baseline="eager")
        floor = rows.get("three_matmuls", {}).get("ms")
        for r in rows.values():
            if floor and "ms" in r:
                r["vs_three_matmuls"] = round(r["ms"] / floor, 3)
        cases.append({"op": op + " fwd+bwd", "shape": shape, "dtype": str(dtype).replace("torch.", ""),
                      "settings": "latentfast: default chunk; liger: default chunk_size, compiled="
                                  + str(device.type == "cuda"), "impls": rows})
        del impls
    return cases
