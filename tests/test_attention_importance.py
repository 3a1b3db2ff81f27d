"""Fused token importance vs the recipe's eager ``attn.mean(dim=(1, 2))``."""
import math

import pytest
import torch

from latentfast.ops import attention_token_importance
from latentfast.reference.attention_importance import attention_token_importance as reference
from latentfast.reference.attention_importance import eager_attention_probs


def make_qk(B, H, Hk, T, D, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, D, generator=g) * 1.5  # peaky enough that weighting matters
    k = torch.randn(B, Hk, T, D, generator=g)
    return q.to(device, dtype), k.to(device, dtype)


def padding_mask(B, T, device="cpu"):
    """Row 0 full, row 1 left-padded, row 2 right-padded."""
    m = torch.ones(B, T, dtype=torch.long)
    if B > 1:
        m[1, : T // 3] = 0
    if B > 2:
        m[2, T - T // 4:] = 0
    return m.to(device)


CASES = [  # (T, H, Hk, D, causal, padded)
    (1, 2, 2, 16, True, False),
    (1, 4, 2, 8, False, True),
    (17, 4, 2, 16, True, True),
    (17, 4, 4, 24, False, True),
    (17, 6, 2, 16, True, False),
    (256, 4, 2, 16, True, True),
    (256, 2, 1, 32, False, False),
]


@pytest.mark.parametrize("T,H,Hk,D,causal,padded", CASES)
def test_matches_eager(T, H, Hk, D, causal, padded):
    B = 3
    q, k = make_qk(B, H, Hk, T, D)
    mask = padding_mask(B, T) if padded else None
    out = attention_token_importance(q, k, causal=causal, attention_mask=mask)
    ref = reference(q, k, causal=causal, attention_mask=mask)
    assert out.shape == (B, T) and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=1e-7, rtol=1e-5)
    # columns of a row-stochastic matrix: importances sum to the share of valid query rows
    valid = mask.float().mean(1) if padded else torch.ones(B)
    torch.testing.assert_close(out.sum(1), valid, atol=1e-5, rtol=1e-5)
    if padded:
        assert (out[mask == 0] == 0).all()


def test_not_uniform_and_causal_shape():
    """Causal importance is front-loaded: token 0 is seen by every row."""
    q, k = make_qk(1, 2, 2, 17, 16)
    out = attention_token_importance(torch.zeros_like(q), k)  # uniform scores
    expected = torch.tensor([sum(1.0 / (i + 1) for i in range(j, 17)) / 17 for j in range(17)])
    torch.testing.assert_close(out[0], expected, atol=1e-6, rtol=1e-5)


def test_scale_and_noncontiguous_inputs():
    q, k = make_qk(2, 4, 2, 17, 16)
    q_btHd = q.transpose(1, 2).contiguous().transpose(1, 2)  # HF view: (B, T, H, d) -> (B, H, T, d)
    out = attention_token_importance(q_btHd, k, scale=0.3)
    torch.testing.assert_close(out, reference(q, k, scale=0.3), atol=1e-7, rtol=1e-5)
    assert not torch.allclose(out, reference(q, k), atol=1e-4)


def test_lse_from_attention_forward_is_used(kernel_device):
    q, k = make_qk(2, 4, 4, 33, 16, device=kernel_device)
    if kernel_device == "cpu":
        v = torch.randn_like(k)
        _, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True)[:2]
    else:  # the same natural-log row LSE the attention forward returns
        s = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        lse = torch.logsumexp(s.masked_fill(torch.ones(33, 33, device=q.device).triu(1).bool(), float("-inf")), -1)
    with_lse = attention_token_importance(q, k, lse=lse)
    torch.testing.assert_close(with_lse, reference(q, k), atol=1e-6, rtol=1e-5)
    # a shifted lse scales every probability: proves the given lse replaces the first pass
    torch.testing.assert_close(attention_token_importance(q, k, lse=lse + math.log(2.0)), with_lse / 2,
                               atol=1e-7, rtol=1e-5)


def test_materialized_forms():
    B, H, T = 2, 3, 17
    q, k = make_qk(B, H, H, T, 16)
    mask = padding_mask(B, T)
    attn = eager_attention_probs(q, k, attention_mask=mask)  # (B, H, T, T)
    fused = attention_token_importance(q, k, attention_mask=mask)
    torch.testing.assert_close(attention_token_importance(attn), fused, atol=1e-7, rtol=1e-5)
    torch.testing.assert_close(attention_token_importance(attn.mean(1)), fused, atol=1e-7, rtol=1e-5)
    two_d = attention_token_importance(attn[0, 0])
    assert two_d.shape == (1, T)
    torch.testing.assert_close(two_d[0], attn[0, 0].mean(0))
    # garbage in padded rows (as HF eager leaves them) is zeroed when the mask is given
    dirty = attn.clone()
    dirty[1, :, 0] = 1.0 / T
    torch.testing.assert_close(attention_token_importance(dirty, attention_mask=mask), fused, atol=1e-7, rtol=1e-5)


def test_detached():
    q, k = make_qk(1, 2, 2, 17, 16)
    q.requires_grad_(True)
    assert not attention_token_importance(q, k).requires_grad
    attn = torch.softmax(torch.randn(1, 2, 5, 5), -1).requires_grad_(True)
    assert not attention_token_importance(attn).requires_grad


def test_bad_arguments():
    q, k = make_qk(2, 4, 2, 17, 16)
    with pytest.raises(ValueError, match="multiple of k heads"):
        attention_token_importance(q, torch.randn(2, 3, 17, 16))
    with pytest.raises(ValueError, match="k must have shape"):
        attention_token_importance(q, torch.randn(2, 2, 16, 16))
    with pytest.raises(ValueError, match="attention_mask must have shape"):
        attention_token_importance(q, k, attention_mask=torch.ones(2, 16))
    with pytest.raises(TypeError, match="share one dtype"):
        attention_token_importance(q, k.double())
    with pytest.raises(ValueError, match="lse must have shape"):
        attention_token_importance(q, k, lse=torch.zeros(2, 2, 17))
    with pytest.raises(ValueError, match="materialized attention"):
        attention_token_importance(torch.rand(2, 3, 4, 5))


def test_opcheck():
    q, k = make_qk(1, 2, 1, 17, 16)
    torch.library.opcheck(torch.ops.latentfast.attention_token_importance.default,
                          (q, k, padding_mask(1, 17), None, True, 0.25),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T", [1, 17, 1000, 4096])
def test_cuda_half(T, dtype):
    q, k = make_qk(2, 8, 2, T, 128, dtype=dtype, device="cuda")
    mask = padding_mask(2, T, "cuda")
    out = attention_token_importance(q, k, attention_mask=mask)
    ref = reference(q.float(), k.float(), attention_mask=mask)
    torch.testing.assert_close(out, ref, atol=2e-3 / T, rtol=2e-2)
    # with flash/SDPA's lse
    if T > 1:
        _, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k.repeat_interleave(4, 1),
                                                                    k.repeat_interleave(4, 1), 0.0, True)[:2]
        torch.testing.assert_close(attention_token_importance(q, k, lse=lse), reference(q.float(), k.float()),
                                   atol=2e-3 / T, rtol=2e-2)


@pytest.mark.cuda
def test_cuda_fp32():
    q, k = make_qk(2, 8, 2, 300, 64, device="cuda")
    mask = padding_mask(2, 300, "cuda")
    torch.testing.assert_close(attention_token_importance(q, k, attention_mask=mask),
                               reference(q, k, attention_mask=mask), atol=1e-7, rtol=1e-4)
