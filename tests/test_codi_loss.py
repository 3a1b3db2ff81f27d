"""CODILoss against the original CODI's distillation formula (latentfast.reference.codi_loss)."""
import itertools

import pytest
import torch

from latentfast.nn import CODILoss
from latentfast.nn.codi import LOSS_TYPES
from latentfast.reference.codi_loss import codi_distill_loss


def hidden(B=3, Ts=7, Tt=11, D=13, n=5, seed=0, scale=1.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    s = [torch.randn(B, Ts, D, generator=g, dtype=dtype).requires_grad_(True) for _ in range(n)]
    t = [(torch.randn(B, Tt, D, generator=g, dtype=dtype) * scale + 0.3).requires_grad_(True) for _ in range(n)]
    sp = torch.randint(0, Ts, (B,), generator=g)
    tp = torch.randint(0, Tt, (B,), generator=g)
    return s, t, sp, tp


@pytest.mark.parametrize("loss_type,div_std,scale", list(itertools.product(LOSS_TYPES, [False, True], [0.4, 3.0])))
def test_all_matches_original_values_and_grads(loss_type, div_std, scale):
    s, t, sp, tp = hidden(scale=scale, seed=len(loss_type) + div_std)
    out = CODILoss("all", loss_type=loss_type, div_std=div_std)(s, t, sp, tp)
    ref = codi_distill_loss(s, t, sp, tp, loss_type=loss_type, div_std=div_std)
    # CODILoss computes in fp32 (as under bf16 autocast); the reference here runs in fp64
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-7)
    g_out = torch.autograd.grad(out, s, retain_graph=True)
    g_ref = torch.autograd.grad(ref, s)
    for a, b in zip(g_out, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)
    assert g_out[0].abs().sum() > 0  # the embedding output is distilled too
    out.backward()
    assert all(x.grad is None for x in t)  # teacher detached


@pytest.mark.parametrize("loss_type,div_std", list(itertools.product(LOSS_TYPES, [False, True])))
def test_blocks_is_the_original_without_the_embedding(loss_type, div_std):
    s, t, sp, tp = hidden(B=2, Ts=4, Tt=9, D=5, n=4, seed=7)
    out = CODILoss("blocks", loss_type=loss_type, div_std=div_std)(s, t, sp, tp)
    ref = codi_distill_loss(s[1:], t[1:], sp, tp, loss_type=loss_type, div_std=div_std)
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-7)
    assert torch.autograd.grad(out, s[0], allow_unused=True)[0] is None
    full = CODILoss("all", loss_type=loss_type, div_std=div_std)(s, t, sp, tp)
    assert not torch.allclose(full, out)  # 'all' is mean over L + 1 with the embedding: a different number


def test_div_std_once_for_smooth_l1_twice_for_l2():
    s, t, sp, tp = hidden(B=4, n=1, seed=3, scale=2.5)
    ht = torch.stack([t[0][b, tp[b]] for b in range(4)]).detach()
    std = ht.std()
    for lt, power in (("smooth_l1", 1), ("l2", 2), ("l1", 1)):
        plain = CODILoss("all", loss_type=lt, div_std=False, includes_embedding=False)(s, t, sp, tp)
        div = CODILoss("all", loss_type=lt, div_std=True, includes_embedding=False)(s, t, sp, tp)
        torch.testing.assert_close(div.double(), plain.double() / std ** power, rtol=1e-6, atol=0)


def test_single_layer_selections_and_projection():
    s, t, sp, tp = hidden(B=2, D=6, n=4, seed=5)
    g = torch.Generator().manual_seed(1)
    wide = [(torch.randn(2, 11, 10, generator=g, dtype=torch.float64)) for _ in range(7)]  # 6 blocks, width 10
    for spec, si, ti in (("last", 3, 6), ("middle", 2, 4), ([0], 1, 2), ("all", None, None)):
        fn = CODILoss(spec, loss_type="l2", div_std=True, student_dim=6, teacher_dim=10).double()
        out = fn(s, wide, sp, tp)
        if si is None:  # embedding<->embedding plus blocks by relative depth (1->2, 2->4, 3->6)
            idx = [(0, 0), (1, 2), (2, 4), (3, 6)]
        else:
            idx = [(si, ti)]
        proj = [fn.proj(x) for x in s]
        ref = sum(codi_distill_loss([proj[a]], [wide[b]], sp, tp, "l2", True) for a, b in idx) / len(idx)
        torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-7)
        out.backward()
        assert fn.proj.weight.grad is not None


def test_bad_loss_type_and_widths():
    with pytest.raises(ValueError, match="loss_type"):
        CODILoss(loss_type="mse")
    s, t, sp, tp = hidden(D=4, n=2)
    t = [torch.randn(3, 11, 8) for _ in range(2)]
    with pytest.raises(ValueError, match="student_dim"):
        CODILoss("all")(s, t, sp, tp)
