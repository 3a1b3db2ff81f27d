"""KaVa-style compressed KV targets (Kuzina et al., arXiv 2510.02312): R-KV eviction per
(layer, KV head), from the blockwise importance kernel -- never a T x T matrix.

    target = rkv_compress(q, k, v, attention_mask=mask, cot_mask=cot, answer_start=a, slots=24, lam=0.1)
    loss = compressed_kv_loss(student_k, student_v, target)    # student (B, H, T, d) or (B, H, M, d)

For every KV head of a layer, over the chain-of-thought keys (``cot_mask``):

    I_j = mean attention that key j receives from the answer-token queries (rows
          i >= answer_start), pooled over the GQA group's query heads, normalised to sum 1
    R_j = softmax_j(-mean_i cos(k_j, k_i))      (mean cosine to the other CoT keys: low = novel)
    S_j = lam * I_j + (1 - lam) * R_j           (KaVa: lam ~ 0.1); the top ``slots`` keys are kept

Heads may keep different tokens; kept entries stay in positional order (KaVa leaves this
open). A sequence with fewer CoT tokens than ``slots`` fills the rest with masked slots.
I comes from two calls of ``attention_token_importance`` on the heads regrouped as
(B * H_kv, group, T, d): all rows minus the rows before the answer (with causal attention
those rows see only keys before the answer, so a prefix mask reproduces them exactly).
R costs O(T d) per head: the mean cosine is k_j . sum_i k_i over unit keys.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from latentfast.ops._dispatch import check_shape, check_tensor
from latentfast.ops.attention_importance import attention_token_importance


def _check(q, k, v, attention_mask, cot_mask, answer_start):
    for n, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(n, t, ndim=4, float_=True)
    B, H, T, d = q.shape
    check_shape("k", k, (B, None, T, d), "(batch, kv_heads, seq, head_dim) matching q")
    check_shape("v", v, (B, k.shape[1], T, None), "(batch, kv_heads, seq, head_dim) matching k")
    if H % k.shape[1]:
        raise ValueError(f"q heads ({H}) must be a multiple of k heads ({k.shape[1]})")
    for n, m in (("attention_mask", attention_mask), ("cot_mask", cot_mask)):
        if m is not None:
            check_tensor(n, m, ndim=2)
            check_shape(n, m, (B, T), "(batch, seq)")
    check_tensor("answer_start", answer_start, ndim=1)
    check_shape("answer_start", answer_start, (B,), "(batch,) index of each sequence's first answer token")


@torch.no_grad()
def answer_attention_importance(q, k, *, attention_mask=None, answer_start) -> torch.Tensor:
    """(B, H_kv, T) fp32: per KV head, the attention key j receives averaged over the answer
    rows (valid rows i >= answer_start[b]) and the query heads of its GQA group."""
    B, H, T, d = q.shape
    Hkv = k.shape[1]
    rep = H // Hkv
    qg = q.detach().reshape(B, Hkv, rep, T, d).reshape(B * Hkv, rep, T, d)  # query head h reads kv head h // rep
    kg = k.detach().reshape(B * Hkv, 1, T, d)
    if kg.dtype != qg.dtype:
        kg = kg.to(qg.dtype)
    valid = torch.ones(B, T, dtype=torch.bool, device=q.device) if attention_mask is None else attention_mask != 0
    pos = torch.arange(T, device=q.device)
    before = pos[None, :] < answer_start.to(q.device)[:, None]
    vg, pg = valid.repeat_interleave(Hkv, 0), (valid & before).repeat_interleave(Hkv, 0)
    scale = float(rep * T)  # the kernel divides its column sums by heads * rows
    full = attention_token_importance(qg, kg, attention_mask=vg) * scale
    prefix = attention_token_importance(qg, kg, attention_mask=pg) * scale
    n_answer = (valid & ~before).sum(1).clamp_min(1).repeat_interleave(Hkv, 0)
    return ((full - prefix).clamp_min(0) / (rep * n_answer)[:, None]).view(B, Hkv, T)


@torch.no_grad()
def key_redundancy(k, cot_mask) -> torch.Tensor:
    """(B, H_kv, T) fp32: softmax over the CoT keys of minus each key's mean cosine to the
    other CoT keys (0 outside the CoT; all 0 for a sequence without CoT tokens)."""
    cot = cot_mask.bool()
    kn = F.normalize(k.detach().float(), dim=-1) * cot[:, None, :, None]
    n = cot.sum(1).float()[:, None, None]
    mean_cos = ((kn * kn.sum(2, keepdim=True)).sum(-1) - 1.0) / (n - 1).clamp_min(1)
    logits = (-mean_cos).masked_fill(~cot[:, None, :], float("-inf"))
    return torch.softmax(logits, -1).nan_to_num(0.0)


@torch.no_grad()
def rkv_compress(q, k, v, *, attention_mask=None, cot_mask, answer_start, slots: int, lam: float = 0.1) -> dict:
    """Compressed targets of one layer: ``{'k', 'v'}`` (B, H_kv, M, d), ``'index'`` (B, H_kv, M)
    positions of the kept tokens (ascending), ``'mask'`` (B, H_kv, M) valid slots."""
    _check(q, k, v, attention_mask, cot_mask, answer_start)
    if slots < 1:
        raise ValueError(f"kv_slots must be >= 1, got {slots}")
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lambda must be in [0, 1], got {lam}")
    B, Hkv, T, _ = k.shape
    cot = cot_mask.bool() & (attention_mask != 0 if attention_mask is not None else True)
    imp = answer_attention_importance(q, k, attention_mask=attention_mask, answer_start=answer_start)
    imp = imp * cot[:, None, :]
    total = imp.sum(-1, keepdim=True)
    n_cot = cot.sum(1)
    uniform = cot[:, None, :].float() / n_cot.clamp_min(1)[:, None, None]
    imp = torch.where(total > 0, imp / total.clamp_min(1e-30), uniform)
    score = lam * imp + (1.0 - lam) * key_redundancy(k, cot)
    score = score.masked_fill(~cot[:, None, :], float("-inf"))
    M = min(slots, T)
    idx = score.topk(M, dim=-1).indices
    ok = torch.arange(M, device=k.device)[None, None, :] < n_cot[:, None, None]
    ok = ok.expand(B, Hkv, M)
    idx = torch.where(ok, idx, torch.full_like(idx, T)).sort(-1).values  # positional order, padding last
    ok = idx < T
    idx = idx.masked_fill(~ok, 0)
    if M < slots:  # shorter sequence than slots: pad with masked slots
        pad = slots - M
        idx = F.pad(idx, (0, pad))
        ok = F.pad(ok, (0, pad), value=False)
    g = idx[..., None].expand(-1, -1, -1, k.shape[-1])
    out_k = k.detach().gather(2, g) * ok[..., None]
    out_v = v.detach().gather(2, idx[..., None].expand(-1, -1, -1, v.shape[-1])) * ok[..., None]
    return {"k": out_k, "v": out_v, "index": idx, "mask": ok}


def compressed_kv_loss(student_k, student_v, target: dict, *, sample_weight=None, return_per_sample: bool = False):
    """MSE(K) + MSE(V) over the valid slots of ``target`` (``rkv_compress``): KaVa's
    ``(||K~_t - K_s||^2 + ||V~_t - V_s||^2)`` with mean rather than 1/2M normalisation, so it
    is on the scale of the full-cache ``kv_loss``. ``student_k``/``student_v`` are either
    token-aligned (B, H, T, d), gathered at the kept positions per head, or already one
    entry per slot (B, H, M, d), e.g. a latent student's M thoughts.
    ``sample_weight`` (B,) scales each sample; ``return_per_sample`` adds the detached (B,)
    per-sample shares (summing to the unweighted loss)."""
    tk, tv, idx, ok = target["k"], target["v"], target["index"], target["mask"]
    B, H, M, d = tk.shape
    check_tensor("student_k", student_k, ndim=4, float_=True)
    check_shape("student_k", student_k, (B, H, None, d), f"(batch, {H} teacher kv heads, seq or {M} slots, {d}); "
                "map the student with a KV adapter first")
    check_shape("student_v", student_v, (B, H, student_k.shape[2], tv.shape[-1]), "student_k's shape")
    if student_k.shape[2] != M:
        student_k = student_k.gather(2, idx[..., None].expand(-1, -1, -1, d))
        student_v = student_v.gather(2, idx[..., None].expand(-1, -1, -1, tv.shape[-1]))
    m = ok[..., None].float()
    n_slots = ok.sum().clamp_min(1).float()  # valid (sample, head, slot) entries in the batch
    per = ((student_k.float() - tk.float()).pow(2) * m).sum((1, 2, 3)) / (n_slots * d) + \
        ((student_v.float() - tv.float()).pow(2) * m).sum((1, 2, 3)) / (n_slots * tv.shape[-1])
    loss = per.sum() if sample_weight is None else (sample_weight.detach().float() * per).sum()
    return (loss, per.detach()) if return_per_sample else loss


def cot_answer_spans(targets: torch.Tensor, answer_pos: torch.Tensor):
    """For batches built by ``kv_distill.encode`` (targets on the answer only, ``answer_pos``
    the '####' token): the CoT mask (first answer token .. before '####') and answer_start."""
    T = targets.shape[1]
    has = targets != -100
    first = torch.where(has.any(1), has.float().argmax(1), torch.full_like(answer_pos, T - 1)) + 1
    pos = torch.arange(T, device=targets.device)[None, :]
    cot = (pos >= first[:, None]) & (pos < answer_pos[:, None])
    return cot, answer_pos.clone()
