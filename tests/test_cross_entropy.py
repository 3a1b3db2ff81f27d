"""Fused lm_head cross-entropy vs plain PyTorch (F.cross_entropy, Liger's z-loss / softcap
formulas written out) and vs the same objective on full logits; HF causal-LM patch."""
import pytest
import torch
import torch.nn.functional as F

from latentfast.nn import FusedLinearCrossEntropyLoss
from latentfast.ops import fused_linear_cross_entropy

N, H, V = 23, 16, 301


@pytest.fixture(autouse=True)
def _no_interpreter(monkeypatch):
    """The objective is what these tests check: run the CPU backend (native or torch) rather
    than the Triton interpreter, which tests/test_grpo_loss.py and test_lm_head_engine.py cover."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def _data(scale=0.3, ignore=True):
    x = torch.randn(N, H)
    W = torch.randn(V, H) * scale
    b = torch.randn(V) * 0.1
    y = torch.randint(0, V, (N,))
    if ignore:
        y[::4] = -100
    return x, W, b, y


def _plain(x, W, b, y, *, label_smoothing=0.0, lse_square_scale=0.0, reduction="mean", softcap=None,
           loss_weights=None, num_items=None, ce_weight=None):
    """Independent formula: torch's CE (+ Liger's z-loss) on full logits."""
    logits = (x @ W.t() + (b if b is not None else 0)).float()
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    keep = y != -100
    ce = F.cross_entropy(logits, y, weight=ce_weight, ignore_index=-100, label_smoothing=label_smoothing,
                         reduction="none")
    z = lse_square_scale * torch.logsumexp(logits, -1) ** 2 * keep
    per = ce + z
    if loss_weights is not None:
        per = per * loss_weights
    if num_items is not None:
        return per.sum() / num_items
    if reduction == "sum":
        return per.sum()
    d = (ce_weight[y.clamp(min=0)] * keep).sum() if ce_weight is not None else keep.sum()
    return (ce * (loss_weights if loss_weights is not None else 1)).sum() / d + \
        (z * (loss_weights if loss_weights is not None else 1)).sum() / keep.sum()


def _both(kw, x, W, b, y, chunk_size=5, plain_kw=None):
    out = []
    for fn in ("fused", "plain"):
        xx, WW, bb = (t.clone().requires_grad_() for t in (x, W, b))
        if fn == "fused":
            loss = fused_linear_cross_entropy(xx, WW, y, bb, chunk_size=chunk_size, **kw)
        else:
            loss = _plain(xx, WW, bb, y, **(plain_kw or kw))
        loss.backward()
        out.append([loss.detach(), xx.grad, WW.grad, bb.grad])
    for name, g, w in zip(("loss", "grad_x", "grad_W", "grad_b"), *out):
        assert torch.isfinite(g).all(), name
        torch.testing.assert_close(g, w, atol=2e-5, rtol=1e-4, msg=lambda s: f"{name}: {s}")
    return out


@pytest.mark.parametrize("kw", [
    {},
    {"reduction": "sum"},
    {"label_smoothing": 0.1},
    {"lse_square_scale": 1e-3},
    {"label_smoothing": 0.2, "lse_square_scale": 1e-2, "softcap": 3.0},
    {"softcap": 1.5},
])
def test_matches_torch_cross_entropy(kw):
    _both(kw, *_data())


def test_per_token_weights_num_items_and_class_weights():
    x, W, b, y = _data()
    w = torch.ones(N)
    w[1::3] = 10.0  # MiniMind's reasoning-tag up-weighting: the mean still divides by the token count
    _both({"loss_weights": w}, x, W, b, y)
    _both({"num_items_in_batch": 40}, x, W, b, y, plain_kw={"num_items": 40})
    cw = torch.rand(V) + 0.5
    _both({"ce_weight": cw}, x, W, b, y)


def test_gradient_accumulation_with_num_items():
    """Two micro-batches normalised by the global token count add up to the full batch."""
    x, W, b, y = _data()
    n = int((y != -100).sum())
    full = fused_linear_cross_entropy(x, W, y, b)
    parts = sum(fused_linear_cross_entropy(x[s], W, y[s], b, num_items_in_batch=n)
                for s in (slice(0, 9), slice(9, N)))
    torch.testing.assert_close(parts, full, atol=1e-6, rtol=1e-5)


def test_edge_cases():
    """Everything ignored, one row, 3-D input, logits near +-1e4, z-loss returned."""
    x, W, b, y = _data()
    xx = x.clone().requires_grad_()
    loss = fused_linear_cross_entropy(xx, W, torch.full((N,), -100), b)
    loss.backward()
    assert loss.item() == 0 and (xx.grad == 0).all()
    _both({}, x[:1], W, b, torch.tensor([7]))
    torch.manual_seed(3)
    xe, We, be, ye = _data(scale=3e3)
    assert (xe @ We.t()).abs().max() > 5e3
    out = []
    for fn in (lambda *a: fused_linear_cross_entropy(*a), lambda x_, W_, y_, b_: _plain(x_, W_, b_, y_)):
        WW = We.clone().requires_grad_()
        loss = fn(xe, WW, ye, be)
        loss.backward()
        out.append((loss.detach(), WW.grad))
    torch.testing.assert_close(out[0][0], out[1][0], atol=1e-3, rtol=1e-5)
    torch.testing.assert_close(out[0][1], out[1][1], atol=1e-2, rtol=1e-4)
    x3 = x.view(1, N, H)
    got = fused_linear_cross_entropy(x3, W, y.view(1, N), b, lse_square_scale=1e-2, return_z_loss=True)
    keep = y != -100
    want_z = 1e-2 * (torch.logsumexp(x @ W.t() + b, -1) ** 2)[keep].mean()
    torch.testing.assert_close(got.z_loss, want_z, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got.loss, _plain(x, W, b, y, lse_square_scale=1e-2), atol=1e-6, rtol=1e-5)


def test_module_liger_signature_and_errors():
    x, W, b, y = _data()
    mod = FusedLinearCrossEntropyLoss(ignore_index=-100, label_smoothing=0.1)
    torch.testing.assert_close(mod(W, x, y, b), _plain(x, W, b, y, label_smoothing=0.1), atol=1e-6, rtol=1e-5)
    with pytest.raises(NotImplementedError, match="reduction='none'"):
        FusedLinearCrossEntropyLoss(reduction="none")
    with pytest.raises(ValueError, match="target must lie in"):
        fused_linear_cross_entropy(x, W, torch.full((N,), V), b)
    with pytest.raises(ValueError, match="target must have shape"):
        fused_linear_cross_entropy(x, W, y[:-1], b)
    with pytest.raises(ValueError, match="loss_weights must have shape"):
        fused_linear_cross_entropy(x, W, y, b, loss_weights=torch.ones(N + 1))


# ----------------------------------------------------------------------------- HF patch
def _tiny(kind):
    import transformers

    common = dict(vocab_size=211, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)
    if kind == "qwen2":
        cfg = transformers.Qwen2Config(**common, tie_word_embeddings=True)
        return transformers.Qwen2ForCausalLM(cfg)
    cfg = transformers.LlamaConfig(**common, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(cfg)


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_patch_causal_lm_same_loss_and_grads(kind):
    import copy

    import latentfast

    torch.manual_seed(0)
    ref = _tiny(kind).float()
    model = latentfast.patch_causal_lm(copy.deepcopy(ref), chunk_size=7)
    ids = torch.randint(0, 211, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 6:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, :3] = -100  # a prompt
    for kw in ({}, {"num_items_in_batch": torch.tensor(31)}):
        for m in (ref, model):
            m.zero_grad()
        want = ref(ids, attention_mask=mask, labels=labels, **kw)
        got = model(ids, attention_mask=mask, labels=labels, **kw)
        assert got.logits is None and want.logits is not None
        torch.testing.assert_close(got.loss, want.loss, atol=1e-5, rtol=1e-5)
        want.loss.backward()
        got.loss.backward()
        for (name, p), q in zip(ref.named_parameters(), model.parameters()):
            torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-4, msg=lambda s: f"{name}: {s}")
    # no labels: the original forward, logits as usual
    torch.testing.assert_close(model(ids).logits, ref(ids).logits)
    from latentfast.models.causal_lm_patch import is_patched, unpatch_causal_lm

    assert is_patched(model) and not is_patched(unpatch_causal_lm(model))
    with pytest.raises(TypeError, match="lm_head"):
        latentfast.patch_causal_lm(torch.nn.Linear(2, 2))
