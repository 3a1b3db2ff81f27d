"""``attention_token_importance``: how much attention each token receives.

    imp = attention_token_importance(q, k, attention_mask=mask)        # (B, T) fp32
    imp = attention_token_importance(q, k, lse=lse_from_flash_attn)     # one pass only
    imp = attention_token_importance(outputs.attentions[-1])            # recipe's (B,H,T,T)

Equals the recipe's ``attn.detach().mean(dim=(1, 2))`` without ever building the
(B, H, T, T) matrix. Always detached: importance is a weight, not something the
KV loss may push on (seed note 004, "CRITICAL: detach").
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from latentfast.ops._dispatch import check_same_device, check_shape, check_tensor, use_triton
from latentfast.reference import attention_importance as _ref


@torch.library.custom_op("latentfast::attention_token_importance", mutates_args=())
def _importance_op(
    q: torch.Tensor, k: torch.Tensor, attention_mask: Optional[torch.Tensor], lse: Optional[torch.Tensor],
    causal: bool, scale: float,
) -> torch.Tensor:
    if use_triton(q):
        from latentfast.kernels.attention_importance import attention_importance  # Triton: optional on CPU

        return attention_importance(q, k, causal=causal, attention_mask=attention_mask, lse=lse, scale=scale)
    return _ref.attention_token_importance(q, k, causal=causal, attention_mask=attention_mask, scale=scale)


@_importance_op.register_fake
def _(q, k, attention_mask, lse, causal, scale):
    return q.new_empty((q.shape[0], q.shape[2]), dtype=torch.float32)


def _check_qk(q, k, attention_mask, lse):
    check_tensor("q", q, ndim=4, float_=True)
    check_tensor("k", k, ndim=4, float_=True)
    B, H, T, D = q.shape
    check_shape("k", k, (B, None, T, D), "(batch, kv_heads, seq, head_dim) matching q (batch, heads, seq, head_dim)")
    if H % k.shape[1] != 0:
        raise ValueError(f"q heads ({H}) must be a multiple of k heads ({k.shape[1]}) for grouped-query attention")
    if k.dtype != q.dtype:
        raise TypeError(f"q and k must share one dtype, got q: {q.dtype}, k: {k.dtype}")
    if attention_mask is not None:
        check_tensor("attention_mask", attention_mask, ndim=2)
        check_shape("attention_mask", attention_mask, (B, T), "(batch, seq), 1 = token, 0 = padding")
    if lse is not None:
        check_tensor("lse", lse, ndim=3, float_=True)
        if lse.shape[0] != B or lse.shape[1] != H or lse.shape[2] < T:
            raise ValueError(f"lse must have shape ({B}, {H}, >={T}) (natural-log row log-sum-exp), got {tuple(lse.shape)}")
    check_same_device(q=q, k=k, attention_mask=attention_mask, lse=lse)


def attention_token_importance(q, k=None, *, causal=True, attention_mask=None, lse=None, scale=None) -> torch.Tensor:
    """Token importance (B, T) fp32, the mean over heads and query rows of softmax attention.

    Args:
        q: queries (B, H, T, d) -- or a materialized attention (B, H, T, T), (B, T, T)
            or (T, T) as the recipe passes it (then ``k`` must be None; (T, T) gives (1, T)).
        k: keys (B, H_kv, T, d), H divisible by H_kv (GQA: head h uses kv head h // (H // H_kv)).
        causal: key j is visible to query i iff j <= i.
        attention_mask: (B, T), 1 for tokens, 0 for padding. Padded keys receive no
            attention and padded query rows contribute zero (the divisor stays H * T).
        lse: optional (B, H, >=T) natural-log row log-sum-exp from the attention forward
            (flash-attn ``softmax_lse``, SDPA ``logsumexp``) for the same scale and masks;
            saves one of the two passes.
        scale: score scale, default 1/sqrt(d).
    """
    if k is None:
        check_tensor("attention", q, float_=True)
        if q.dim() not in (2, 3, 4) or q.shape[-1] != q.shape[-2]:
            raise ValueError(
                f"a materialized attention must be (B, H, T, T), (B, T, T) or (T, T), got {tuple(q.shape)}; "
                "pass k to compute importance from q and k instead")
        if attention_mask is not None:
            check_shape("attention_mask", attention_mask, (q.shape[0] if q.dim() > 2 else 1, q.shape[-1]),
                        "(batch, seq), 1 = token, 0 = padding")
        return _ref.token_importance_from_attention(q, attention_mask)

    _check_qk(q, k, attention_mask, lse)
    q, k = q.detach(), k.detach()
    # the kernels need unit stride along head_dim; HF's (B, T, H, d)->(B, H, T, d) views keep it
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    if attention_mask is not None and attention_mask.dtype.is_floating_point:
        attention_mask = attention_mask != 0
    if lse is not None:
        lse = lse.detach()
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return _importance_op(q, k, attention_mask, lse, bool(causal), scale)
