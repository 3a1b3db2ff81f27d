"""Triton epilogues of the fused thinking residual.

The GEMMs (p = h W_p^T and one stacked z = e [W_r; W_i]^T + b) go to cuBLAS; these
kernels fuse everything around them, BLOCK_M rows x the full hidden size per tile:
the L2 normalisation of p, both sigmoids, the Lambda gate and the output mix in
the forward; in the backward, the whole chain rule back to dp / dz plus the
column reductions for dLambda, db_r, db_i (per-program partials, summed by the
caller: deterministic, no atomics). Every load is cast to fp32, so bf16/fp16
inputs accumulate in fp32 (and the interpreter stays exact).

All row-major buffers are contiguous: rows of e, p, out, a, grads have stride D,
rows of z / dz have stride 2D ([z_r | z_i]).
"""
from __future__ import annotations

import os
import time

import torch
import triton
import triton.language as tl

NORM_EPS = 1e-8

# Tile shapes are tuned on the device (once per hidden size, dtype and variant): the
# whole-row tiles keep ~15 fp32 values live per element, so the best rows-per-tile x
# warps trade-off between register spills and parallelism differs by GPU and D.
# Candidates hold 8-32 elements of each live tensor per thread.
_TILE_CONFIGS = [triton.Config({"BLOCK_M": m}, num_warps=w) for m in (1, 2, 4, 8, 16) for w in (4, 8, 16)]
TUNE_UNDER_INTERPRETER = False  # tests flip it to exercise the multi-config path on CPU


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _heuristic_tile(D: int) -> tuple[int, int]:
    """(BLOCK_M, num_warps) used when not tuning (the interpreter): ~4K elements per tile."""
    block_d = triton.next_power_of_2(D)
    block_m = max(1, min(16, 4096 // block_d))
    return block_m, (4 if block_d * block_m <= 2048 else 8 if block_d <= 4096 else 16)


def _prune_tiles(configs, named_args, **kwargs):
    block_d = kwargs["BLOCK_D"]
    if _interpreting() and not TUNE_UNDER_INTERPRETER:
        m, w = _heuristic_tile(named_args["D"])
        return [c for c in configs if c.kwargs["BLOCK_M"] == m and c.num_warps == w]
    kept = [c for c in configs if 8 <= c.kwargs["BLOCK_M"] * block_d // (32 * c.num_warps) <= 32]
    return kept or configs[:1]


def _bench(fn, quantiles=None, **_):
    """CUDA: Triton's benchmarker. Interpreter: a wall-clock timing (tests only)."""
    if not _interpreting():
        import triton.testing

        return triton.testing.do_bench(fn, quantiles=quantiles)
    t0 = time.perf_counter()
    fn()
    ms = (time.perf_counter() - t0) * 1e3
    return [ms] * len(quantiles) if quantiles else ms


def _autotune(key, restore_value=None):
    return triton.autotune(configs=_TILE_CONFIGS, key=key, restore_value=restore_value, do_bench=_bench,
                           prune_configs_by={"early_config_prune": _prune_tiles})


@triton.jit
def _softplus_neg(lam):
    # softplus(-lam) with PyTorch's threshold=20 (linear above it)
    x = -lam
    return tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(tl.minimum(x, 20.0))))


@_autotune(key=["D", "HAS_PROJ"])
@triton.jit
def _fwd_kernel(E, P, Z, LAM, OUT, A, N, D, c, eps, norm_eps,
                HAS_PROJ: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < N) & (cols[None, :] < D)
    offs = rows[:, None].to(tl.int64) * D + cols[None, :]
    z_offs = rows[:, None].to(tl.int64) * (2 * D) + cols[None, :]
    e = tl.load(E + offs, mask=mask, other=0.0).to(tl.float32)
    p = tl.load(P + offs, mask=mask, other=0.0).to(tl.float32)
    zr = tl.load(Z + z_offs, mask=mask, other=0.0).to(tl.float32)
    zi = tl.load(Z + z_offs + D, mask=mask, other=0.0).to(tl.float32)
    lam = tl.load(LAM + cols, mask=cols < D, other=0.0).to(tl.float32)

    if HAS_PROJ:
        hn = p / (tl.sqrt(tl.sum(p * p, axis=1))[:, None] + norm_eps)
    else:
        hn = p
    r = tl.sigmoid(zr)
    i = tl.sigmoid(zi)
    a = tl.exp(-c * _softplus_neg(lam)[None, :] * r)
    g = tl.sqrt(1.0 - a * a + eps)
    out = a * e + g * (i * hn)
    tl.store(OUT + offs, out.to(OUT.dtype.element_ty), mask=mask)
    tl.store(A + offs, a.to(A.dtype.element_ty), mask=mask)


@_autotune(key=["D", "HAS_PROJ", "HAS_GA"], restore_value=["P", "Z"])  # dp / dz may overwrite p / z
@triton.jit
def _bwd_kernel(E, P, Z, LAM, GOUT, GA, DE, DP, DZ, PARTIAL, N, D, c, eps, norm_eps, rows_per_program,
                HAS_PROJ: tl.constexpr, HAS_GA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Writes de_direct = a * grad_out, dp, dz (dp/dz may alias p/z: each tile is read
    before it is written) and per-program column partials of dLambda, db_r, db_i."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    lam = tl.load(LAM + cols, mask=col_ok, other=0.0).to(tl.float32)
    s = _softplus_neg(lam)[None, :]
    ds_dlam = tl.where(-lam > 20.0, -1.0, -tl.sigmoid(-lam))[None, :]

    acc_lam = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_br = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_bi = tl.zeros([BLOCK_D], dtype=tl.float32)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, N)
    for block_start in range(row_start, row_end, BLOCK_M):
        rows = block_start + tl.arange(0, BLOCK_M)
        mask = (rows[:, None] < row_end) & col_ok[None, :]
        offs = rows[:, None].to(tl.int64) * D + cols[None, :]
        z_offs = rows[:, None].to(tl.int64) * (2 * D) + cols[None, :]
        e = tl.load(E + offs, mask=mask, other=0.0).to(tl.float32)
        p = tl.load(P + offs, mask=mask, other=0.0).to(tl.float32)
        zr = tl.load(Z + z_offs, mask=mask, other=0.0).to(tl.float32)
        zi = tl.load(Z + z_offs + D, mask=mask, other=0.0).to(tl.float32)
        go = tl.load(GOUT + offs, mask=mask, other=0.0).to(tl.float32)

        if HAS_PROJ:
            norm = tl.sqrt(tl.sum(p * p, axis=1))[:, None]
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
            d_a += tl.load(GA + offs, mask=mask, other=0.0).to(tl.float32)
        d_hn = go * g * i
        d_zi = d_hn * hn * (1.0 - i)
        d_ar = d_a * a * (-c)  # d a / d(s * r) = -c * a
        d_zr = d_ar * s * r * (1.0 - r)
        acc_lam += tl.sum(d_ar * r * ds_dlam, axis=0)
        acc_br += tl.sum(d_zr, axis=0)
        acc_bi += tl.sum(d_zi, axis=0)

        if HAS_PROJ:
            # d/dp [p / (|p| + eps)]; the |p| term vanishes on a zero row (torch's subgradient)
            dot = tl.sum(d_hn * p, axis=1)[:, None]
            corr = tl.where(norm > 0.0, dot * inv * inv / tl.maximum(norm, 1e-30), 0.0)
            d_p = d_hn * inv - p * corr
        else:
            d_p = d_hn
        tl.store(DP + offs, d_p.to(DP.dtype.element_ty), mask=mask)
        tl.store(DZ + z_offs, d_zr.to(DZ.dtype.element_ty), mask=mask)
        tl.store(DZ + z_offs + D, d_zi.to(DZ.dtype.element_ty), mask=mask)
        tl.store(DE + offs, (go * a).to(DE.dtype.element_ty), mask=mask)

    base = PARTIAL + pid * 3 * D
    tl.store(base + cols, acc_lam, mask=col_ok)
    tl.store(base + D + cols, acc_br, mask=col_ok)
    tl.store(base + 2 * D + cols, acc_bi, mask=col_ok)


def forward_epilogue(e, p, z, Lambda, c: float, eps: float, has_proj: bool):
    """e, p: (N, D) contiguous; z: (N, 2D) = [e W_r^T + b_r | e W_i^T + b_i]. Returns (out, a)."""
    N, D = e.shape
    out, a = torch.empty_like(e), torch.empty_like(e)
    if N == 0:
        return out, a
    _fwd_kernel[lambda meta: (triton.cdiv(N, meta["BLOCK_M"]),)](
        e, p, z, Lambda, out, a, N, D, float(c), float(eps), NORM_EPS,
        HAS_PROJ=has_proj, BLOCK_D=triton.next_power_of_2(D),
    )
    return out, a


_MAX_BLOCK_M = 16


def _num_programs(N: int, device: torch.device) -> int:
    blocks = triton.cdiv(N, _MAX_BLOCK_M)
    if device.type == "cuda":
        return max(1, min(blocks, 4 * torch.cuda.get_device_properties(device).multi_processor_count))
    return max(1, min(blocks, 4))


def backward_epilogue(e, p, z, Lambda, grad_out, grad_a, c: float, eps: float, has_proj: bool,
                      dp_in_place: bool, dz_in_place: bool):
    """Returns (de_direct, dp, dz, dLambda, db_r, db_i); reductions in fp32.
    ``dp_in_place`` / ``dz_in_place`` write dp over p / dz over z, for buffers that were
    recomputed for this call (never for saved tensors or inputs)."""
    N, D = e.shape
    de = torch.empty_like(e)
    dp = p if dp_in_place else torch.empty_like(p)
    dz = z if dz_in_place else torch.empty_like(z)
    if N == 0:
        zeros = [torch.zeros(D, device=e.device, dtype=torch.float32) for _ in range(3)]
        return (de, dp, dz, *zeros)
    # A fixed grid of persistent programs, each owning a row range that every tuned
    # BLOCK_M divides; the per-program column partials do not depend on the tile shape.
    programs = _num_programs(N, e.device)
    rows_per_program = triton.cdiv(triton.cdiv(N, programs), _MAX_BLOCK_M) * _MAX_BLOCK_M
    programs = triton.cdiv(N, rows_per_program)
    partial = torch.empty(programs, 3, D, device=e.device, dtype=torch.float32)
    grad_out = grad_out.contiguous()
    has_ga = grad_a is not None
    grad_a = grad_a.contiguous() if has_ga else grad_out
    _bwd_kernel[(programs,)](
        e, p, z, Lambda, grad_out, grad_a, de, dp, dz, partial, N, D,
        float(c), float(eps), NORM_EPS, rows_per_program,
        HAS_PROJ=has_proj, HAS_GA=has_ga, BLOCK_D=triton.next_power_of_2(D),
    )
    sums = partial.sum(0)
    return de, dp, dz, sums[0].clone(), sums[1].clone(), sums[2].clone()  # op outputs may not alias
