"""KaVa R-KV compression: per-head answer-query importance vs the materialized attention,
key redundancy vs a plain cosine matrix, top-M selection vs a plain per-head loop, masks,
and the compressed loss (gathered vs slot-shaped students, per-sample shares)."""
import pytest
import torch

from latentfast.ops.kv_compression import (answer_attention_importance, compressed_kv_loss, cot_answer_spans,
                                           key_redundancy, rkv_compress)
from latentfast.reference.attention_importance import eager_attention_probs


@pytest.fixture(autouse=True)
def _reference_ops(request, monkeypatch):
    """The importance op's PyTorch reference, except in ``*_fused`` tests (the kernel under
    the interpreter is slow, and its own tests cover it)."""
    if not request.node.name.endswith("_fused"):
        monkeypatch.setenv("TRITON_INTERPRET", "0")


def _qkv(B=2, H=4, Hkv=2, T=13, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, T, d, generator=g), torch.randn(B, Hkv, T, d, generator=g),
            torch.randn(B, Hkv, T, d, generator=g))


def _masks(B, T):
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, T - 3:] = 0  # right padding
    answer_start = torch.tensor([T - 3, T - 6])
    cot = torch.zeros(B, T, dtype=torch.bool)
    cot[0, 3:T - 3], cot[1, 2:T - 6] = True, True
    return mask, cot, answer_start


def plain_importance(q, k, mask, answer_start):
    P = eager_attention_probs(q, k, attention_mask=mask)  # (B, H, T, T), materialized
    B, H, T, _ = P.shape
    Hkv = k.shape[1]
    rep = H // Hkv
    out = torch.zeros(B, Hkv, T)
    for b in range(B):
        rows = [i for i in range(int(answer_start[b]), T) if mask[b, i]]
        for g in range(Hkv):
            out[b, g] = P[b, g * rep:(g + 1) * rep][:, rows].mean((0, 1))
    return out


def test_answer_importance_fused():  # first: the Triton kernel (interpreter on CPU) before anything imports triton without it
    q, k, _ = _qkv(T=20)
    mask, _, a = _masks(2, 20)
    torch.testing.assert_close(answer_attention_importance(q, k, attention_mask=mask, answer_start=a),
                               plain_importance(q, k, mask, a), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("H,Hkv", [(4, 2), (3, 3), (4, 1)])
def test_answer_importance_matches_materialized(H, Hkv):
    q, k, _ = _qkv(H=H, Hkv=Hkv)
    mask, _, a = _masks(2, 13)
    got = answer_attention_importance(q, k, attention_mask=mask, answer_start=a)
    torch.testing.assert_close(got, plain_importance(q, k, mask, a), atol=1e-5, rtol=1e-4)


def test_redundancy_plain():
    _, k, _ = _qkv()
    _, cot, _ = _masks(2, 13)
    got = key_redundancy(k, cot)
    for b in range(2):
        idx = cot[b].nonzero().squeeze(1)
        for h in range(k.shape[1]):
            kn = torch.nn.functional.normalize(k[b, h, idx], dim=-1)
            C = kn @ kn.T
            mean_cos = (C.sum(1) - 1) / (len(idx) - 1)
            exp = torch.zeros(13)
            exp[idx] = torch.softmax(-mean_cos, 0)
            torch.testing.assert_close(got[b, h], exp, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("lam", [0.1, 1.0, 0.0])
def test_rkv_selects_top_scores_per_head(lam):
    q, k, v = _qkv()
    mask, cot, a = _masks(2, 13)
    M = 4
    out = rkv_compress(q, k, v, attention_mask=mask, cot_mask=cot, answer_start=a, slots=M, lam=lam)
    imp = plain_importance(q, k, mask, a) * cot[:, None]
    imp = imp / imp.sum(-1, keepdim=True)
    score = lam * imp + (1 - lam) * key_redundancy(k, cot)
    for b in range(2):
        for h in range(k.shape[1]):
            cand = cot[b].nonzero().squeeze(1)
            top = cand[score[b, h, cand].topk(M).indices].sort().values
            assert torch.equal(out["index"][b, h], top)
            torch.testing.assert_close(out["k"][b, h], k[b, h, top])
            torch.testing.assert_close(out["v"][b, h], v[b, h, top])
    assert out["mask"].all()


def test_short_cot_pads_masked_slots_and_loss():
    q, k, v = _qkv()
    mask, cot, a = _masks(2, 13)
    out = rkv_compress(q, k, v, attention_mask=mask, cot_mask=cot, answer_start=a, slots=9)
    n_cot = cot.sum(1)  # 7 and 5 CoT tokens
    assert out["mask"].sum(-1).tolist() == [[7, 7], [5, 5]]
    assert (out["k"][~out["mask"]] == 0).all()
    # the loss: zero for the teacher's own cache (gathered), plain masked MSE otherwise
    loss0 = compressed_kv_loss(k, v, out)
    assert float(loss0) == 0.0
    sk, sv = torch.randn_like(k, requires_grad=True), torch.randn_like(v)
    loss, shares = compressed_kv_loss(sk, sv, out, return_per_sample=True)
    m = out["mask"]
    gk = torch.stack([torch.stack([sk[b, h, out["index"][b, h]] for h in range(2)]) for b in range(2)])
    gv = torch.stack([torch.stack([sv[b, h, out["index"][b, h]] for h in range(2)]) for b in range(2)])
    plain = ((gk - out["k"]) ** 2)[m].mean() + ((gv - out["v"]) ** 2)[m].mean()
    torch.testing.assert_close(loss, plain)
    torch.testing.assert_close(shares.sum(), loss.detach())
    # a slot-shaped student (B, H, M, d) is compared directly
    torch.testing.assert_close(compressed_kv_loss(gk, gv, out), plain)
    sw = torch.tensor([0.3, 0.7])
    torch.testing.assert_close(compressed_kv_loss(sk, sv, out, sample_weight=sw), (sw * shares).sum())
    loss.backward()
    assert sk.grad[0, 0, out["index"][0, 0]].abs().sum() > 0 and sk.grad[0, 0, 0].abs().sum() == 0
    assert n_cot.tolist() == [7, 5]


def test_cot_answer_spans_and_errors():
    tgt = torch.full((1, 10), -100)
    tgt[0, 3:8] = 1  # prompt = tokens 0..3, answer = tokens 4..8
    cot, a = cot_answer_spans(tgt, torch.tensor([7]))
    assert cot[0].nonzero().squeeze(1).tolist() == [4, 5, 6] and a.tolist() == [7]
    q, k, v = _qkv()
    mask, cot, a = _masks(2, 13)
    with pytest.raises(ValueError, match="kv_slots"):
        rkv_compress(q, k, v, attention_mask=mask, cot_mask=cot, answer_start=a, slots=0)
    with pytest.raises(ValueError, match="answer_start"):
        rkv_compress(q, k, v, attention_mask=mask, cot_mask=cot, answer_start=a[:1], slots=2)
