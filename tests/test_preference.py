"""Fused DPO-family losses vs Liger's chunked losses on CPU (``compiled=False``) and vs the
same objective on full logits; TRL's ipo against its formula written out."""
import pytest
import torch
import torch.nn.functional as F

from latentfast.nn import FusedLinearDPOLoss
from latentfast.ops import fused_linear_dpo_loss
from latentfast.ops.objectives.preference import DPO_LOSS_TYPES

P, T, H, V = 3, 6, 16, 151  # P pairs: inputs are (2P, T, H)


@pytest.fixture(autouse=True)
def _no_interpreter(monkeypatch):
    """The objective is what these tests check: run the CPU backend (native or torch) rather
    than the Triton interpreter, which tests/test_grpo_loss.py and test_lm_head_engine.py cover."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2 * P, T, H, generator=g)
    W = torch.randn(V, H, generator=g) * 0.3
    b = torch.randn(V, generator=g) * 0.1
    y = torch.randint(0, V, (2 * P, T), generator=g)
    y[:, :2] = -100  # prompts
    y[1, 4:] = -100  # ragged
    y[P + 2, 3:] = -100
    x_ref = x + 0.1 * torch.randn(x.shape, generator=g)
    return x, W, b, y, x_ref


def _grads(fn, x, W, b, *args, **kw):
    xx, WW, bb = (t.clone().requires_grad_() for t in (x, W, b))
    loss, aux = fn(WW, xx, *args, bias=bb, **kw)
    loss.backward()
    return [loss.detach(), xx.grad, WW.grad, bb.grad], [a.detach() for a in aux]


def _compare(want, got, atol=2e-5, rtol=1e-4):
    for name, w, g in zip(("loss", "grad_x", "grad_W", "grad_b"), want[0], got[0]):
        assert torch.isfinite(g).all(), name
        torch.testing.assert_close(g, w, atol=atol, rtol=rtol, msg=lambda s: f"{name}: {s}")
    names = ("chosen_logps", "rejected_logps", "chosen_logits_mean", "rejected_logits_mean", "nll_loss",
             "chosen_rewards", "rejected_rewards")
    for name, w, g in zip(names, want[1], got[1]):
        torch.testing.assert_close(g.float(), w.float(), atol=1e-5, rtol=1e-4, msg=lambda s: f"{name}: {s}")


LIGER_TYPES = [t for t in DPO_LOSS_TYPES if t != "ipo"]


@pytest.mark.parametrize("loss_type", LIGER_TYPES)
def test_matches_liger_every_loss_type(loss_type):
    chunked = pytest.importorskip("liger_kernel.chunked_loss")
    x, W, b, y, x_ref = _data()
    kw = dict(beta=0.2, loss_type=loss_type, label_smoothing=0.1 if loss_type in ("robust", "exo_pair") else 0.0,
              average_log_prob=loss_type in ("hinge", "sppo_hard"), compute_nll_loss=loss_type == "sigmoid")
    liger = chunked.LigerFusedLinearDPOLoss(compiled=False, use_ref_model=True, **kw)
    ours = FusedLinearDPOLoss(chunk_size=1, **kw)

    def run(mod):
        return lambda WW, xx, y_, bias: mod(WW, xx, y_, bias, ref_input=x_ref, ref_weight=W, ref_bias=b)

    _compare(_grads(run(liger), x, W, b, y), _grads(run(ours), x, W, b, y))


def test_no_reference_model_and_given_reference_logps():
    chunked = pytest.importorskip("liger_kernel.chunked_loss")
    x, W, b, y, x_ref = _data(1)
    liger = chunked.LigerFusedLinearDPOLoss(compiled=False, use_ref_model=False, beta=0.3)
    ours = FusedLinearDPOLoss(use_ref_model=False, beta=0.3)
    _compare(_grads(lambda *a, bias: liger(*a, bias), x, W, b, y), _grads(lambda *a, bias: ours(*a, bias), x, W, b, y))
    # precomputed reference log-probs == computing them from ref_input
    mod = FusedLinearDPOLoss(beta=0.3, average_log_prob=True)
    a = _grads(lambda *a_, bias: mod(*a_, bias, ref_input=x_ref), x, W, b, y)
    logp = torch.log_softmax(x_ref @ W.t() + b, -1).gather(-1, y.clamp(min=0)[..., None])[..., 0]
    m = y != -100
    ref = (logp * m).sum(-1) / m.sum(-1)
    got = _grads(lambda *a_, bias: mod(*a_, bias, ref_chosen_logps=ref[:P], ref_rejected_logps=ref[P:]), x, W, b, y)
    _compare(a, got)


def test_ipo_matches_trl_formula_and_chunking():
    """TRL: ipo losses = (logits - 1/(2 beta))^2 on token-mean log-probs, mean over pairs."""
    x, W, b, y, x_ref = _data(2)
    beta = 0.4

    def trl_ipo(WW, xx, y_, bias):
        m = y_ != -100

        def seq(h):
            lp = torch.log_softmax(h @ WW.t() + bias, -1).gather(-1, y_.clamp(min=0)[..., None])[..., 0]
            return (lp * m).sum(-1) / m.sum(-1)
        pol = seq(xx)
        with torch.no_grad():
            ref = seq(x_ref)
        logits = (pol[:P] - pol[P:]) - (ref[:P] - ref[P:])
        loss = ((logits - 1 / (2 * beta)) ** 2).mean()
        zero = torch.zeros(())
        return loss, (pol[:P], pol[P:], zero, zero, zero, beta * (pol[:P] - ref[:P]), beta * (pol[P:] - ref[P:]))

    want = _grads(trl_ipo, x, W, b, y)
    for chunk in (1, 2, None):
        mod = FusedLinearDPOLoss(beta=beta, loss_type="ipo", chunk_size=chunk)
        got = _grads(lambda *a, bias: mod(*a, bias, ref_input=x_ref), x, W, b, y)
        _compare((want[0], want[1][:2] + got[1][2:5] + want[1][5:]), got)


def test_minimind_dpo_form_and_errors():
    """MiniMind: sequence-mean log-probs, -logsigmoid(beta * logits).mean()."""
    x, W, b, y, x_ref = _data(3)
    loss, _ = fused_linear_dpo_loss(x, W, y, b, ref_input=x_ref, beta=0.15, average_log_prob=True)
    m = (y != -100).float()

    def seq(h):
        lp = torch.log_softmax(h @ W.t() + b, -1).gather(-1, y.clamp(min=0)[..., None])[..., 0]
        return (lp * m).sum(-1) / m.sum(-1).clamp(min=1e-8)
    pi, ref = seq(x), seq(x_ref)
    want = -F.logsigmoid(0.15 * ((pi[:P] - pi[P:]) - (ref[:P] - ref[P:]))).mean()
    torch.testing.assert_close(loss, want, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="even batch"):
        fused_linear_dpo_loss(x[:-1], W, y[:-1], use_ref_model=False)
    with pytest.raises(ValueError, match="ref_input or ref_chosen_logps"):
        fused_linear_dpo_loss(x, W, y)
    with pytest.raises(ValueError, match="loss_type"):
        FusedLinearDPOLoss(loss_type="kto")
    with pytest.raises(ValueError, match="exo_pair"):
        FusedLinearDPOLoss(loss_type="exo_pair")


@pytest.mark.parametrize("which,kw", [
    ("SimPO", dict(beta=0.3, gamma=0.4, label_smoothing=0.1, compute_nll_loss=True, alpha=0.7)),
    ("SimPO", dict(compute_nll_loss=False)),
    ("ORPO", dict(beta=0.2, compute_nll_loss=True)),
    ("ORPO", dict(beta=0.5, compute_nll_loss=False)),
])
def test_simpo_orpo_match_liger(which, kw):
    chunked = pytest.importorskip("liger_kernel.chunked_loss")
    import latentfast.nn as lnn

    x, W, b, y, _ = _data(4)
    liger = getattr(chunked, f"LigerFusedLinear{which}Loss")(compiled=False, **kw)
    ours = getattr(lnn, f"FusedLinear{which}Loss")(chunk_size=1, **kw)
    _compare(_grads(lambda *a, bias: liger(*a, bias), x, W, b, y), _grads(lambda *a, bias: ours(*a, bias), x, W, b, y))
    if which == "ORPO":  # log_odds_ratio, log_odds_chosen
        want, got = _grads(lambda *a, bias: liger(*a, bias), x, W, b, y)[1][7:], \
            _grads(lambda *a, bias: ours(*a, bias), x, W, b, y)[1][7:]
        assert len(got) == 2
        for w, g in zip(want, got):
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)
