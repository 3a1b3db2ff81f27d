"""Teacher weighting rules against plain (loop) implementations of their formulas, rows
summing to 1, the router and its regulariser, and the weighted multi-teacher loss vs a
plain differentiable sum_b sum_k w_bk L_bk."""
import math

import pytest
import torch

from latentfast.nn import AttentionWeightedKVLoss, KVProjection
from latentfast.nn.teacher_weighting import (TeacherRouter, answer_nll_entropy, confidence_weights, entropy_weights,
                                             masked_mean_pool, min_ce_weights, per_task_weights, router_regularizer,
                                             static_weights, teacher_weights, weight_entropy, weighted_teacher_loss)
from latentfast.reference import kv_loss as ref


def _stats(B=5, K=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, K, generator=g) * 4


def plain_ca_mkd(ce):  # CA-MKD: w_k = (1 - exp(ce_k) / sum_j exp(ce_j)) / (K - 1)
    out = []
    for row in ce.tolist():
        z = sum(math.exp(c) for c in row)
        out.append([(1 - math.exp(c) / z) / (len(row) - 1) for c in row])
    return torch.tensor(out)


def plain_ebkd(h):  # EBKD: 1 - H_k / sum_j H_j, renormalised to sum 1
    out = []
    for row in h.tolist():
        w = [1 - x / sum(row) for x in row]
        out.append([x / sum(w) for x in w])
    return torch.tensor(out)


@pytest.mark.parametrize("K", [2, 3, 5])
def test_confidence_is_ca_mkd(K):
    ce = _stats(K=K)
    w = confidence_weights(ce)
    torch.testing.assert_close(w, plain_ca_mkd(ce))
    torch.testing.assert_close(w.sum(1), torch.ones(5))
    # the teacher with the lowest CE gets the largest weight
    assert torch.equal(w.argmax(1), ce.argmin(1))


@pytest.mark.parametrize("K", [2, 4])
def test_entropy_is_ebkd(K):
    h = _stats(K=K, seed=1) + 0.1
    w = entropy_weights(h)
    torch.testing.assert_close(w, plain_ebkd(h))
    torch.testing.assert_close(w.sum(1), torch.ones(5))
    assert torch.equal(w.argmax(1), h.argmin(1))
    # all teachers certain: uniform, not NaN
    torch.testing.assert_close(entropy_weights(torch.zeros(2, K)), torch.full((2, K), 1 / K))


def test_min_ce_is_hard_argmin():
    ce = torch.tensor([[1.0, 0.5, 2.0], [0.1, 0.3, 0.2], [3.0, 3.0, 1.0]])
    torch.testing.assert_close(min_ce_weights(ce), torch.tensor([[0., 1., 0.], [1., 0., 0.], [0., 0., 1.]]))


def test_static_and_per_task():
    w = static_weights([1, 3], 4)
    torch.testing.assert_close(w, torch.tensor([[0.25, 0.75]] * 4))
    table = {"eq": [1, 0], "nl": [0, 2], "default": [1, 1]}
    w = per_task_weights(["nl", "eq", None, "other"], table, 2)
    torch.testing.assert_close(w, torch.tensor([[0., 1.], [1., 0.], [.5, .5], [.5, .5]]))
    with pytest.raises(ValueError, match="tag 'other'.*no 'default'"):
        per_task_weights(["eq", "other"], {"eq": [1, 0]}, 2)
    with pytest.raises(ValueError, match="expected 2"):
        per_task_weights(["eq"], {"eq": [1, 0, 0]}, 2)
    with pytest.raises(ValueError, match=">= 0"):
        static_weights([1, -1], 2)


def test_one_teacher_is_weight_one_and_bad_input_errors():
    x = _stats(K=1)
    for fn in (confidence_weights, entropy_weights, min_ce_weights):
        torch.testing.assert_close(fn(x), torch.ones(5, 1))
    with pytest.raises(ValueError, match="non-finite"):
        confidence_weights(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match="needs nll"):
        teacher_weights("confidence")
    with pytest.raises(ValueError, match="must be one of"):
        teacher_weights("average")


def test_router_softmax_regularizers_and_pool():
    torch.manual_seed(0)
    h = torch.randn(4, 6, 8)
    mask = torch.ones(4, 6, dtype=torch.long)
    mask[0, 3:] = 0
    torch.testing.assert_close(masked_mean_pool(h, mask)[0], h[0, :3].mean(0))
    r = TeacherRouter(8, 3)
    torch.testing.assert_close(r(h, mask), torch.full((4, 3), 1 / 3))  # zero init: uniform
    torch.nn.init.normal_(r.net[-1].weight)
    w = r(h, mask).detach()
    torch.testing.assert_close(w.sum(1), torch.ones(4))
    # plain formulas: load balance = KL(mean_b w || U), entropy = mean_b KL(w_b || U)
    p = w.mean(0)
    lb = sum(float(pk) * math.log(float(pk) * 3) for pk in p)
    ent = sum(sum(float(x) * math.log(float(x) * 3) for x in row) for row in w) / 4
    assert float(router_regularizer(w, "load_balance")) == pytest.approx(lb, rel=1e-5)
    assert float(router_regularizer(w, "entropy")) == pytest.approx(ent, rel=1e-5)
    assert float(router_regularizer(torch.full((4, 3), 1 / 3))) == pytest.approx(0.0, abs=1e-7)
    assert float(weight_entropy(torch.full((2, 3), 1 / 3))) == pytest.approx(math.log(3), rel=1e-6)
    # the router reads the hidden state detached
    hg = h.clone().requires_grad_(True)
    r(hg, mask).sum().backward()
    assert hg.grad is None
    with pytest.raises(ValueError, match="must be one of"):
        router_regularizer(w, "kl")


def test_answer_nll_entropy_plain():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 11, bias=False)
    h = torch.randn(2, 5, 8)
    tgt = torch.full((2, 5), -100)
    tgt[0, 2], tgt[0, 3], tgt[1, 4] = 3, 7, 1
    nll, ent = answer_nll_entropy(head, h, tgt)
    for b in range(2):
        idx = [t for t in range(5) if tgt[b, t] != -100]
        lp = torch.log_softmax(head(h[b, idx]), -1)
        assert float(nll[b]) == pytest.approx(float(-lp[range(len(idx)), tgt[b, idx]].mean()), rel=1e-5)
        assert float(ent[b]) == pytest.approx(float(-(lp.exp() * lp).sum(-1).mean()), rel=1e-5)


def test_weighted_loss_matches_plain_sum_with_router_gradients():
    """sum_k L_KV(sample_weight=sg(w_k)) + straight-through router term == the plain
    differentiable sum_b sum_k w_bk L_bk, in value and in gradients (student, adapters, router)."""
    torch.manual_seed(0)
    B, T, K = 3, 7, 2
    s_k, s_v = torch.randn(B, 2, T, 8, requires_grad=True), torch.randn(B, 2, T, 8, requires_grad=True)
    teachers = [(torch.randn(B, 3, T, 4), torch.randn(B, 3, T, 4)) for _ in range(K)]
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 5:] = 0
    imp = torch.rand(B, T)
    losses = [AttentionWeightedKVLoss(0, True, [KVProjection(2, 8, 3, 4)]) for _ in range(K)]
    router = TeacherRouter(5, K)
    torch.nn.init.normal_(router.net[-1].weight)
    hidden = torch.randn(B, T, 5)

    def fused():
        w = router(hidden, mask)
        pieces, shares = [], []
        for k in range(K):
            lk, sh = losses[k]([(s_k, s_v)], [teachers[k]], step=1, teacher_importance=imp, attention_mask=mask,
                               sample_weight=w[:, k].detach(), return_per_sample=True)
            pieces.append(lk)
            shares.append(sh)
        return weighted_teacher_loss(pieces, torch.stack(shares, 1), w)

    def plain():
        w = router(hidden, mask)
        total = 0.0
        for k in range(K):
            pk, pv = losses[k].projections[0](s_k, s_v)
            per = ref.kv_loss_per_sample(pk, pv, *teachers[k], importance=imp, attention_mask=mask)
            total = total + (w[:, k] * per).sum()
        return total

    params = [s_k, s_v, *router.parameters(), *losses[0].parameters(), *losses[1].parameters()]
    a, b = fused(), plain()
    torch.testing.assert_close(a, b)
    for ga, gb in zip(torch.autograd.grad(a, params), torch.autograd.grad(b, params)):
        torch.testing.assert_close(ga, gb, atol=1e-6, rtol=1e-5)


def test_per_sample_shares_sum_to_kv_loss_and_sample_weight():
    from latentfast.ops import kv_loss
    from latentfast.ops.kv_loss import kv_loss_per_sample

    torch.manual_seed(1)
    sk, sv, tk, tv = (torch.randn(3, 2, 9, 4) for _ in range(4))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[2, 4:] = 0
    imp = torch.rand(3, 9)
    shares = kv_loss_per_sample(sk, sv, tk, tv, importance=imp, attention_mask=mask)
    torch.testing.assert_close(shares.sum(), kv_loss(sk, sv, tk, tv, importance=imp, attention_mask=mask))
    sw = torch.tensor([0.2, 1.0, 0.5])
    torch.testing.assert_close(kv_loss(sk, sv, tk, tv, importance=imp, attention_mask=mask, sample_weight=sw),
                               (sw * shares).sum())
    torch.testing.assert_close(ref.kv_loss(sk, sv, tk, tv, importance=imp, attention_mask=mask, sample_weight=sw),
                               (sw * shares).sum())
    with pytest.raises(ValueError, match="sample_weight"):
        kv_loss(sk, sv, tk, tv, sample_weight=torch.ones(2))
