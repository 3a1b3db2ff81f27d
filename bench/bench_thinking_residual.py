"""Fused thinking residual (fwd+bwd) vs eager PyTorch vs torch.compile of eager, and
the floor: the same GEMMs with no elementwise work (``gemms_only``)."""
from __future__ import annotations

from functools import partial

import torch

from measure import compare

from latentfast.ops import thinking_residual
from latentfast.profiling import saved_activation_bytes
from latentfast.reference.thinking_residual import lambda_init
from latentfast.reference.thinking_residual import thinking_residual as eager


def _inputs(N, D, dtype, device):
    mk = lambda *s, scale=1.0: (torch.randn(*s, device=device) * scale).to(dtype).requires_grad_(True)  # noqa: E731
    return [mk(N, D), mk(N, D), mk(D, D, scale=D**-0.5), mk(D, D, scale=D**-0.5), mk(D, scale=0.1),
            mk(D, D, scale=D**-0.5), mk(D, scale=0.1), lambda_init(0.9, 0.999, 8.0, D).to(device, dtype).requires_grad_(True)]


def _fwd_bwd(fn, tensors, grad_out):
    def step():
        out, a = fn(*tensors)
        out.backward(grad_out)
        for t in tensors:
            t.grad = None
    return step


def _gemms_only(tensors, grad_out):
    """The floor: just the GEMMs the fused op runs (forward p and the stacked gates;
    backward p again, de, [dW_r; dW_i], dW_p, dh), no elementwise work at all."""
    e, h, W_p, W_r, b_r, W_i, b_i, _ = [t.detach() for t in tensors]
    W_ri, b_ri = torch.cat([W_r, W_i]), torch.cat([b_r, b_i])
    dz = torch.cat([grad_out, grad_out], 1)

    def step():
        p, z = h @ W_p.t(), torch.addmm(b_ri, e, W_ri.t())  # forward
        p = h @ W_p.t()  # backward recomputes p
        de = torch.addmm(grad_out, dz, W_ri)
        dW_ri = dz.t() @ e
        dW_p, dh = p.t() @ h, p @ W_p
        return z, de, dW_ri, dW_p, dh
    return step


def _saved_activations(rows: dict, fwd: dict, tensors: list) -> None:
    """Activation memory proper: bytes autograd keeps for backward beyond inputs and
    outputs (the peak column also counts the gradients and the backward's temporaries)."""
    for name, fn in fwd.items():
        if "error" in rows[name]:
            continue
        _, saved = saved_activation_bytes(lambda: fn(*tensors), tensors)
        rows[name]["saved_activation_mb"] = round(saved / 2**20, 2)
    base = rows["eager"].get("saved_activation_mb")
    for r in rows.values():
        if base and "saved_activation_mb" in r:
            r["saved_activation_vs_eager"] = round(r["saved_activation_mb"] / base, 3)


def run(device: torch.device, quick: bool) -> list[dict]:
    if quick:
        shapes, dtype = [(512, 256), (1024, 512)], torch.float32
    else:
        shapes, dtype = [(8192, 1536), (8192, 4096)], torch.bfloat16
    compiled = torch.compile(eager)
    cases = []
    for N, D in shapes:
        tensors = _inputs(N, D, dtype, device)
        grad_out = torch.randn(N, D, device=device, dtype=dtype)
        impls = {
            "eager": _fwd_bwd(eager, tensors, grad_out),
            "torch_compile": _fwd_bwd(compiled, tensors, grad_out),
            "latentfast": _fwd_bwd(thinking_residual, tensors, grad_out),
            "latentfast_recompute_gates": _fwd_bwd(partial(thinking_residual, recompute_gates=True), tensors, grad_out),
            "gemms_only": _gemms_only(tensors, grad_out),
        }
        rows = compare(impls, device, baseline="eager")
        fwd = {"eager": eager, "torch_compile": compiled, "latentfast": thinking_residual,
               "latentfast_recompute_gates": partial(thinking_residual, recompute_gates=True)}
        _saved_activations(rows, fwd, tensors)
        fused = rows["latentfast"]
        if "ms" in fused:
            for other in ("torch_compile", "gemms_only"):
                if "ms" in rows[other]:
                    fused["speedup_vs_" + other] = round(rows[other]["ms"] / fused["ms"], 3)
        cases.append({"op": "thinking_residual fwd+bwd", "N": N, "D": D, "dtype": str(dtype).replace("torch.", ""),
                      "backend": "triton" if device.type == "cuda" else "torch ops (no Triton on CPU)", "impls": rows})
        del tensors, grad_out
    return cases
