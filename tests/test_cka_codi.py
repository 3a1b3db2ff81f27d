"""CKA loss, CODI loss and layer pairing."""
import pytest
import torch
import torch.nn.functional as F

from latentfast.nn import CKALoss, CODILoss, layer_pairs, linear_cka
from latentfast.reference.cka import linear_cka as reference_cka


def test_layer_pairs_presets():
    assert layer_pairs(28, 28, "middle") == [(13, 13)]
    assert layer_pairs(4, 8, "middle") == [(1, 3)]
    assert layer_pairs(24, 32, "last") == [(23, 31)]
    assert layer_pairs(2, 4, "all") == [(0, 1), (1, 3)]
    assert layer_pairs(4, 4, [0, -1]) == [(0, 0), (3, 3)]
    assert layer_pairs(4, 8, "1,3") == [(1, 3), (3, 7)]
    assert layer_pairs(1, 1, "middle") == [(0, 0)]
    with pytest.raises(ValueError, match="out of range"):
        layer_pairs(4, 4, [4])
    with pytest.raises(ValueError, match="middle"):
        layer_pairs(4, 4, "first")


@pytest.mark.parametrize("n,dx,dy", [(12, 32, 48), (300, 16, 24), (40, 40, 8)])
def test_cka_matches_definition(n, dx, dy):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, dx, generator=g, dtype=torch.float64)
    y = (x[:, :min(dx, dy)] @ torch.randn(min(dx, dy), dy, generator=g, dtype=torch.float64)
         + torch.randn(n, dy, generator=g, dtype=torch.float64))
    xr, yr = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
    xf, yf = x.float().requires_grad_(True), y.float().requires_grad_(True)
    out, exp = linear_cka(xf, yf), reference_cka(xr, yr)
    assert 0.05 < exp.item() < 0.99
    torch.testing.assert_close(out.double(), exp, atol=1e-5, rtol=1e-5)
    out.backward()
    exp.backward()
    torch.testing.assert_close(xf.grad.double(), xr.grad, atol=1e-6, rtol=1e-3)
    torch.testing.assert_close(yf.grad.double(), yr.grad, atol=1e-6, rtol=1e-3)


def test_cka_invariances_and_stability():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 32, generator=g)
    rot, _ = torch.linalg.qr(torch.randn(32, 32, generator=g))
    torch.testing.assert_close(linear_cka(x, 3.0 * x @ rot + 5.0), torch.tensor(1.0), atol=1e-5, rtol=0)
    y = torch.randn(64, 48, generator=g)
    base = linear_cka(x, y)
    # huge activations (fp32 HSIC would be ~1e48 unnormalised) and bf16 inputs stay finite
    torch.testing.assert_close(linear_cka(x * 1e12, y * 1e-6), base, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(linear_cka(x.bfloat16(), y.bfloat16()), base, atol=2e-2, rtol=0)
    assert torch.isfinite(linear_cka(torch.ones(8, 4), y[:8]))  # constant input: no NaN


def test_cka_mask_selects_tokens():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(2, 9, 16, generator=g), torch.randn(2, 9, 24, generator=g)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :4] = 0
    exp = reference_cka(x[mask.bool()], y[mask.bool()])
    torch.testing.assert_close(linear_cka(x, y, mask).double(), exp, atol=1e-5, rtol=1e-5)


def test_cka_loss_layers():
    g = torch.Generator().manual_seed(2)
    B, T = 2, 9
    student = [torch.randn(B, T, 16, generator=g) for _ in range(5)]  # embeddings + 4 layers
    teacher = [torch.randn(B, T, 32, generator=g) for _ in range(9)]  # embeddings + 8 layers
    teacher[4] = torch.cat([student[2], student[2]], -1)  # student block 1 <-> teacher block 3 (middle)
    rot, _ = torch.linalg.qr(torch.randn(32, 32, generator=g))
    teacher[8] = 2.0 * student[4] @ rot[:16]  # last <-> last, an isometry (CKA-invariant)
    assert CKALoss("middle")(student, teacher).item() == pytest.approx(0.0, abs=1e-5)
    assert CKALoss("last")(student, teacher).item() == pytest.approx(0.0, abs=1e-5)
    all_loss = CKALoss("all")(student, teacher)
    assert 0.1 < all_loss.item() < 1.0
    pairs = layer_pairs(4, 8, "all")
    exp = sum(1 - reference_cka(student[s + 1].reshape(-1, 16), teacher[t + 1].reshape(-1, 32)) for s, t in pairs) / 4
    torch.testing.assert_close(all_loss.double(), exp, atol=1e-5, rtol=1e-5)


def codi_reference(student, teacher, sp, tp):
    """CODI's loop: L1 at the pre-answer token / teacher std, mean over layers 1..L."""
    losses = []
    for hs, ht in zip(student[1:], teacher[1:]):
        s = torch.stack([hs[b, sp[b]] for b in range(hs.shape[0])])
        t = torch.stack([ht[b, tp[b]] for b in range(ht.shape[0])]).detach()
        losses.append(F.l1_loss(s, t) / t.std())
    return sum(losses) / len(losses)


def test_codi_matches_loop_and_grads():
    g = torch.Generator().manual_seed(3)
    B = 3
    student = [torch.randn(B, 7, 16, generator=g, requires_grad=True) for _ in range(4)]
    teacher = [(torch.randn(B, 12, 16, generator=g) * 3).requires_grad_(True) for _ in range(4)]
    sp, tp = torch.tensor([6, 3, 5]), torch.tensor([11, 8, 2])
    out = CODILoss()(student, teacher, sp, tp)
    exp = codi_reference(student, teacher, sp, tp)
    torch.testing.assert_close(out, exp)
    gs = torch.autograd.grad(out, student[1:], retain_graph=True)
    rgs = torch.autograd.grad(exp, student[1:])
    for a, b in zip(gs, rgs):
        torch.testing.assert_close(a, b)
    assert gs[0][0, 6].abs().sum() > 0 and gs[0][0, 5].abs().sum() == 0  # only the pre-answer token
    out.backward()
    assert all(t.grad is None for t in teacher)  # teacher detached


def test_codi_projection_and_options():
    g = torch.Generator().manual_seed(4)
    student = [torch.randn(2, 5, 8, generator=g) for _ in range(3)]
    teacher = [torch.randn(2, 5, 24, generator=g) for _ in range(5)]
    loss_fn = CODILoss(layers="last", student_dim=8, teacher_dim=24, loss_type="smooth_l1")
    out = loss_fn(student, teacher, [4, 4], [4, 4])
    s = loss_fn.proj(student[-1][:, 4])
    t = teacher[-1][:, 4]
    torch.testing.assert_close(out, F.smooth_l1_loss(s, t) / t.std())
    out.backward()
    assert loss_fn.proj.weight.grad is not None
    with pytest.raises(ValueError, match="student_dim"):
        CODILoss()(student, teacher, [4, 4], [4, 4])
