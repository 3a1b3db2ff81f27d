"""Fused thinking residual (fwd+bwd) vs eager PyTorch vs torch.compile of eager, and
the floor: the same GEMMs with no elementwise work (``gemms_only``). On CPU,
``latentfast*`` rows run with LATENTFAST_NATIVE=0 (the reference: no Triton there), and
``latentfast_native*`` rows take the fused op with the native epilogues (latentfast/kernels/csrc,
when the library is built)."""
from __future__ import annotations

import contextlib
import os
from functools import partial

import torch

from measure import compare

from latentfast.ops import _native, thinking_residual
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


@contextlib.contextmanager
def _native_switch(on: bool):
    old = os.environ.get(_native.ENV_SWITCH)
    os.environ[_native.ENV_SWITCH] = "1" if on else "0"
    try:
        yield
    finally:
        if old is None:
            del os.environ[_native.ENV_SWITCH]
        else:
            os.environ[_native.ENV_SWITCH] = old


def _native_on(fn, on: bool):
    """``fn`` run with the native CPU epilogues switched on or off."""
    def run(*args):
        with _native_switch(on):
            return fn(*args)
    return run


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
    native = device.type == "cpu" and _native.available()
    lean = partial(thinking_residual, recompute_gates=True)
    fused = {"latentfast": _native_on(thinking_residual, False), "latentfast_recompute_gates": _native_on(lean, False)}
    if native:
        fused.update(latentfast_native=_native_on(thinking_residual, True),
                     latentfast_native_recompute_gates=_native_on(lean, True))
    cases = []
    for N, D in shapes:
        tensors = _inputs(N, D, dtype, device)
        grad_out = torch.randn(N, D, device=device, dtype=dtype)
        impls = {
            "eager": _fwd_bwd(eager, tensors, grad_out),
            "torch_compile": _fwd_bwd(compiled, tensors, grad_out),
            **{name: _fwd_bwd(fn, tensors, grad_out) for name, fn in fused.items()},
            "gemms_only": _gemms_only(tensors, grad_out),
        }
        rows = compare(impls, device, baseline="eager")
        fwd = {"eager": eager, "torch_compile": compiled, **fused}
        _saved_activations(rows, fwd, tensors)
        for name in ("latentfast", "latentfast_native"):
            r = rows.get(name, {})
            if "ms" in r:
                for other in ("torch_compile", "gemms_only"):
                    if "ms" in rows[other]:
                        r["speedup_vs_" + other] = round(rows[other]["ms"] / r["ms"], 3)
        backend = "triton" if device.type == "cuda" else "torch ops (no Triton on CPU)" + (
            "; latentfast_native: fused op, latentfast/kernels/csrc epilogues" if native else "")
        cases.append({"op": "thinking_residual fwd+bwd", "N": N, "D": D, "dtype": str(dtype).replace("torch.", ""),
                      "backend": backend, "impls": rows})
        del tensors, grad_out
    return cases
