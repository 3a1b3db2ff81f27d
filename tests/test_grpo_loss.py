"""Fused lm_head + GRPO loss vs TRL's formulas on materialized logits (latentfast.reference).

On CPU the Triton kernels run under the interpreter (tests/conftest.py), fp32, tight
tolerances. ``cuda`` tests: bf16 against the fp32 reference with stated tolerances.
"""
import itertools

import pytest
import torch

from latentfast.nn.grpo_loss import FusedLinearGRPOLoss
from latentfast.ops.grpo_loss import GRPOMetrics, fused_linear_grpo_loss, lm_head_logps
from latentfast.reference import grpo_loss as ref

B, T, H, V = 3, 6, 24, 300  # V = 300: not a multiple of any chunk or tile


def _inputs(device="cpu", dtype=torch.float32, logit_scale=1.0, temperature=0.7):
    x = torch.randn(B, T, H, device=device, dtype=dtype)
    W = (torch.randn(V, H, device=device) * 0.3 * logit_scale).to(dtype)
    b = (torch.randn(V, device=device) * 0.1).to(dtype)
    ids = torch.randint(0, V, (B, T), device=device)
    mask = torch.ones(B, T, dtype=torch.long, device=device)
    mask[0, 4:] = 0  # ragged
    mask[1, 1:] = 0  # a single token
    mask[2, :] = 0  # fully masked row
    adv = torch.randn(B, device=device)
    with torch.no_grad():
        lp, _ = ref.logps_and_entropy((x.float() @ W.float().t() + b.float()) / temperature, ids)
    old = lp + 0.3 * torch.randn_like(lp)  # ratios spread across both clip edges
    refp = lp + 0.2 * torch.randn_like(lp)
    return x, W, b, ids, mask, adv, old, refp


def _run(fn, x, W, b, ids, mask, adv, ref_lp, old_lp, **kw):
    xx, WW = x.clone().requires_grad_(), W.clone().requires_grad_()
    bb = b.clone().requires_grad_() if b is not None else None
    loss, metrics = fn(xx, WW, ids, mask, adv, bb, ref_lp, old_lp, **kw)
    loss.backward()
    m = metrics if isinstance(metrics, dict) else metrics._asdict()
    return loss.detach(), xx.grad, WW.grad, None if bb is None else bb.grad, m


def _assert_matches(kw, inputs, atol=2e-5, rtol=1e-4, chunk_size=1, bias=True):
    x, W, b, ids, mask, adv, old, refp = inputs
    args = (x, W, b if bias else None, ids, mask, adv, kw.pop("ref", refp), kw.pop("old", old))
    want = _run(ref.grpo_loss, *args, **kw)
    got = _run(fused_linear_grpo_loss, *args, chunk_size=chunk_size, **kw)
    for name, w, g in zip(("loss", "grad_x", "grad_W", "grad_b"), want[:4], got[:4]):
        if w is None:
            assert g is None
            continue
        assert torch.isfinite(g).all(), name
        torch.testing.assert_close(g, w, atol=atol, rtol=rtol, msg=lambda s: f"{name}: {s}")
    for k, w in want[4].items():
        torch.testing.assert_close(got[4][k].float(), w.float(), atol=1e-5, rtol=1e-5, msg=lambda s: f"{k}: {s}")
    return want, got


BASE = dict(beta=0.1, epsilon_low=0.2, epsilon_high=0.28, max_completion_length=8, temperature=0.7)


@pytest.mark.parametrize("loss_type,level", itertools.product(["grpo", "bnpo", "dr_grpo", "dapo"], ["token", "sequence"]))
def test_loss_types_match_reference(loss_type, level):
    _assert_matches(dict(BASE, loss_type=loss_type, importance_sampling_level=level), _inputs())


@pytest.mark.parametrize("with_old,with_ref,beta", [(False, False, 0.0), (False, True, 0.04), (True, False, 0.0),
                                                    (True, True, 0.5)])
def test_with_and_without_old_and_ref(with_old, with_ref, beta):
    inputs = _inputs()
    kw = dict(BASE, beta=beta, loss_type="bnpo")
    kw["old"] = inputs[6] if with_old else None
    kw["ref"] = inputs[7] if with_ref else None
    _, got = _assert_matches(kw, inputs, bias=False)
    assert got[0] != 0


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_all_options_together(level):
    """delta, KL bias correction, entropy-quantile masking, vLLM ratio, temperature."""
    x, W, b, ids, mask, adv, old, refp = _inputs(temperature=1.3)
    adv = torch.tensor([1.0, -1.0, 0.5])
    old = old + torch.tensor([[-0.5], [0.5], [0.0]])  # sequence ratios beyond both clip edges
    inputs = (x, W, b, ids, mask, adv, old, refp)
    vis = torch.rand(B) + 0.5
    kw = dict(BASE, temperature=1.3, loss_type="grpo", importance_sampling_level=level, delta=1.5,
              use_bias_correction_kl=True, top_entropy_quantile=0.5, vllm_is_ratio=vis)
    want, _ = _assert_matches(kw, inputs)
    assert want[4]["clip_ratio_low"] > 0 and want[4]["clip_ratio_high"] > 0  # both clip edges exercised


def test_vllm_ratio_per_token_and_chunking_invariance():
    inputs = _inputs()
    kw = dict(BASE, loss_type="dapo", vllm_is_ratio=torch.rand(B, T) + 0.5)
    a = _assert_matches(dict(kw), inputs, chunk_size=1)[1]
    b = _assert_matches(dict(kw), inputs, chunk_size=None)[1]
    torch.testing.assert_close(a[2], b[2], atol=1e-5, rtol=1e-5)


def test_extreme_logits():
    """Logits near +-1e4: online logsumexp and the entropy stay finite and exact."""
    torch.manual_seed(1)
    inputs = _inputs(logit_scale=3e3, temperature=1.0)
    x, W = inputs[0], inputs[1]
    assert (x @ W.t()).abs().max() > 5e3
    _assert_matches(dict(BASE, temperature=1.0, loss_type="dapo"), inputs, atol=1e-3, rtol=1e-4)


def test_dapo_num_items_gradient_accumulation():
    """Two micro-batches normalised by the global token count add up to the full batch."""
    x, W, b, ids, mask, adv, old, refp = _inputs()
    mask[2, :3] = 1
    kw = dict(BASE, loss_type="dapo")
    full = _run(fused_linear_grpo_loss, x, W, b, ids, mask, adv, refp, old, **kw)
    n = int(mask.sum())
    parts = [_run(fused_linear_grpo_loss, x[s], W, b, ids[s], mask[s], adv[s], refp[s], old[s],
                  num_items_in_batch=n, **kw) for s in (slice(0, 1), slice(1, 3))]
    torch.testing.assert_close(parts[0][0] + parts[1][0], full[0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(parts[0][2] + parts[1][2], full[2], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(torch.cat([parts[0][1], parts[1][1]]), full[1], atol=1e-6, rtol=1e-5)


def test_fully_masked_batch_and_frozen_weight():
    x, W, b, ids, mask, adv, old, refp = _inputs()
    xx = x.clone().requires_grad_()
    loss, metrics = fused_linear_grpo_loss(xx, W, ids, torch.zeros_like(mask), adv, b, refp, old, **BASE)
    loss.backward()
    assert loss.item() == 0 and (xx.grad == 0).all() and all(torch.isfinite(v) for v in metrics)
    # frozen lm_head (LoRA): only grad_x, still exact
    xx = x.clone().requires_grad_()
    loss, _ = fused_linear_grpo_loss(xx, W, ids, mask, adv, None, refp, old, **BASE)
    loss.backward()
    want = _run(ref.grpo_loss, x, W, None, ids, mask, adv, refp, old, **BASE)
    torch.testing.assert_close(xx.grad, want[1], atol=2e-5, rtol=1e-4)


def test_lm_head_logps_matches_reference():
    x, W, b, ids, mask, *_ = _inputs()
    lp, ent = lm_head_logps(x, W, ids, b, temperature=0.7, mask=mask)
    want_lp, want_ent = ref.logps_and_entropy((x @ W.t() + b) / 0.7, ids)
    m = mask.bool()
    torch.testing.assert_close(lp[m], want_lp[m], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent[m], want_ent[m], atol=1e-5, rtol=1e-5)
    assert (lp[~m] == 0).all()


def test_kernels_multi_tile():
    """The Triton row kernels with tiles smaller than V (online max over several tiles)."""
    from latentfast.ops._dispatch import use_triton

    if not use_triton(torch.empty(0)):
        pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1")
    from latentfast.kernels import grpo_loss as K

    L = torch.randn(5, V) * 4
    L[0, 7] = 1e4
    L[1] = -1e4 + torch.randn(V)
    ids = torch.randint(0, V, (5,))
    lse, lp, ent = K.logit_stats(L, ids, 0.5, block_v=64)
    want_lp, want_ent = ref.logps_and_entropy(L * 0.5, ids)
    torch.testing.assert_close(lp, want_lp, atol=1e-4, rtol=1e-6)
    torch.testing.assert_close(ent, want_ent, atol=1e-4, rtol=1e-5)
    g = torch.randn(5)
    Lg = L.clone().requires_grad_()
    (ref.logps_and_entropy(Lg * 0.5, ids)[0] * g).sum().backward()
    torch.testing.assert_close(K.logit_grad_(L.clone(), ids, lse, g, 0.5, block_v=64), Lg.grad, atol=1e-6, rtol=1e-5)


def test_module_is_liger_compatible():
    x, W, b, ids, mask, adv, old, refp = _inputs()
    mod = FusedLinearGRPOLoss(beta=0.1, loss_type="bnpo", temperature=0.7)
    loss, metrics = mod(x, W, ids, mask, adv, b, refp, old)
    assert isinstance(metrics, GRPOMetrics) and metrics[0] is metrics.kl and metrics[-1] is metrics.clip_ratio_region
    want, _ = ref.grpo_loss(x, W, ids, mask, adv, b, refp, old, beta=0.1, loss_type="bnpo", temperature=0.7)
    torch.testing.assert_close(loss, want, atol=1e-6, rtol=1e-5)
    # ref_input instead of ref_per_token_logps: reference logps computed inside (no grad)
    x_ref = x + 0.05 * torch.randn_like(x)
    loss2, _ = mod(x, W, ids, mask, adv, b, old_per_token_logps=old, ref_input=x_ref)
    ref_lp, _ = ref.logps_and_entropy((x_ref @ W.t() + b) / 0.7, ids)
    want2, _ = ref.grpo_loss(x, W, ids, mask, adv, b, ref_lp, old, beta=0.1, loss_type="bnpo", temperature=0.7)
    torch.testing.assert_close(loss2, want2, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="ref_per_token_logps or ref_input"):
        mod(x, W, ids, mask, adv)
    with pytest.raises(ValueError, match="not supported"):
        FusedLinearGRPOLoss(loss_type="kto")


def test_torch_compile_fullgraph():
    x, W, b, ids, mask, adv, old, refp = _inputs()
    mod = FusedLinearGRPOLoss(beta=0.1, loss_type="grpo", temperature=0.7)

    def step(x, W):
        loss, metrics = mod(x, W, ids, mask, adv, None, refp, old)
        return loss, metrics.clip_ratio_region

    xx, WW = x.clone().requires_grad_(), W.clone().requires_grad_()
    loss, _ = torch.compile(step, fullgraph=True, backend="aot_eager")(xx, WW)
    loss.backward()
    want = _run(ref.grpo_loss, x, W, None, ids, mask, adv, refp, old, **dict(BASE, loss_type="grpo", beta=0.1))
    torch.testing.assert_close(loss.detach(), want[0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(WW.grad, want[2], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("bad,match", [
    (dict(ids=torch.randint(0, V, (B, T + 1))), "selected_token_ids must have shape"),
    (dict(ids=torch.full((B, T), V)), r"selected_token_ids must lie in \[0, 300\)"),
    (dict(x=torch.randint(0, 5, (B, T, H))), "_input must be a floating tensor"),
    (dict(adv=torch.randn(B + 1)), "advantages must have shape"),
    (dict(mask=torch.ones(B, T - 1)), "attention_mask must have shape"),
    (dict(W=torch.randn(V, H + 1)), "lin_weight must have shape"),
    (dict(old=torch.randn(B, T + 1)), "old_per_token_logps must have shape"),
])
def test_bad_inputs_raise(bad, match):
    x, W, b, ids, mask, adv, old, refp = _inputs()
    a = dict(x=x, W=W, ids=ids, mask=mask, adv=adv, old=old)
    a.update(bad)
    with pytest.raises((ValueError, TypeError), match=match):
        fused_linear_grpo_loss(a["x"], a["W"], a["ids"], a["mask"], a["adv"], None, refp, a["old"])


def test_bad_options_raise():
    x, W, b, ids, mask, adv, old, refp = _inputs()
    with pytest.raises(ValueError, match="max_completion_length"):
        fused_linear_grpo_loss(x, W, ids, mask, adv, loss_type="dr_grpo")
    with pytest.raises(ValueError, match="loss_type"):
        fused_linear_grpo_loss(x, W, ids, mask, adv, loss_type="kto")
    with pytest.raises(TypeError, match="share one dtype"):
        fused_linear_grpo_loss(x, W.double(), ids, mask, adv)


# ----------------------------------------------------------------------------- GPU
def _rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12)).item()


@pytest.mark.cuda
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_cuda_bf16_matches_fp32_reference(level):
    """bf16 inputs, fp32 reference on the same (bf16-rounded) inputs.
    Tolerance: loss atol 5e-3 + rtol 1e-2 (the loss is a mean of +-A terms, so it can sit
    near 0); gradients rel. Frobenius error <= 3e-2 (bf16 logits and bf16 grad-of-logits
    feed the GEMMs, as in any bf16 lm_head)."""
    torch.manual_seed(0)
    b_, t_, h_, v_ = 4, 256, 512, 32000 + 37
    x = torch.randn(b_, t_, h_, device="cuda", dtype=torch.bfloat16)
    W = (torch.randn(v_, h_, device="cuda") * 0.05).to(torch.bfloat16)
    ids = torch.randint(0, v_, (b_, t_), device="cuda")
    mask = (torch.arange(t_, device="cuda")[None] < torch.tensor([[256], [200], [1], [0]], device="cuda")).long()
    adv = torch.randn(b_, device="cuda")
    with torch.no_grad():
        lp, _ = ref.logps_and_entropy(x.float() @ W.float().t(), ids)
    # log-ratios either well inside the clip range (|.| <= 0.15) or well outside it (>= 0.35):
    # a token within bf16's logp error (~1e-2) of a clip boundary would flip between
    # clipped and unclipped, a discontinuity of the loss, not an error of the kernel.
    near = (0.05 * torch.randn_like(lp)).clamp(-0.15, 0.15)
    far = torch.sign(torch.randn_like(lp)) * (0.35 + 0.1 * torch.rand_like(lp))
    shift = torch.where(torch.rand_like(lp) < 0.2, far, near)
    old, refp = lp + shift, lp + 0.1 * torch.randn_like(lp)
    kw = dict(beta=0.04, loss_type="dapo", importance_sampling_level=level, temperature=0.9)
    want = _run(ref.grpo_loss, x.float(), W.float(), None, ids, mask, adv, refp, old, **kw)
    got = _run(fused_linear_grpo_loss, x, W, None, ids, mask, adv, refp, old, chunk_size=1, **kw)
    assert abs(got[0].item() - want[0].item()) <= 1e-2 * abs(want[0].item()) + 5e-3
    assert _rel_err(got[1], want[1]) < 3e-2
    assert _rel_err(got[2], want[2]) < 3e-2
    for k in ("kl", "entropy", "ratio_mean"):
        torch.testing.assert_close(got[4][k].float(), want[4][k].float(), atol=2e-2, rtol=2e-2)


@pytest.mark.cuda
def test_cuda_fp32_tight_and_memory():
    """fp32 on GPU matches tightly; peak extra memory stays O(chunk * V), not O(B*T*V)."""
    torch.manual_seed(0)
    b_, t_, h_, v_ = 4, 1024, 128, 50257
    x = torch.randn(b_, t_, h_, device="cuda")
    W = torch.randn(v_, h_, device="cuda") * 0.05
    ids = torch.randint(0, v_, (b_, t_), device="cuda")
    mask = torch.ones(b_, t_, device="cuda", dtype=torch.long)
    adv = torch.randn(b_, device="cuda")
    want = _run(ref.grpo_loss, x, W, None, ids, mask, adv, None, None, beta=0.0, loss_type="bnpo")
    xx, WW = x.clone().requires_grad_(), W.clone().requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss, _ = fused_linear_grpo_loss(xx, WW, ids, mask, adv, beta=0.0, loss_type="bnpo", chunk_size=1)
    loss.backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    torch.testing.assert_close(loss.detach(), want[0], atol=1e-5, rtol=1e-4)
    assert _rel_err(xx.grad, want[1]) < 1e-4 and _rel_err(WW.grad, want[2]) < 1e-4
    logits_bytes = b_ * t_ * v_ * 4  # one fp32 copy of the logits; eager keeps several
    assert peak < 0.3 * logits_bytes, (peak, logits_bytes)


def test_autocast_casts_like_the_lm_head():
    """Under autocast, fp32 hidden states and weight run in the autocast dtype (as F.linear
    would) instead of raising a dtype mismatch."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16, requires_grad=True)
    W = (torch.randn(40, 16) * 0.1).requires_grad_(True)
    ids = torch.randint(0, 40, (2, 5))
    mask = torch.ones(2, 5, dtype=torch.long)
    adv = torch.randn(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = fused_linear_grpo_loss(x, W, ids, mask, adv, beta=0.0, loss_type="bnpo")
    want, _ = fused_linear_grpo_loss(x.bfloat16(), W.bfloat16(), ids, mask, adv, beta=0.0, loss_type="bnpo")
    torch.testing.assert_close(loss.float(), want.float())
    loss.backward()
    assert x.grad.dtype == torch.float32 and W.grad is not None and W.grad.abs().sum() > 0
