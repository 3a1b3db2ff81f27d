"""Attention-weighted KV loss: fused op vs eager reference (values and gradients),
normalisation, the module's warmup switch and attention source."""
import pytest
import torch
import torch.nn.functional as F

from latentfast.nn import AttentionWeightedKVLoss, KVProjection
from latentfast.ops import attention_token_importance, importance_weights, kv_loss, weighted_sq_error
from latentfast.reference import kv_loss as ref
from latentfast.reference.attention_importance import eager_attention_probs


def make_kv(B, H, T, D, dtype=torch.float32, device="cpu", seed=0, grad=True):
    g = torch.Generator().manual_seed(seed)
    ts = [torch.randn(B, H, T, D, generator=g).to(device, dtype) for _ in range(4)]
    for t in ts[:2]:
        t.requires_grad_(grad)
    return ts


def make_importance(B, T, device="cpu", seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(B, T, generator=g) * 2, -1).to(device)


def mask_for(B, T, device="cpu"):
    m = torch.ones(B, T, dtype=torch.long)
    m[-1, : T // 3] = 0
    return m.to(device)


def grads(loss, ts):
    return torch.autograd.grad(loss, ts)


@pytest.mark.parametrize("T,H,D", [(1, 2, 16), (17, 3, 24), (17, 2, 160), (256, 2, 64)])
@pytest.mark.parametrize("weighted,padded", [(False, False), (True, False), (True, True)])
def test_matches_reference(T, H, D, weighted, padded):
    B = 2
    sk, sv, tk, tv = make_kv(B, H, T, D)
    tk.requires_grad_(True)  # teacher gradients are supported too
    imp = make_importance(B, T) if weighted else None
    mask = mask_for(B, T) if padded else None
    out = kv_loss(sk, sv, tk, tv, importance=imp, attention_mask=mask)
    exp = ref.kv_loss(sk, sv, tk, tv, importance=imp, attention_mask=mask)
    torch.testing.assert_close(out, exp, atol=1e-6, rtol=1e-5)
    for g, rg in zip(grads(out, [sk, sv, tk]), grads(exp, [sk, sv, tk])):
        torch.testing.assert_close(g, rg, atol=1e-7, rtol=1e-5)


def test_uniform_importance_is_plain_mse():
    sk, sv, tk, tv = make_kv(2, 3, 17, 16)
    plain = F.mse_loss(sk, tk) + F.mse_loss(sv, tv)
    torch.testing.assert_close(kv_loss(sk, sv, tk, tv), plain)
    torch.testing.assert_close(kv_loss(sk, sv, tk, tv, importance=torch.full((2, 17), 0.3)), plain)
    imp = make_importance(2, 17)
    weighted = kv_loss(sk, sv, tk, tv, importance=imp)
    assert not torch.allclose(weighted, plain, rtol=1e-3)
    torch.testing.assert_close(kv_loss(sk, sv, tk, tv, importance=imp * 7), weighted)  # scale-free


def test_padding_is_ignored():
    sk, sv, tk, tv = make_kv(2, 2, 17, 16, grad=False)
    mask = mask_for(2, 17)
    base = kv_loss(sk, sv, tk, tv, attention_mask=mask)
    sk2 = sk.clone()
    sk2[1, :, :5] += 100.0  # only padded positions change
    torch.testing.assert_close(kv_loss(sk2, sv, tk, tv, attention_mask=mask), base)


def test_importance_weights_normalisation():
    imp = make_importance(3, 17)
    mask = mask_for(3, 17)
    w = importance_weights(imp, mask)
    assert (w[mask == 0] == 0).all()
    torch.testing.assert_close(w.sum(1), mask.sum(1).float())
    torch.testing.assert_close(importance_weights(None, mask), mask.float())


def test_noncontiguous_and_mixed_dtype():
    sk, sv, tk, tv = make_kv(2, 4, 17, 16)
    s_view = sk.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_(True)
    w = importance_weights(make_importance(2, 17))
    out = weighted_sq_error(s_view, tk.double(), w)
    exp = ref.weighted_sq_error(sk, tk.double(), w)
    torch.testing.assert_close(out, exp.float())
    torch.testing.assert_close(grads(out, [s_view])[0], grads(exp, [sk])[0])


def test_bad_arguments():
    sk, sv, tk, tv = make_kv(2, 2, 17, 16, grad=False)
    with pytest.raises(ValueError, match="KVProjection"):
        kv_loss(sk[:, :1], sv, tk, tv)
    with pytest.raises(ValueError, match="importance must have shape"):
        kv_loss(sk, sv, tk, tv, importance=torch.ones(2, 16))
    with pytest.raises(TypeError, match="floating"):
        weighted_sq_error(sk.long(), tk, torch.ones(2, 17))


def test_opcheck():
    sk, _, tk, _ = make_kv(2, 2, 17, 16)
    w = importance_weights(make_importance(2, 17))
    torch.library.opcheck(torch.ops.latentfast.weighted_sq_error.default, (sk, tk, w),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


# ---------------------------------------------------------------- module


def attention_setup(B=2, T=17, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, 4, T, 8, generator=g) * 2
    k = torch.randn(B, 2, T, 8, generator=g)
    return q, k


def test_warmup_switch_and_status():
    sk, sv, tk, tv = make_kv(2, 2, 17, 16)
    q, k = attention_setup()
    loss_fn = AttentionWeightedKVLoss(warmup_steps=10)
    plain = kv_loss(sk, sv, tk, tv)
    weighted = kv_loss(sk, sv, tk, tv, importance=attention_token_importance(q, k))
    # during warmup the attention is not even needed
    torch.testing.assert_close(loss_fn((sk, sv), (tk, tv), step=9), plain)
    assert not loss_fn.last_weighted and loss_fn.status(9) == "[Attn-warmup: 1 steps]"
    torch.testing.assert_close(loss_fn((sk, sv), (tk, tv), step=10, student_attention=(q, k)), weighted)
    assert loss_fn.last_weighted and loss_fn.status(10) == "[Student-Attn-weighted]"
    with pytest.raises(ValueError, match="student_attention"):
        loss_fn((sk, sv), (tk, tv), step=10)


def test_internal_step_counter_and_state_dict():
    sk, sv, tk, tv = make_kv(1, 2, 5, 16, grad=False)
    imp = make_importance(1, 5)
    loss_fn = AttentionWeightedKVLoss(warmup_steps=2)
    for _ in range(2):
        loss_fn((sk, sv), (tk, tv), student_importance=imp)
        assert not loss_fn.last_weighted
    loss_fn((sk, sv), (tk, tv), student_importance=imp)
    assert loss_fn.last_weighted
    restored = AttentionWeightedKVLoss(warmup_steps=2)
    restored.load_state_dict(loss_fn.state_dict())
    assert restored.num_steps == 3 and restored.weighting_active()


def test_teacher_attention_source():
    sk, sv, tk, tv = make_kv(2, 2, 17, 16)
    qs, ks = attention_setup(seed=1)
    qt, kt = attention_setup(seed=2)
    loss_fn = AttentionWeightedKVLoss(warmup_steps=0, use_teacher_attention=True)
    out = loss_fn((sk, sv), (tk, tv), student_attention=(qs, ks), teacher_attention=(qt, kt))
    torch.testing.assert_close(out, kv_loss(sk, sv, tk, tv, importance=attention_token_importance(qt, kt)))
    assert not torch.allclose(out, kv_loss(sk, sv, tk, tv, importance=attention_token_importance(qs, ks)))
    assert loss_fn.status(0) == "[Teacher-Attn-weighted]"


def test_materialized_attention_is_detached():
    """Seed note 004's CRITICAL fix: no gradient may reach the attention weights."""
    sk, sv, tk, tv = make_kv(2, 2, 17, 16)
    q, k = attention_setup()
    mask = mask_for(2, 17)
    q.requires_grad_(True)
    attn = eager_attention_probs(q, k, attention_mask=mask)  # differentiable, like output_attentions
    loss_fn = AttentionWeightedKVLoss(warmup_steps=0)
    out = loss_fn((sk, sv), (tk, tv), student_attention=attn, attention_mask=mask)
    fused = loss_fn((sk, sv), (tk, tv), student_attention=(q, k), attention_mask=mask)
    torch.testing.assert_close(out, fused)
    out.backward()
    assert q.grad is None and sk.grad is not None


def test_projection_and_layers():
    B, T = 2, 17
    g = torch.Generator().manual_seed(3)
    student = [(torch.randn(B, 2, T, 8, generator=g), torch.randn(B, 2, T, 8, generator=g)) for _ in range(2)]
    teacher = [(torch.randn(B, 4, T, 16, generator=g), torch.randn(B, 4, T, 16, generator=g)) for _ in range(2)]
    projs = [KVProjection(2, 8, 4, 16) for _ in range(2)]
    loss_fn = AttentionWeightedKVLoss(warmup_steps=0, projections=projs)
    imp = make_importance(B, T)
    out = loss_fn(student, teacher, student_importance=imp)
    exp = sum(kv_loss(*p(sk, sv), tk, tv, importance=imp) for p, (sk, sv), (tk, tv) in zip(projs, student, teacher)) / 2
    torch.testing.assert_close(out, exp)
    out.backward()
    assert all(p.k_proj.weight.grad is not None and p.v_proj.weight.grad.abs().sum() > 0 for p in projs)
    assert len(list(loss_fn.parameters())) == 4
    # identity initialisation when shapes agree
    k = torch.randn(B, 2, T, 8)
    torch.testing.assert_close(KVProjection(2, 8, 2, 8)(k, k)[0], k)


# ---------------------------------------------------------------- GPU


@pytest.mark.cuda
@pytest.mark.parametrize("T", [1, 17, 1000, 4096])
def test_cuda_bf16(T):
    sk, sv, tk, tv = make_kv(2, 4, T, 128, dtype=torch.bfloat16, device="cuda")
    imp = make_importance(2, T, "cuda")
    mask = mask_for(2, T, "cuda")
    out = kv_loss(sk, sv, tk, tv, importance=imp, attention_mask=mask)
    exp = ref.kv_loss(sk, sv, tk, tv, importance=imp, attention_mask=mask)
    torch.testing.assert_close(out, exp, atol=1e-4, rtol=1e-3)
    g, rg = grads(out, [sk, sv]), grads(exp, [sk, sv])
    for a, b in zip(g, rg):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b.float(), atol=1e-5, rtol=2e-2)
