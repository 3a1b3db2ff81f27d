"""Triton epilogues of the fused thinking residual.

The three GEMMs (p = h W_p^T and z = e [W_r; W_i]^T + b) go to cuBLAS; these
kernels fuse everything row-wise around them: the L2 normalisation of p, both
sigmoids, the Lambda gate and the output mix in the forward, and the whole
chain rule back to dp / dz (written in place over p / z) plus the column
reductions for dLambda, db_r, db_i in the backward. Every load is cast to fp32,
so bf16/fp16 inputs accumulate in fp32 (and the interpreter stays exact).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

NORM_EPS = 1e-8

@triton.jit
def _softplus_neg(lam):
    # softplus(-lam) with PyTorch's threshold=20 (linear above it)
    x = -lam
    return tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(tl.minimum(x, 20.0))))

@triton.jit
def _fwd_kernel(
    E, P, Z, LAM, OUT, A,
    D, stride_e, stride_p, stride_z, stride_out,
    c, eps, norm_eps,
    HAS_PROJ: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    m = cols < D
    e = tl.load(E + row * stride_e + cols, mask=m, other=0.0).to(tl.float32)
    p = tl.load(P + row * stride_p + cols, mask=m, other=0.0).to(tl.float32)
    zr = tl.load(Z + row * stride_z + cols, mask=m, other=0.0).to(tl.float32)
    zi = tl.load(Z + row * stride_z + D + cols, mask=m, other=0.0).to(tl.float32)
    lam = tl.load(LAM + cols, mask=m, other=0.0).to(tl.float32)

    if HAS_PROJ:
        hn = p / (tl.sqrt(tl.sum(p * p, axis=0)) + norm_eps)
    else:
        hn = p
    r = tl.sigmoid(zr)
    i = tl.sigmoid(zi)
    a = tl.exp(-c * _softplus_neg(lam) * r)
    g = tl.sqrt(1.0 - a * a + eps)
    out = a * e + g * (i * hn)
    tl.store(OUT + row * stride_out + cols, out.to(OUT.dtype.element_ty), mask=m)
    tl.store(A + row * stride_out + cols, a.to(A.dtype.element_ty), mask=m)

@triton.jit
def _bwd_kernel(
    E, P, Z, LAM, GOUT, GA, DE, PARTIAL,
    N, D, stride_e, stride_p, stride_z, stride_g, stride_de,
    c, eps, norm_eps, rows_per_program,
    HAS_PROJ: tl.constexpr, HAS_GA: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Reads p, z (recomputed GEMM outputs) and overwrites them with dp, dz.
    Writes the direct part of de (a * grad_out) and, per program, partial column
    sums of dLambda, db_r, db_i into PARTIAL[pid, 0:3, :]."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    m = cols < D
    lam = tl.load(LAM + cols, mask=m, other=0.0).to(tl.float32)
    s = _softplus_neg(lam)
    ds_dlam = -tl.sigmoid(-lam)
    ds_dlam = tl.where(-lam > 20.0, -1.0, ds_dlam)

    acc_lam = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_br = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_bi = tl.zeros([BLOCK_D], dtype=tl.float32)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, N)
    for row in range(row_start, row_end):

        e = tl.load(E + row * stride_e + cols, mask=m, other=0.0).to(tl.float32)
        p = tl.load(P + row * stride_p + cols, mask=m, other=0.0).to(tl.float32)
        zr = tl.load(Z + row * stride_z + cols, mask=m, other=0.0).to(tl.float32)
        zi = tl.load(Z + row * stride_z + D + cols, mask=m, other=0.0).to(tl.float32)
        go = tl.load(GOUT + row * stride_g + cols, mask=m, other=0.0).to(tl.float32)

        if HAS_PROJ:
            norm = tl.sqrt(tl.sum(p * p, axis=0))
            inv = 1.0 / (norm + norm_eps)
            hn = p * inv
        else:
            hn = p
        r = tl.sigmoid(zr)
        i = tl.sigmoid(zi)
        a = tl.exp(-c * s * r)
        g = tl.sqrt(1.0 - a * a + eps)

        d_a = go * (e - i * hn * a / g)
        if HAS_GA:
            d_a += tl.load(GA + row * stride_g + cols, mask=m, other=0.0).to(tl.float32)
        d_hn = go * g * i
        d_zi = go * g * hn * i * (1.0 - i)
        d_ar = d_a * a * (-c)  # d a / d(s*r) = -c a
        d_zr = d_ar * s * r * (1.0 - r)
        acc_lam += d_ar * r * ds_dlam
        acc_br += d_zr
        acc_bi += d_zi

        if HAS_PROJ:
            # d/dp [p / (|p| + eps)]; the |p| term vanishes on a zero row (torch's subgradient)
            dot = tl.sum(d_hn * p, axis=0)
            corr = tl.where(norm > 0.0, dot * inv * inv / tl.maximum(norm, 1e-30), 0.0)
            d_p = d_hn * inv - p * corr
        else:
            d_p = d_hn
        tl.store(P + row * stride_p + cols, d_p.to(P.dtype.element_ty), mask=m)
        tl.store(Z + row * stride_z + cols, d_zr.to(Z.dtype.element_ty), mask=m)
        tl.store(Z + row * stride_z + D + cols, d_zi.to(Z.dtype.element_ty), mask=m)
        tl.store(DE + row * stride_de + cols, (go * a).to(DE.dtype.element_ty), mask=m)

    base = PARTIAL + pid * 3 * D
    tl.store(base + cols, acc_lam, mask=m)
    tl.store(base + D + cols, acc_br, mask=m)
    tl.store(base + 2 * D + cols, acc_bi, mask=m)

def _launch_cfg(D: int):
    block = triton.next_power_of_2(D)
    num_warps = 4 if block <= 1024 else (8 if block <= 4096 else 16)
    return block, num_warps

def forward_epilogue(e, p, z, Lambda, c: float, eps: float, has_proj: bool):
    """e, p: (N, D); z: (N, 2D) = [e W_r^T + b_r, e W_i^T + b_i]. Returns (out, a)."""
    N, D = e.shape
    out = torch.empty_like(e)
    a = torch.empty_like(e)
    if N == 0:
        return out, a
    block, num_warps = _launch_cfg(D)
    _fwd_kernel[(N,)](
        e, p, z, Lambda, out, a,
        D, e.stride(0), p.stride(0), z.stride(0), out.stride(0),
        float(c), float(eps), NORM_EPS,
        HAS_PROJ=has_proj, BLOCK_D=block, num_warps=num_warps,
    )
    return out, a

def _num_programs(N: int, device: torch.device) -> int:
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(N, 4 * sms))
    return max(1, min(N, 4))

def backward_epilogue(e, p, z, Lambda, grad_out, grad_a, c: float, eps: float, has_proj: bool):
    """Overwrites p with dp and z with dz. Returns (de_direct, dLambda, db_r, db_i),
    the reductions in fp32."""
    N, D = e.shape
    de = torch.empty_like(e)
    if N == 0:
        zeros = torch.zeros(D, device=e.device, dtype=torch.float32)
        return de, zeros, zeros.clone(), zeros.clone()
    programs = _num_programs(N, e.device)
    rows_per_program = triton.cdiv(N, programs)
    programs = triton.cdiv(N, rows_per_program)
    partial = torch.empty(programs, 3, D, device=e.device, dtype=torch.float32)
    block, num_warps = _launch_cfg(D)
    grad_out = grad_out.contiguous()
    has_ga = grad_a is not None
    if has_ga:
        grad_a = grad_a.contiguous()
    _bwd_kernel[(programs,)](
        e, p, z, Lambda, grad_out, grad_a if has_ga else grad_out, de, partial,
        N, D, e.stride(0), p.stride(0), z.stride(0), grad_out.stride(0), de.stride(0),
        float(c), float(eps), NORM_EPS, rows_per_program,
        HAS_PROJ=has_proj, HAS_GA=has_ga, BLOCK_D=block, num_warps=num_warps,
    )
    sums = partial.sum(0)
    return de, sums[0].clone(), sums[1].clone(), sums[2].clone()  # separate storages: op outputs may not alias
