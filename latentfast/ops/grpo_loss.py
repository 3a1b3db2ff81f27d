"""Fused lm_head + GRPO token-level loss that never materializes the (B, T, V) logits.

    loss, metrics = fused_linear_grpo_loss(hidden, lm_head.weight, completion_ids,
                                           completion_mask, advantages,
                                           ref_per_token_logps=ref, beta=0.04)
    loss.backward()          # grads for hidden, lm_head.weight (and bias)

One sweep over row chunks of the *completion tokens only* (padding rows are dropped
before any GEMM). Per chunk of R rows:

    L  = x_c W^T (+ b)                 cuBLAS, (R, V) buffer reused across chunks
    lse, logp, entropy = stats(L)      Triton (CPU: native C++ or torch), one read of L
    g  = dLoss/dlogp                   torch, (R,) ops: the GRPO math (_pg_terms)
    L <- g (onehot - softmax(L/T))/T   Triton (CPU: native C++ or torch), in place
    grad_x_c = L W ; grad_W += L^T x_c cuBLAS

So the gradients are finished when the forward returns (Liger-style) with three GEMMs
in total, and peak extra memory is one (R, V) chunk plus grad_W. The backward only
scales the saved gradients by the incoming grad. ``top_entropy_quantile < 1`` needs
every token's entropy before any gradient, so it adds one no-grad stats sweep (one
more GEMM); everything else (sequence-level ratios included: chunks then hold whole
sequences) is one sweep.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from latentfast.ops import _native
from latentfast.ops._dispatch import check_same_device, check_shape, check_tensor, use_triton

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
_CHUNK_BYTES = 1 << 30  # budget for the (R, V) logits chunk when chunk_size is not given


class GRPOMetrics(NamedTuple):
    """Scalar tensors users log. Ordered so Liger/TRL positional use still works:
    ``metrics[0]`` is the mean KL (0 when beta == 0), ``metrics[-1]`` the region clip ratio."""

    kl: torch.Tensor
    entropy: torch.Tensor
    ratio_mean: torch.Tensor
    clip_ratio_low: torch.Tensor
    clip_ratio_high: torch.Tensor
    clip_ratio_region: torch.Tensor


# ----------------------------------------------------------------- GRPO math on logps
def _pg_terms(logp, adv, weight, pg_weight, old, ref, seg, n_seg, *, beta, eps_low, eps_high, delta,
              sequence_level: bool, bias_kl: bool):
    """Loss and its analytic gradient w.r.t. logp for a set of completion tokens.

    All inputs are fp32 vectors over the same rows. ``weight`` is the normalised loss
    weight of each token (loss = sum weight * per_token_loss); ``pg_weight`` the
    entropy mask times the vLLM importance ratio. For sequence-level ratios, ``seg``
    gives each row's sequence (0..n_seg-1) and the rows hold every token of those
    sequences. Returns (loss_sum, g, coef_1 per row, kl per row or None).
    The derivative follows autograd's conventions at the kinks: clamp passes the
    gradient on its closed interval, ``min`` splits it evenly on ties (the on-policy
    case ratio == 1 is a tie).
    """
    log_ratio = logp - old if old is not None else torch.zeros_like(logp)
    if sequence_level:
        count = torch.zeros(n_seg, device=logp.device).index_add_(0, seg, torch.ones_like(logp))
        inv_count = (1.0 / count.clamp(min=1.0))[seg]
        log_w = torch.zeros(n_seg, device=logp.device).index_add_(0, seg, log_ratio)[seg] * inv_count
    else:
        log_w = log_ratio
    coef_1 = torch.exp(log_w)

    lo, hi = 1.0 - eps_low, 1.0 + eps_high
    coef_2 = coef_1.clamp(lo, hi)
    d_coef_2 = ((coef_1 >= lo) & (coef_1 <= hi)).float()
    if delta is not None:
        coef_1d = coef_1.clamp(max=delta)
        d_coef_1d = (coef_1 <= delta).float()
    else:
        coef_1d, d_coef_1d = coef_1, 1.0
    l1, l2 = coef_1d * adv, coef_2 * adv
    pick_1 = (l1 < l2).float() + 0.5 * (l1 == l2).float()
    per_token = -torch.minimum(l1, l2)
    d_per_d_coef = -adv * (pick_1 * d_coef_1d + (1.0 - pick_1) * d_coef_2)
    if pg_weight is not None:
        per_token = per_token * pg_weight
        d_per_d_coef = d_per_d_coef * pg_weight

    d_per_d_logp = torch.zeros_like(logp)  # direct dependence (the KL term)
    kl = None
    if beta != 0.0:
        if ref is not None:
            diff = ref - logp
            e = torch.exp(diff)
            kl, d_kl = e - diff - 1.0, 1.0 - e
        else:  # ref = logp.detach(): zero KL and zero gradient
            kl, d_kl = torch.zeros_like(logp), torch.zeros_like(logp)
        if bias_kl:
            per_token = per_token + beta * kl * coef_1
            d_per_d_coef = d_per_d_coef + beta * kl
            d_per_d_logp = beta * d_kl * coef_1
            kl = kl * coef_1
        else:
            per_token = per_token + beta * kl
            d_per_d_logp = beta * d_kl

    loss_sum = (per_token * weight).sum()
    # d coef_1 / d log_w = coef_1; d log_w / d logp is 1 (token) or 1/count (sequence)
    through_coef = weight * d_per_d_coef * coef_1
    if sequence_level:
        through_coef = torch.zeros(n_seg, device=logp.device).index_add_(0, seg, through_coef)[seg] * inv_count
    g = weight * d_per_d_logp + through_coef
    return loss_sum, g, coef_1, kl


# ----------------------------------------------------------------- per-chunk backends
def _torch_logit_stats(L, ids, inv_t):
    z = L.float() * inv_t if (inv_t != 1.0 or L.dtype != torch.float32) else L
    lse = torch.logsumexp(z, dim=-1)
    logp_all = z - lse[:, None]
    ent = -torch.bmm(logp_all.exp().unsqueeze(1), logp_all.unsqueeze(2)).view(-1)  # row-wise dot
    return lse, logp_all.gather(1, ids[:, None]).squeeze(1), ent


def _torch_logit_grad_(L, ids, lse, g, inv_t):
    coef = (g * inv_t)[:, None]
    z = L.float() * inv_t if (inv_t != 1.0 or L.dtype != torch.float32) else L
    grad = torch.exp(z - lse[:, None]).mul_(-coef)
    grad.scatter_add_(1, ids[:, None], coef)
    return L.copy_(grad)


def _backends(t: torch.Tensor):
    """Triton kernels on CUDA / under the interpreter; on CPU the native kernels
    (kernels/csrc, when built and not switched off by LATENTFAST_NATIVE=0), else the
    same math in torch."""
    if use_triton(t):
        from latentfast.kernels import grpo_loss as K

        return K.logit_stats, K.logit_grad_
    if _native.usable(t, "logit_stats"):
        ops = torch.ops.latentfast_native
        return ops.logit_stats, ops.logit_grad_
    return _torch_logit_stats, _torch_logit_grad_


def _chunk_bounds(n_rows: int, rows: int, seq_ends: Optional[list[int]]) -> list[tuple[int, int]]:
    """[start, end) row ranges of at most ``rows`` rows. With ``seq_ends`` (cumulative
    row counts per sequence) chunks hold whole sequences; a longer sequence gets its own."""
    if seq_ends is None:
        return [(s, min(s + rows, n_rows)) for s in range(0, n_rows, rows)]
    bounds, start, prev = [], 0, 0
    for end in seq_ends:
        if end - start > rows and prev > start:
            bounds.append((start, prev))
            start = prev
        prev = end
    if prev > start:
        bounds.append((start, prev))
    return bounds


def _resolve_rows(chunk_rows: int, V: int, elt: int) -> int:
    if chunk_rows > 0:
        return chunk_rows
    rows = max(16, _CHUNK_BYTES // (V * elt))
    return 1 << int(math.log2(rows))  # power of two: friendly GEMM shapes


def _linear_chunk(x_c, weight, bias, out):
    if bias is None:
        return torch.mm(x_c, weight.t(), out=out)
    return torch.addmm(bias, x_c, weight.t(), out=out)


# ----------------------------------------------------------------- custom ops
@torch.library.custom_op("latentfast::lm_head_logp_entropy", mutates_args=())
def _logp_entropy(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], ids: torch.Tensor,
    mask: Optional[torch.Tensor], temperature: float, chunk_rows: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """No-grad sweep: per-token logp of ``ids`` and entropy, fp32, 0 where mask == 0."""
    stats, _ = _backends(x)
    H, V = x.shape[-1], weight.shape[0]
    x2, ids1 = x.reshape(-1, H), ids.reshape(-1)
    rows_idx = mask.reshape(-1).nonzero().squeeze(1) if mask is not None else None
    if rows_idx is not None:
        x2, ids1 = x2.index_select(0, rows_idx), ids1.index_select(0, rows_idx)
    n = x2.shape[0]
    logp, ent = (torch.empty(n, device=x.device, dtype=torch.float32) for _ in range(2))
    rows = _resolve_rows(chunk_rows, V, x.element_size())
    L = torch.empty(min(rows, n), V, device=x.device, dtype=x.dtype)
    for s in range(0, n, rows):
        e = min(s + rows, n)
        Lc = _linear_chunk(x2[s:e], weight, bias, L[: e - s])
        _, logp[s:e], ent[s:e] = stats(Lc, ids1[s:e].contiguous(), 1.0 / temperature)
    if rows_idx is None:
        return logp.view(ids.shape), ent.view(ids.shape)
    dense = lambda v: torch.zeros(ids.numel(), device=x.device).index_copy_(0, rows_idx, v).view(ids.shape)  # noqa: E731
    return dense(logp), dense(ent)


@_logp_entropy.register_fake
def _(x, weight, bias, ids, mask, temperature, chunk_rows):
    return ids.new_empty(ids.shape, dtype=torch.float32), ids.new_empty(ids.shape, dtype=torch.float32)


@torch.library.custom_op("latentfast::fused_linear_grpo_fwd", mutates_args=())
def _grpo_fwd(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], ids: torch.Tensor,
    mask: torch.Tensor, advantages: torch.Tensor, loss_weight: torch.Tensor, pg_weight: Optional[torch.Tensor],
    old_logps: Optional[torch.Tensor], ref_logps: Optional[torch.Tensor],
    beta: float, eps_low: float, eps_high: float, delta: Optional[float], sequence_level: bool,
    bias_kl: bool, temperature: float, chunk_rows: int, need_grad_weight: bool, need_grad_bias: bool,
) -> list[torch.Tensor]:
    """Returns [loss, logp, entropy, coef_1, kl, grad_x, grad_weight, grad_bias].

    x (B, T, H); ids/mask/advantages/loss_weight/... (B, T). Per-token outputs are
    (B, T) fp32 (0 on padding; coef_1 is 1 there, or the sequence's ratio).
    grad_weight / grad_bias are empty when not needed.
    """
    stats, grad_ = _backends(x)
    B, T, H = x.shape
    V = weight.shape[0]
    inv_t = 1.0 / temperature
    dev = x.device

    # Completion tokens only: padding rows cost no GEMM and no softmax.
    rows_idx = mask.reshape(-1).nonzero().squeeze(1)
    n = rows_idx.numel()
    take = lambda t: None if t is None else t.reshape(-1).index_select(0, rows_idx)  # noqa: E731
    x2 = x.reshape(B * T, H).index_select(0, rows_idx)
    ids1 = take(ids)
    adv, w = take(advantages).float(), take(loss_weight).float()
    pg_w, old, ref = take(pg_weight), take(old_logps), take(ref_logps)
    old = old.float() if old is not None else None
    ref = ref.float() if ref is not None else None
    seq = rows_idx // T

    rows = _resolve_rows(chunk_rows, V, x.element_size())
    seq_ends = None
    if sequence_level:  # chunks of whole sequences: the sequence ratio is then chunk-local
        seq_ends = torch.cumsum(mask.reshape(B, T).ne(0).sum(1), 0).tolist()
    bounds = _chunk_bounds(n, rows, seq_ends)

    loss = torch.zeros((), device=dev, dtype=torch.float32)
    logp, ent, coef, kl_out = (torch.zeros(n, device=dev, dtype=torch.float32) for _ in range(4))
    grad_x = torch.empty_like(x2)
    grad_w = torch.empty_like(weight) if need_grad_weight else weight.new_empty(0)
    grad_b = torch.zeros(V, device=dev, dtype=torch.float32) if need_grad_bias else None
    L = torch.empty(max((e - s for s, e in bounds), default=0), V, device=dev, dtype=x.dtype)

    for i, (s, e) in enumerate(bounds):
        x_c, ids_c = x2[s:e], ids1[s:e].contiguous()
        Lc = _linear_chunk(x_c, weight, bias, L[: e - s])
        lse, logp[s:e], ent[s:e] = stats(Lc, ids_c, inv_t)
        seg = seq[s:e] if sequence_level else None  # global sequence index: no host sync
        sl = slice(s, e)
        loss_c, g, coef[sl], kl_c = _pg_terms(
            logp[sl], adv[sl], w[sl], None if pg_w is None else pg_w[sl].float(),
            None if old is None else old[sl], None if ref is None else ref[sl], seg, B,
            beta=beta, eps_low=eps_low, eps_high=eps_high, delta=delta,
            sequence_level=sequence_level, bias_kl=bias_kl)
        loss += loss_c
        if kl_c is not None:
            kl_out[sl] = kl_c
        grad_(Lc, ids_c, lse, g.contiguous(), inv_t)  # Lc now holds dLoss/dlogits
        torch.mm(Lc, weight, out=grad_x[s:e])
        if need_grad_weight:
            if i == 0:
                torch.mm(Lc.t(), x_c, out=grad_w)
            else:
                grad_w.addmm_(Lc.t(), x_c)
        if need_grad_bias:
            grad_b += Lc.sum(0, dtype=torch.float32)

    if need_grad_weight and not bounds:
        grad_w.zero_()
    full_grad_x = torch.zeros(B * T, H, device=dev, dtype=x.dtype).index_copy_(0, rows_idx, grad_x)

    def dense(v, fill=0.0):  # (n,) over completion tokens -> (B, T)
        return torch.full((B * T,), fill, device=dev).index_copy_(0, rows_idx, v).view(B, T)

    if sequence_level:  # every position carries its sequence's ratio, as TRL's (B, 1) coef_1
        coef_bt = torch.ones(B, device=dev).index_copy_(0, seq, coef)[:, None].expand(B, T).contiguous()
    else:
        coef_bt = dense(coef, 1.0)  # padding: log-ratio 0
    return [loss, dense(logp), dense(ent), coef_bt, dense(kl_out), full_grad_x.view(B, T, H), grad_w,
            grad_b.to(bias.dtype) if need_grad_bias else weight.new_empty(0)]


@_grpo_fwd.register_fake
def _(x, weight, bias, ids, mask, advantages, loss_weight, pg_weight, old_logps, ref_logps, beta, eps_low,
      eps_high, delta, sequence_level, bias_kl, temperature, chunk_rows, need_grad_weight, need_grad_bias):
    f32 = lambda: x.new_empty(ids.shape, dtype=torch.float32)  # noqa: E731
    return [x.new_empty((), dtype=torch.float32), f32(), f32(), f32(), f32(), torch.empty_like(x),
            torch.empty_like(weight) if need_grad_weight else weight.new_empty(0),
            torch.empty_like(bias) if need_grad_bias else weight.new_empty(0)]


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[5], output[6], output[7])
    ctx.has_grad_w = inputs[18]
    ctx.has_grad_b = inputs[19]


def _backward(ctx, grads):
    g = grads[0]  # only the loss is differentiable; the other outputs are detached by the wrapper
    grad_x, grad_w, grad_b = ctx.saved_tensors
    return (grad_x * g, grad_w * g if ctx.has_grad_w else None, grad_b * g if ctx.has_grad_b else None,
            *([None] * 17))


_grpo_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------- public API
def _autocast(x, weight, bias):
    """Under autocast, compute in the autocast dtype, as ``F.linear`` (the lm_head) would."""
    if isinstance(x, torch.Tensor) and torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        return x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)
    return x, weight, bias


def _check_head(x, weight, bias, ids):
    """x (..., H), weight (V, H), bias (V,), ids shaped like x.shape[:-1] with values in [0, V)."""
    check_tensor("_input", x, float_=True)
    H = x.shape[-1]
    check_tensor("lin_weight", weight, ndim=2, float_=True)
    check_shape("lin_weight", weight, (None, H), "(vocab_size, hidden_size)")
    if weight.dtype != x.dtype:
        raise TypeError(f"_input and lin_weight must share one dtype, got {x.dtype} and {weight.dtype}")
    V = weight.shape[0]
    if bias is not None:
        check_tensor("bias", bias, float_=True, dtype=x.dtype)
        check_shape("bias", bias, (V,), "(vocab_size,)")
    check_tensor("selected_token_ids", ids)
    if ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"selected_token_ids must be int64/int32 token ids, got {ids.dtype}")
    check_shape("selected_token_ids", ids, tuple(x.shape[:-1]), "(batch, seq_len) of _input")
    check_same_device(_input=x, lin_weight=weight, bias=bias, selected_token_ids=ids)
    if not torch.compiler.is_compiling() and ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= V):
        raise ValueError(f"selected_token_ids must lie in [0, {V}), got range "
                         f"[{int(ids.min())}, {int(ids.max())}]")


def _check_inputs(x, weight, bias, ids, mask, advantages, old, ref, vllm_is_ratio):
    check_tensor("_input", x, ndim=3, float_=True)
    B, T, H = x.shape
    _check_head(x, weight, bias, ids)
    check_tensor("attention_mask", mask)
    check_shape("attention_mask", mask, (B, T), "(batch, seq_len) of _input")
    check_tensor("advantages", advantages, float_=True)
    if not (advantages.shape == (B,) or advantages.shape == (B, T)):
        raise ValueError(f"advantages must have shape ({B},) or ({B}, {T}), got {tuple(advantages.shape)}")
    for name, t in (("old_per_token_logps", old), ("ref_per_token_logps", ref)):
        if t is not None:
            check_tensor(name, t, float_=True)
            check_shape(name, t, (B, T), "(batch, seq_len) of _input")
    if vllm_is_ratio is not None:
        check_tensor("vllm_is_ratio", vllm_is_ratio, float_=True)
        if vllm_is_ratio.shape not in ((B,), (B, 1), (B, T)):
            raise ValueError(f"vllm_is_ratio must have shape ({B},), ({B}, 1) or ({B}, {T}), "
                             f"got {tuple(vllm_is_ratio.shape)}")
    check_same_device(_input=x, attention_mask=mask, advantages=advantages, old_per_token_logps=old,
                      ref_per_token_logps=ref, vllm_is_ratio=vllm_is_ratio)


def _world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _dapo_normalizer(mask: torch.Tensor, num_items_in_batch) -> torch.Tensor:
    """Completion tokens of the global batch / world size (TRL: num_items_in_batch /
    num_processes), so per-rank losses summed by DDP and accumulated over micro-batches
    give one token-mean. Without num_items_in_batch: this micro-batch, all-reduced."""
    world = _world_size()
    if num_items_in_batch is not None:
        n = torch.as_tensor(num_items_in_batch, device=mask.device, dtype=torch.float32)
    else:
        n = mask.sum().float()
        if world > 1:
            n = n.clone()
            torch.distributed.all_reduce(n)
    return (n / world).clamp(min=1.0)


def _quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """torch.quantile's 'linear' rule by sorting: no 2^24-element input limit."""
    if values.numel() == 0:
        return values.new_tensor(float("nan"))
    v = values.sort().values
    pos = q * (v.numel() - 1)
    lo = int(pos)
    hi = min(lo + 1, v.numel() - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def _entropy_mask(entropy, mask, top_entropy_quantile):
    """TRL get_high_entropy_mask; the quantile is over every rank's completion tokens."""
    values = torch.where(mask, entropy, torch.full_like(entropy, float("nan"))).reshape(-1)
    if _world_size() > 1:  # pad with NaN to a common length, gather, nanquantile ignores the pads
        dist = torch.distributed
        n = torch.tensor([values.numel()], device=values.device)
        dist.all_reduce(n, op=dist.ReduceOp.MAX)
        padded = torch.full((int(n),), float("nan"), device=values.device)
        padded[: values.numel()] = values
        gathered = [torch.empty_like(padded) for _ in range(_world_size())]
        dist.all_gather(gathered, padded)
        values = torch.cat(gathered)
    threshold = _quantile(values[~values.isnan()], 1.0 - top_entropy_quantile)
    # no completion token anywhere -> NaN threshold -> empty mask, as TRL
    return ((entropy * mask) >= threshold) & mask


def lm_head_logps(x: torch.Tensor, weight: torch.Tensor, selected_token_ids: torch.Tensor,
                  bias: torch.Tensor | None = None, temperature: float = 1.0,
                  mask: torch.Tensor | None = None, chunk_size: int | None = None):
    """No-grad per-token ``log_softmax((x W^T + b) / T)[ids]`` and entropy without the logits.

    For old/reference log-probs: ``ref, _ = lm_head_logps(ref_hidden, W, ids, mask=mask)``.
    Shapes: x (..., H), ids (...); returns two fp32 tensors shaped like ids (0 where mask == 0).
    """
    x, weight, bias = _autocast(x, weight, bias)
    _check_head(x, weight, bias, selected_token_ids)
    if mask is not None:
        check_shape("mask", mask, tuple(selected_token_ids.shape), "same as selected_token_ids")
    rows = (chunk_size or 0) * (x.shape[1] if x.dim() == 3 else 1)
    with torch.no_grad():
        return _logp_entropy(x.detach(), weight.detach(), None if bias is None else bias.detach(),
                             selected_token_ids.long(), None if mask is None else mask.ne(0),
                             float(temperature), int(rows))


def fused_linear_grpo_loss(
    _input: torch.Tensor,
    lin_weight: torch.Tensor,
    selected_token_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    advantages: torch.Tensor,
    bias: torch.Tensor | None = None,
    ref_per_token_logps: torch.Tensor | None = None,
    old_per_token_logps: torch.Tensor | None = None,
    *,
    beta: float = 0.04,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    loss_type: str = "dapo",
    max_completion_length: int | None = None,
    importance_sampling_level: str = "token",
    temperature: float = 1.0,
    delta: float | None = None,
    use_bias_correction_kl: bool = False,
    top_entropy_quantile: float = 1.0,
    vllm_is_ratio: torch.Tensor | None = None,
    num_items_in_batch: float | torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, GRPOMetrics]:
    """GRPO loss straight from the last hidden states (TRL GRPOTrainer semantics).

    Args:
        _input: (B, T, H) hidden states of the completion positions (the ones that predict
            ``selected_token_ids``), fp32/bf16/fp16.
        lin_weight: (V, H) lm_head weight (same dtype); ``bias``: optional (V,).
        selected_token_ids: (B, T) completion token ids. attention_mask: (B, T) completion
            mask (nonzero = token counts; binary).
        advantages: (B,) or (B, T). ref/old_per_token_logps: optional (B, T).
        loss_type: grpo | bnpo | dr_grpo (needs max_completion_length) | dapo (normaliser =
            completion tokens of the global batch: pass TRL's ``num_items_in_batch`` under
            DDP / gradient accumulation).
        importance_sampling_level: "token" or "sequence" (GSPO). delta: two-sided clip.
        top_entropy_quantile: < 1 trains only on the highest-entropy tokens (TRL).
        vllm_is_ratio: (B,), (B, 1) or (B, T) rollout importance weights.
        chunk_size: sequences per chunk (Liger's meaning); None picks ~1 GiB of logits.
    Returns:
        (loss, GRPOMetrics(kl, entropy, ratio_mean, clip_ratio_low, clip_ratio_high,
        clip_ratio_region)), metrics detached.
    """
    x, W, bias = _autocast(_input, lin_weight, bias)
    ids, adv = selected_token_ids, advantages
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if importance_sampling_level not in ("token", "sequence"):
        raise ValueError(f"importance_sampling_level must be 'token' or 'sequence', got {importance_sampling_level!r}")
    if loss_type == "dr_grpo" and max_completion_length is None:
        raise ValueError("max_completion_length must be provided for loss_type 'dr_grpo'")
    if not 0.0 < top_entropy_quantile <= 1.0:
        raise ValueError(f"top_entropy_quantile must be in (0, 1], got {top_entropy_quantile}")
    if delta is not None and delta <= 0:
        raise ValueError(f"delta must be positive, got {delta}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    _check_inputs(x, W, bias, ids, attention_mask, adv, old_per_token_logps, ref_per_token_logps, vllm_is_ratio)
    B, T, _ = x.shape

    mask = attention_mask.ne(0)
    m = mask.float()
    adv_bt = (adv.float().unsqueeze(1) if adv.dim() == 1 else adv.float()).expand(B, T)
    if loss_type == "grpo":
        loss_weight = m / (m.sum(1, keepdim=True).clamp(min=1.0) * B)
    elif loss_type == "bnpo":
        loss_weight = m / m.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        loss_weight = m / (B * max_completion_length)
    else:
        loss_weight = m / _dapo_normalizer(m, num_items_in_batch)

    pg_weight = None
    if top_entropy_quantile < 1.0:
        _, entropy = lm_head_logps(x, W, ids, bias, temperature, mask, chunk_size)
        pg_weight = _entropy_mask(entropy, mask, top_entropy_quantile).float()
    if vllm_is_ratio is not None:
        vis = vllm_is_ratio.float()
        vis = (vis.unsqueeze(1) if vis.dim() == 1 else vis).expand(B, T)
        pg_weight = vis if pg_weight is None else pg_weight * vis

    rows = (chunk_size or 0) * T
    need_w = W.requires_grad
    need_b = bias is not None and bias.requires_grad
    loss, logp, entropy, coef_1, kl, *_ = _grpo_fwd(
        x, W, bias, ids.long(), mask, adv_bt.contiguous(), loss_weight, pg_weight,
        None if old_per_token_logps is None else old_per_token_logps.detach(),
        None if ref_per_token_logps is None or beta == 0.0 else ref_per_token_logps.detach(),
        float(beta), float(epsilon_low), float(epsilon_high), None if delta is None else float(delta),
        importance_sampling_level == "sequence", bool(use_bias_correction_kl), float(temperature),
        int(rows), need_w, need_b)

    with torch.no_grad():
        count = m.sum().clamp(min=1.0)
        sequence_level = importance_sampling_level == "sequence"

        per_sequence = sequence_level and adv.dim() == 1  # TRL's coef_1 * A is then (B, 1)

        def batch_mean(v):  # TRL's masked_batch_mean: per-sequence values average over sequences
            return v[:, 0].float().mean() if per_sequence else (v * m).sum() / count

        clip_c = coef_1.clamp(max=delta) if delta is not None else coef_1  # TRL measures the clamped coef_1
        low = (clip_c < 1 - epsilon_low) & (adv_bt < 0)
        high = (clip_c > 1 + epsilon_high) & (adv_bt > 0)
        metrics = GRPOMetrics(
            kl=(kl * m).sum() / count,
            entropy=(entropy * m).sum() / count,
            ratio_mean=coef_1[:, 0].mean() if sequence_level else (coef_1 * m).sum() / count,
            clip_ratio_low=batch_mean(low),
            clip_ratio_high=batch_mean(high),
            clip_ratio_region=batch_mean(low | high),
        )
    return loss, metrics
