"""Fused HRPO thinking residual as ``torch.library`` custom ops.

    out, a = thinking_residual(e, h, W_p, W_r, b_r, W_i, b_i, Lambda, c=8.0, eps=1e-8)

Forward: two cuBLAS GEMMs (p = h W_p^T, and one stacked z = e [W_r; W_i]^T + b)
and one Triton epilogue (normalise, gate, mix). No N x D activation of the chain
(h', r, i, a, sqrt(.), products: seven in eager PyTorch) is kept for backward: it
recomputes p from the saved input h (one GEMM) and keeps only the gate
pre-activations z (or recomputes them too, ``recompute_gates=True``), runs one
Triton kernel for the whole elementwise chain rule, and the GEMMs for the weight /
input gradients. ``W_p=None`` serves the original HRPO
soft-embedding variant, where ``h`` is already the normalised thinking state.

Epilogues: Triton on CUDA or under ``TRITON_INTERPRET=1``; on CPU otherwise the native
C++ ones (``latentfast/kernels/csrc/thinking_residual.cpp``) when that library is built and not
switched off (``LATENTFAST_NATIVE=0``), with the same memory savings; else (and for
float64) ``thinking_residual()`` runs the plain reference with autograd.
"""
from __future__ import annotations

from typing import Optional

import torch

from latentfast.ops import _native
from latentfast.ops._dispatch import check_same_device, check_shape, check_tensor, use_triton
from latentfast.reference import thinking_residual as ref


def _projection(h, W_p):
    return h @ W_p.t() if W_p is not None else h


def _gemm_outputs(e, h, W_p, W_r, b_r, W_i, b_i):
    z = torch.addmm(torch.cat([b_r, b_i]), e, torch.cat([W_r, W_i]).t())
    return _projection(h, W_p), z


def _use_native(e: torch.Tensor) -> bool:
    return _native.usable(e, "thinking_residual_fwd_epilogue")


def _fused(e: torch.Tensor) -> bool:
    return use_triton(e) or _use_native(e)


def _epilogues(e: torch.Tensor):
    """(forward_epilogue, backward_epilogue): Triton (CUDA / interpreter), else native (CPU)."""
    if use_triton(e):
        from latentfast.kernels import thinking_residual as K  # Triton: optional on CPU

        return K.forward_epilogue, K.backward_epilogue
    if _use_native(e):
        ops = torch.ops.latentfast_native
        return ops.thinking_residual_fwd_epilogue, ops.thinking_residual_bwd_epilogue
    raise RuntimeError("latentfast::thinking_residual_* run Triton kernels (CUDA tensors, or CPU tensors with "
                       "TRITON_INTERPRET=1) or, on CPU, the native kernels (library built, LATENTFAST_NATIVE not 0, "
                       f"not float64); got {e.device.type} {e.dtype}. thinking_residual() uses the reference otherwise")


@torch.library.custom_op("latentfast::thinking_residual_fwd", mutates_args=())
def _fwd(
    e: torch.Tensor, h: torch.Tensor, W_p: Optional[torch.Tensor], W_r: torch.Tensor, b_r: torch.Tensor,
    W_i: torch.Tensor, b_i: torch.Tensor, Lambda: torch.Tensor, c: float, eps: float, recompute_gates: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (out, a, z); z (the gate pre-activations) is kept for backward unless
    ``recompute_gates``, in which case an empty tensor is returned instead."""
    forward_epilogue, _ = _epilogues(e)
    p, z = _gemm_outputs(e, h, W_p, W_r, b_r, W_i, b_i)
    out, a = forward_epilogue(e, p, z, Lambda, c, eps, W_p is not None)
    return out, a, (e.new_empty(0) if recompute_gates else z)


@_fwd.register_fake
def _(e, h, W_p, W_r, b_r, W_i, b_i, Lambda, c, eps, recompute_gates):
    z = e.new_empty(0) if recompute_gates else e.new_empty(e.shape[0], 2 * e.shape[1])
    return torch.empty_like(e), torch.empty_like(e), z


@torch.library.custom_op("latentfast::thinking_residual_bwd", mutates_args=())
def _bwd(
    grad_out: torch.Tensor, grad_a: Optional[torch.Tensor], z_saved: torch.Tensor,
    e: torch.Tensor, h: torch.Tensor, W_p: Optional[torch.Tensor], W_r: torch.Tensor, b_r: torch.Tensor,
    W_i: torch.Tensor, b_i: torch.Tensor, Lambda: torch.Tensor, c: float, eps: float,
) -> list[torch.Tensor]:
    """Gradients for (e, h, W_p, [W_r; W_i], b_r, b_i, Lambda): the two gate weights'
    gradients come stacked from one GEMM (op outputs may not alias, so the autograd
    formula splits them); dW_p is empty when W_p is None. ``z_saved`` is empty when the
    gates are to be recomputed."""
    _, backward_epilogue = _epilogues(e)
    D = e.shape[1]
    recompute_gates = z_saved.numel() == 0 and e.shape[0] > 0
    if recompute_gates:
        p, z = _gemm_outputs(e, h, W_p, W_r, b_r, W_i, b_i)
    else:
        p, z = _projection(h, W_p), z_saved.view(e.shape[0], 2 * D)
    # gradients overwrite only buffers recomputed here: p = h W_p^T (not h itself), and z when
    # recomputed (a saved z must survive retain_graph)
    de, dp, dz, d_lam, d_br, d_bi = backward_epilogue(
        e, p, z, Lambda, grad_out, grad_a, c, eps, W_p is not None,
        dp_in_place=W_p is not None, dz_in_place=recompute_gates)
    de = torch.addmm(de, dz, torch.cat([W_r, W_i]))
    dW_ri = dz.t() @ e  # (2D, D): both gate weights in one GEMM
    if W_p is not None:
        dW_p, dh = dp.t() @ h, dp @ W_p
    else:
        dW_p, dh = e.new_empty(0), dp
    return [de, dh, dW_p, dW_ri, d_br.to(b_r.dtype), d_bi.to(b_i.dtype), d_lam.to(Lambda.dtype)]


@_bwd.register_fake
def _(grad_out, grad_a, z_saved, e, h, W_p, W_r, b_r, W_i, b_i, Lambda, c, eps):
    dW_p = e.new_empty(0) if W_p is None else torch.empty_like(W_p)
    dW_ri = W_r.new_empty(2 * W_r.shape[0], W_r.shape[1])
    return [torch.empty_like(e), torch.empty_like(h), dW_p, dW_ri, torch.empty_like(b_r), torch.empty_like(b_i),
            torch.empty_like(Lambda)]


def _setup_context(ctx, inputs, output):
    *tensors, c, eps, _ = inputs
    ctx.has_proj = tensors[2] is not None
    ctx.save_for_backward(output[2], *[t for t in tensors if t is not None])
    ctx.c, ctx.eps = c, eps
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_out, grad_a, _grad_z):
    z_saved, *saved = ctx.saved_tensors
    if not ctx.has_proj:
        saved.insert(2, None)
    if grad_out is None:
        grad_out = torch.zeros_like(saved[0])
    de, dh, dW_p, dW_ri, d_br, d_bi, d_lam = _bwd(grad_out, grad_a, z_saved, *saved, ctx.c, ctx.eps)
    dW_r, dW_i = dW_ri.chunk(2)
    return (de, dh, dW_p if ctx.has_proj else None, dW_r, d_br, dW_i, d_bi, d_lam, None, None, None)


_fwd.register_autograd(_backward, setup_context=_setup_context)


def thinking_residual(
    e: torch.Tensor,
    h: torch.Tensor,
    W_p: Optional[torch.Tensor],
    W_r: torch.Tensor,
    b_r: torch.Tensor,
    W_i: torch.Tensor,
    b_i: torch.Tensor,
    Lambda: torch.Tensor,
    c: float = 8.0,
    eps: float = 1e-8,
    recompute_gates: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused ``out = a*e + sqrt(1 - a^2 + eps) * (i * normalize(W_p h))``; returns ``(out, a)``.

    Args:
        e: (N, D) token embeddings at thinking positions.
        h: (N, D) last hidden states there (raw; or the normalised state when ``W_p`` is None).
        W_p: (D, D) thinking projection weight, or None.
        W_r, W_i: (D, D) gate weights; b_r, b_i: (D,) gate biases; Lambda: (D,).
        recompute_gates: False keeps the gate pre-activations (N x 2D) for backward;
            True keeps nothing but the inputs and recomputes them (one more GEMM of
            N x D x 2D in backward, 2 N x D less memory). The projection is always recomputed.
    Under autocast every tensor is cast to the autocast dtype (like ``F.linear`` is);
    otherwise all must share e's dtype. Accumulation is fp32 in the kernels.
    """
    names = ["e", "h", "W_p", "W_r", "b_r", "W_i", "b_i", "Lambda"]
    tensors = [e, h, W_p, W_r, b_r, W_i, b_i, Lambda]
    for name, t in zip(names, tensors):
        if t is not None or name != "W_p":
            check_tensor(name, t, float_=True)
    check_tensor("e", e, ndim=2)
    N, D = e.shape
    check_shape("h", h, (N, D), "same as e: (N thinking positions, hidden size)")
    for name, t in (("W_p", W_p), ("W_r", W_r), ("W_i", W_i)):
        if t is not None:
            check_shape(name, t, (D, D), "(hidden size, hidden size)")
    for name, t in (("b_r", b_r), ("b_i", b_i), ("Lambda", Lambda)):
        check_shape(name, t, (D,), "(hidden size,)")
    check_same_device(**dict(zip(names, tensors)))

    if torch.is_autocast_enabled(e.device.type):
        dtype = torch.get_autocast_dtype(e.device.type)
        tensors = [None if t is None else t.to(dtype) for t in tensors]
    else:
        bad = [(n, t.dtype) for n, t in zip(names, tensors) if t is not None and t.dtype != e.dtype]
        if bad:
            raise TypeError(
                f"all inputs must have e's dtype {e.dtype} (or run under autocast); got "
                + ", ".join(f"{n}: {d}" for n, d in bad)
            )
    if not _fused(tensors[0]):  # no Triton / native epilogue (or float64): the plain recipe, autograd as usual
        return ref.thinking_residual(*tensors, c, eps)
    tensors[7] = tensors[7].contiguous()  # the kernels read Lambda with stride 1
    e, h = tensors[0].contiguous(), tensors[1].contiguous()
    out, a, _ = _fwd(e, h, *tensors[2:], float(c), float(eps), bool(recompute_gates))
    return out, a
