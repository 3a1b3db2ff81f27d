"""The lm_head loss engine itself: any objective, fused vs the same objective on full logits.

A toy objective differentiates all four statistics (logp, entropy, lse, zsum) and couples
the rows of a sequence, so both logit-gradient paths (kernel + rank-one zsum term, and the
torch vjp path), whole-sequence chunking and softcap are exercised. CPU: the Triton kernels
run under the interpreter (conftest), fp32, tight.
"""
import dataclasses

import pytest
import torch

from latentfast.ops import lm_head_engine as E
from latentfast.reference import lm_head_engine as R

B, T, H, V = 4, 5, 16, 203  # V odd: not a multiple of any tile or chunk


@E.register_objective
@dataclasses.dataclass(frozen=True)
class Toy(E.Objective):
    """sum_seq w_seq * softplus(mean logp) + a * entropy + b * lse^2 + c * zsum / V, per token weighted."""

    a: float = 0.0
    b: float = 0.0
    c: float = 0.0
    coupled: bool = True
    stats: tuple = ("logp",)
    inputs = (("w_tok", "token"), ("w_seq", "seq"))
    metric_names = ("mean_logp", "per_seq")

    @property
    def row_local(self):
        return not self.coupled

    def loss(self, r):
        tok = r.logp * r.tok["w_tok"]
        if self.a:
            tok = tok + self.a * r.entropy
        if self.b:
            tok = tok + self.b * r.lse ** 2
        if self.c:
            tok = tok + self.c * r.zsum / r.vocab_size
        total = tok.sum() / r.n_tokens.clamp(min=1)
        if self.coupled:
            total = total + (r.per_seq["w_seq"] * torch.nn.functional.softplus(r.seq_mean(r.logp))).sum()
        return total

    def metrics(self, r):
        return {"mean_logp": r.logp.sum() / r.n_tokens.clamp(min=1), "per_seq": r.seq_mean(r.logp)}

    def metric_shapes(self, n_seqs):
        return {"mean_logp": (), "per_seq": (n_seqs,)}


def _data(scale=1.0):
    x = torch.randn(B, T, H)
    W = torch.randn(V, H) * 0.3 * scale
    b = torch.randn(V) * 0.1
    ids = torch.randint(0, V, (B, T))
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, 3:] = 0
    mask[1, 1:] = 0  # one token
    mask[2] = 0  # fully masked
    inputs = {"w_tok": torch.rand(B, T), "w_seq": torch.randn(B)}
    return x, W, b, ids, mask, inputs


def _grads(fn, obj, x, W, b, ids, mask, inputs, **kw):
    xx, WW, bb = (t.clone().requires_grad_() for t in (x, W, b))
    loss, metrics = fn(obj, xx, WW, bb, ids, mask, inputs, **kw)
    loss.backward()
    return [loss.detach(), xx.grad, WW.grad, bb.grad], metrics


CASES = {
    "logp": Toy(),
    "logp_zsum": Toy(c=0.7, stats=("logp", "zsum")),
    "all_stats": Toy(a=0.3, b=0.01, c=0.5, stats=("logp", "entropy", "lse", "zsum")),
    "row_local_all": Toy(a=-0.2, b=0.02, coupled=False, stats=("logp", "entropy", "lse")),
}


@pytest.mark.parametrize("name,chunk_rows,softcap", [
    *[(n, c, None) for n in CASES for c in (1, 3)], ("logp", 0, None), ("all_stats", 0, 2.5), ("logp", 3, 2.5),
    ("row_local_all", 1, 2.5)])
def test_matches_reference(name, chunk_rows, softcap):
    obj = CASES[name]
    data = _data()
    kw = dict(temperature=0.8, softcap=softcap)
    want, wm = _grads(R.objective_loss, obj, *data, **kw)
    got, gm = _grads(E.objective_loss, obj, *data, chunk_rows=chunk_rows, **kw)
    for label, w, g in zip(("loss", "grad_x", "grad_W", "grad_b"), want, got):
        torch.testing.assert_close(g, w, atol=2e-5, rtol=1e-4, msg=lambda s: f"{label}: {s}")
    for k in wm:
        torch.testing.assert_close(gm[k], wm[k], atol=1e-5, rtol=1e-5)
    assert gm["per_seq"].shape == (B,) and gm["per_seq"][2] == 0


def test_sequence_order_groups_and_extreme_logits():
    """A custom sweep order (pairs of sequences as groups) and logits near +-1e4."""
    obj = dataclasses.replace(CASES["all_stats"])
    x, W, b, ids, mask, inputs = _data(scale=3e3)
    assert (x @ W.t()).abs().max() > 5e3
    order = torch.tensor([0, 2, 1, 3])
    want, _ = _grads(R.objective_loss, obj, x, W, b, ids, mask, inputs, seq_order=order)
    got, _ = _grads(E.objective_loss, obj, x, W, b, ids, mask, inputs, seq_order=order, chunk_rows=2)
    for w, g in zip(want, got):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, w, atol=1e-3, rtol=1e-4)


def test_everything_masked_and_no_grad():
    x, W, b, ids, mask, inputs = _data()
    got, m = _grads(E.objective_loss, CASES["all_stats"], x, W, b, ids, torch.zeros_like(mask), inputs)
    assert all(torch.isfinite(t).all() for t in got) and (got[1] == 0).all() and (got[2] == 0).all()
    with torch.no_grad():
        loss, _ = E.objective_loss(CASES["logp"], x, W, b, ids, mask, inputs)
    want, _ = R.objective_loss(CASES["logp"], x, W, b, ids, mask, inputs)
    torch.testing.assert_close(loss, want.detach(), atol=1e-5, rtol=1e-5)


def test_under_a_dispatch_mode():
    """torch.func inside the op body still works under a TorchDispatchMode (torch.compile's
    aliasing check on a compiled graph's first call, FlopCounterMode, ...)."""
    from torch.utils.flop_counter import FlopCounterMode

    data = _data()
    want, _ = _grads(R.objective_loss, CASES["all_stats"], *data)
    with FlopCounterMode(display=False):
        got, _ = _grads(E.objective_loss, CASES["all_stats"], *data)
    torch.testing.assert_close(got[2], want[2], atol=2e-5, rtol=1e-4)


def test_default_chunk_bounds_cpu_memory():
    """On CPU the default chunk is a small slice of a large vocabulary's logits."""
    rows = E.chunk_rows_default(torch.device("cpu"), 151936, 4)
    assert 16 <= rows <= 128 and rows & (rows - 1) == 0
    assert E.chunk_rows_default(torch.device("cuda"), 151936, 2) >= 1024


def test_unregistered_objective_is_a_clear_error():
    @dataclasses.dataclass(frozen=True)
    class Unregistered(E.Objective):
        def loss(self, r):
            return r.logp.sum()

    x, W, b, ids, mask, inputs = _data()
    with pytest.raises(TypeError, match="register_objective"):
        E.objective_loss(Unregistered(), x, W, b, ids, mask, {})


def test_a_bf16_head_is_never_copied_to_fp32():
    """The fast path's sum_v W_v (GRPO's zsum) and DPO's logits mean sum a bf16 W in fp32
    without a V x H fp32 copy of it (that transient was 4 bytes per weight, more than the
    whole chunk budget: the planner's fake step could not see it)."""
    from latentfast.ops.grpo_loss import fused_linear_grpo_loss
    from latentfast.ops.preference import logits_mean
    from latentfast.plan.fake import allocation_peak

    torch.manual_seed(0)
    B, T, H, V = 2, 8, 64, 65536  # an fp32 copy of W: 16 MiB; row_sum_fp32 upcasts 4 MiB at a time
    W = torch.randn(V, H, dtype=torch.bfloat16) * 0.05
    x = torch.randn(B, T, H, dtype=torch.bfloat16, requires_grad=True)
    ids, mask, adv = torch.randint(0, V, (B, T)), torch.ones(B, T), torch.randn(B)
    for fn in (lambda: fused_linear_grpo_loss(x, W, ids, mask, adv, beta=0.0)[0].backward(),
               lambda: logits_mean(x, W, None)):
        fn()  # one-time allocations out of the measurement
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        assert allocation_peak(prof) < V * H * 4 // 2, "an fp32 copy of the bf16 head was allocated"
