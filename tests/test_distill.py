"""Fused distillation losses (the engine's distribution-level mode) vs Liger's chunked JSD on
CPU (compiled=False), the same objective on full logits, and MiniMind's formula written out."""
import pytest
import torch
import torch.nn.functional as F

from latentfast.nn.distill import FusedLinearJSDLoss
from latentfast.ops.distill import fused_linear_distill_loss, fused_linear_jsd_loss
from latentfast.ops.objectives.distill import JSDObjective
from latentfast.reference.lm_head_engine import distill_objective_loss

N, HS, HT, V = 21, 12, 20, 131


def _data(vt=V, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs, xt = torch.randn(N, HS, generator=g), torch.randn(N, HT, generator=g)
    ws, wt = torch.randn(V, HS, generator=g) * 0.3, torch.randn(vt, HT, generator=g) * 0.3
    bs, bt = torch.randn(V, generator=g) * 0.1, torch.randn(vt, generator=g) * 0.1
    y = torch.randint(0, V, (N,), generator=g)
    y[::5] = -100
    return xs, ws, bs, xt, wt, bt, y


def _grads(fn, xs, ws, bs, xt, wt, bt, y):
    a, b, c = (t.clone().requires_grad_() for t in (xs, ws, bs))
    out = fn(a, b, xt, wt, y, c, bt)
    loss = out[0] if isinstance(out, tuple) else out
    loss.backward()
    return [loss.detach(), a.grad, b.grad, c.grad]


def _close(want, got, atol=2e-5):
    for name, w, g in zip(("loss", "grad_x", "grad_W", "grad_b"), want, got):
        torch.testing.assert_close(g, w, atol=atol, rtol=1e-4, msg=lambda s: f"{name}: {s}")


@pytest.mark.parametrize("beta,temperature,wh", [(0.0, 1.0, 0.5), (1.0, 2.0, 0.3), (0.5, 0.7, 0.0), (0.3, 1.5, 1.0)])
def test_matches_liger_jsd(beta, temperature, wh):
    chunked = pytest.importorskip("liger_kernel.chunked_loss")
    data = _data()
    kw = dict(beta=beta, temperature=temperature, weight_hard_loss=wh, weight_soft_loss=1 - wh)
    liger = chunked.LigerFusedLinearJSDLoss(compiled=False, chunk_size=8, **kw)
    ours = FusedLinearJSDLoss(chunk_size=4, **kw)
    _close(_grads(liger, *data), _grads(ours, *data))


def test_same_objective_on_full_logits_and_soft_hard_parts():
    xs, ws, bs, xt, wt, bt, y = _data(seed=1)
    obj = JSDObjective(beta=0.4, temperature=1.3, weight_hard_loss=0.2, weight_soft_loss=0.8)
    want = _grads(lambda a, b, xt_, wt_, y_, c, bt_: distill_objective_loss(obj, a, b, c, xt_, wt_, bt_, y_.clamp(min=0),
                                                                            y_ != -100)[0], xs, ws, bs, xt, wt, bt, y)
    got = _grads(lambda *a: fused_linear_jsd_loss(*a, beta=0.4, temperature=1.3, weight_hard_loss=0.2,
                                                  weight_soft_loss=0.8, chunk_size=3), xs, ws, bs, xt, wt, bt, y)
    _close(want, got)
    loss, soft, hard = fused_linear_jsd_loss(xs, ws, xt, wt, y, bs, bt, return_soft_hard_loss=True)
    torch.testing.assert_close(loss, 0.5 * soft + 0.5 * hard)
    keep = y != -100
    torch.testing.assert_close(hard, F.cross_entropy(xs[keep] @ ws.t() + bs, y[keep]), atol=1e-6, rtol=1e-5)


def test_minimind_distillation_with_a_larger_teacher_vocab():
    """alpha * CE + (1 - alpha) * T^2 * KL_div(log_softmax(s/T), softmax(t/T), 'batchmean') over
    masked tokens, teacher logits cut to the student's vocabulary."""
    xs, ws, bs, xt, wt, bt, y = _data(vt=V + 17, seed=2)
    alpha, T = 0.5, 1.5

    def minimind(a, b, xt_, wt_, y_, c, bt_):
        keep = y_ != -100
        s = a @ b.t() + c
        with torch.no_grad():
            t = (xt_ @ wt_.t() + bt_)[..., :V]
        ce = F.cross_entropy(s[keep], y_[keep])
        kd = T * T * F.kl_div(F.log_softmax(s[keep] / T, -1), F.softmax(t[keep] / T, -1), reduction="batchmean")
        return alpha * ce + (1 - alpha) * kd

    got = _grads(lambda *a: fused_linear_distill_loss(*a, alpha=alpha, temperature=T, chunk_size=5),
                 xs, ws, bs, xt, wt, bt, y)
    _close(_grads(minimind, xs, ws, bs, xt, wt, bt, y), got)


def test_edge_cases_and_errors():
    xs, ws, bs, xt, wt, bt, y = _data(seed=3)
    a = xs.clone().requires_grad_()
    loss = fused_linear_jsd_loss(a, ws, xt, wt, torch.full((N,), -100))
    loss.backward()
    assert loss.item() == 0 and (a.grad == 0).all()
    # logits near +-1e4 stay finite
    got = _grads(lambda *a_: fused_linear_jsd_loss(*a_, beta=0.5), xs, ws * 3e3, bs, xt, wt * 3e3, bt, y)
    assert all(torch.isfinite(t).all() for t in got)
    with pytest.raises(ValueError, match="teacher vocabulary"):
        fused_linear_jsd_loss(xs, ws, xt, wt[:-1], y)
    with pytest.raises(ValueError, match="teacher_input must have"):
        fused_linear_jsd_loss(xs, ws, xt[:-1], wt, y)
    with pytest.raises(ValueError, match="beta"):
        FusedLinearJSDLoss(beta=1.5)
