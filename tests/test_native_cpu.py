"""Optional native CPU backend (latentfast/kernels/csrc, CMakeLists.txt): the GRPO loss's per-chunk
kernels vs the torch functions, and the thinking residual's epilogues end to end vs the reference.

A session fixture gets the library as a user does, through latentfast.ops._native (built
on first use into the cache, skipped only when no C++ compiler is here). The suite
sets TRITON_INTERPRET=1 on CPU, so the ops are called directly, and the end-to-end checks
set TRITON_INTERPRET=0 so that dispatch reaches the native path.
"""
import importlib
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

from latentfast.ops import _native
from latentfast.ops import grpo_loss as G
from latentfast.ops import lm_head_engine as E
from latentfast.reference import grpo_loss as ref
from latentfast.reference.thinking_residual import thinking_residual as tr_reference
from test_thinking_residual import assert_matches, make_inputs

TR = importlib.import_module("latentfast.ops.thinking_residual")  # the package exports the function under this name

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _compiler():
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


@pytest.fixture(scope="session")
def native():
    """torch.ops.latentfast_native, as a user gets it: built on first use into the cache
    (latentfast.ops._native.build), or found there. Skipped only without a C++ compiler."""
    if _native.loaded_path() is None and _compiler() is None:
        pytest.skip("no C++ compiler (c++/g++/clang++) found: cannot build the native CPU backend")
    t0 = time.time()
    ok = _native.available()
    print(f"\nnative CPU backend available in {time.time() - t0:.1f} s: {_native.loaded_path()}")
    assert ok, f"a C++ compiler is here, yet the native backend did not build: {_native.why_unavailable()}"
    return torch.ops.latentfast_native


def _fp64_stats(L, ids, inv_t):
    z = L.double() * inv_t
    logp = torch.log_softmax(z, -1)
    ent = -(logp.exp() * torch.where(torch.isinf(logp), 0.0, logp)).sum(-1)
    return torch.logsumexp(z, -1), logp.gather(1, ids[:, None]).squeeze(1), ent


def _case(R, V, dtype, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    L = (torch.randn(R, V, generator=g) * scale).to(dtype)
    ids = torch.randint(0, V, (R,), generator=g)
    return L, ids, torch.randn(R, generator=g)


@pytest.mark.parametrize("V", [1, 300, 5000])
@pytest.mark.parametrize("inv_t", [1.0, 1 / 0.7])
def test_fp32_matches_torch(native, V, inv_t):
    L, ids, g = _case(7, V, torch.float32)
    want = G._torch_logit_stats(L, ids, inv_t)
    got = native.logit_stats(L, ids, inv_t)
    for name, w, o in zip(("lse", "logp", "entropy"), want, got):
        assert o.dtype == torch.float32 and o.shape == (7,)
        torch.testing.assert_close(o, w, atol=1e-5, rtol=1e-5, msg=lambda s: f"{name}: {s}")
    for name, w, o in zip(("lse", "logp", "entropy"), _fp64_stats(L, ids, inv_t), got):
        torch.testing.assert_close(o.double(), w, atol=1e-5, rtol=1e-6, msg=lambda s: f"{name} vs fp64: {s}")
    Lw, Lo = L.clone(), L.clone()
    want_g = G._torch_logit_grad_(Lw, ids, want[0], g, inv_t)
    out = native.logit_grad_(Lo, ids, want[0], g, inv_t)
    assert out.data_ptr() == Lo.data_ptr()  # in place
    torch.testing.assert_close(Lo, want_g, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(Lo.sum(1), torch.zeros(7), atol=1e-5, rtol=0)  # g/T (onehot - p) sums to 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs(native, dtype):
    L, ids, g = _case(5, 1000, dtype, scale=2.0)
    want = G._torch_logit_stats(L, ids, 1 / 0.7)
    got = native.logit_stats(L, ids, 1 / 0.7)
    for name, w, o in zip(("lse", "logp", "entropy"), want, got):
        assert o.dtype == torch.float32
        torch.testing.assert_close(o, w, atol=2e-5, rtol=1e-5, msg=lambda s: f"{name}: {s}")
    Lw, Lo = L.clone(), L.clone()
    G._torch_logit_grad_(Lw, ids, want[0], g, 1 / 0.7)
    native.logit_grad_(Lo, ids, want[0], g, 1 / 0.7)
    assert Lo.dtype == dtype
    # both round the same fp32 gradient to dtype: at most one ulp apart
    torch.testing.assert_close(Lo.float(), Lw.float(), atol=1e-6, rtol=1e-2)
    assert (Lo != Lw).float().mean() < 0.01


def test_huge_logits(native):
    L, ids, g = _case(6, 777, torch.float32, scale=1e4)
    L[0] = -1e4
    L[0, 5] = 1e4  # one dominant logit: p ~ onehot, entropy ~ 0
    for inv_t in (1.0, 1 / 0.7):
        got = native.logit_stats(L, ids, inv_t)
        assert all(torch.isfinite(t).all() for t in got)
        for name, w, o in zip(("lse", "logp", "entropy"), _fp64_stats(L, ids, inv_t), got):
            torch.testing.assert_close(o.double(), w, atol=1e-5, rtol=1e-6, msg=lambda s: f"{name}: {s}")
        want = G._torch_logit_stats(L, ids, inv_t)
        torch.testing.assert_close(got[0], want[0], atol=0, rtol=1e-6)
        Lw, Lo = L.clone(), L.clone()
        G._torch_logit_grad_(Lw, ids, got[0], g, inv_t)
        native.logit_grad_(Lo, ids, got[0], g, inv_t)
        assert torch.isfinite(Lo).all()
        torch.testing.assert_close(Lo, Lw, atol=1e-6, rtol=1e-5)


def test_masked_vocab_and_row_stride(native):
    """-inf logits (a masked vocabulary) add nothing; rows may be a slice of a wider buffer."""
    buf, ids, g = _case(4, 260, torch.float32)
    L = buf[:, :250]  # row stride 260
    ids = ids % 200
    L[:, 200:] = float("-inf")
    got = native.logit_stats(L, ids, 1.0)
    want = _fp64_stats(L[:, :200].contiguous(), ids, 1.0)
    for name, w, o in zip(("lse", "logp", "entropy"), want, got):
        torch.testing.assert_close(o.double(), w, atol=1e-5, rtol=1e-6, msg=lambda s: f"{name}: {s}")
    before, finite = buf[:, 250:].clone(), L[:, :200].clone()
    native.logit_grad_(L, ids, got[0], g, 1.0)
    assert (L[:, 200:] == 0).all() and torch.equal(buf[:, 250:], before)  # the rest of the buffer untouched
    want_g = G._torch_logit_grad_(finite, ids, got[0], g, 1.0)
    torch.testing.assert_close(L[:, :200], want_g, atol=1e-6, rtol=1e-5)


def test_bad_input_is_a_clear_error(native):
    L, ids, g = _case(3, 50, torch.float32)
    lse = native.logit_stats(L, ids, 1.0)[0]
    cases = [
        (lambda: native.logit_stats(L[0], ids, 1.0), r"L \(logits\) must be 2-D"),
        (lambda: native.logit_stats(L.double(), ids, 1.0), r"L \(logits\) must be float32, bfloat16 or float16"),
        (lambda: native.logit_stats(L.t(), ids, 1.0), r"L \(logits\) must have unit stride"),
        (lambda: native.logit_stats(L, ids.int(), 1.0), r"ids must have dtype Long"),
        (lambda: native.logit_stats(L, ids[:2], 1.0), r"ids must have shape \(3,\)"),
        (lambda: native.logit_stats(L, ids + 50, 1.0), r"ids must lie in \[0, 50\)"),
        (lambda: native.logit_grad_(L.clone(), ids, lse[:2], g, 1.0), r"lse must have shape \(3,\)"),
        (lambda: native.logit_grad_(L.clone(), ids, lse, g.double(), 1.0), r"g must have dtype Float"),
    ]
    for fn, msg in cases:
        with pytest.raises(RuntimeError, match=msg):
            fn()


@pytest.fixture
def native_dispatch(native, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.delenv("LATENTFAST_NATIVE", raising=False)
    return native


def test_dispatch_picks_native_and_switch(native_dispatch, monkeypatch):
    x = torch.zeros(2)
    assert G._backends(x) == (native_dispatch.logit_stats, native_dispatch.logit_grad_)
    monkeypatch.setenv("LATENTFAST_NATIVE", "0")
    assert G._backends(x) == (G._torch_logit_stats, G._torch_logit_grad_)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("LATENTFAST_NATIVE", "1")
    if G.use_triton(x):  # the interpreter still wins over native
        assert G._backends(x)[0] is not native_dispatch.logit_stats


@pytest.mark.parametrize("bias", [False, True])
def test_fused_loss_end_to_end(native_dispatch, monkeypatch, bias):
    B, T, H, V = 3, 6, 24, 300
    x = torch.randn(B, T, H)
    W = torch.randn(V, H) * 0.3
    b = torch.randn(V) * 0.1 if bias else None
    ids = torch.randint(0, V, (B, T))
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, 4:] = 0
    mask[2, :] = 0
    adv = torch.randn(B)
    with torch.no_grad():
        lp, _ = ref.logps_and_entropy((x @ W.t() + (b if bias else 0)) / 0.7, ids)
    old, refp = lp + 0.3 * torch.randn_like(lp), lp + 0.2 * torch.randn_like(lp)
    kw = dict(beta=0.1, epsilon_low=0.2, epsilon_high=0.28, temperature=0.7, loss_type="dapo")

    calls = []
    real = native_dispatch.logit_grad_
    monkeypatch.setattr(E, "_backends", lambda t: (native_dispatch.logit_stats,
                                                   lambda *a: calls.append(1) or real(*a)))

    def run(fn, **extra):
        xx, WW = x.clone().requires_grad_(), W.clone().requires_grad_()
        bb = b.clone().requires_grad_() if bias else None
        loss, metrics = fn(xx, WW, ids, mask, adv, bb, refp, old, **kw, **extra)
        loss.backward()
        return [loss, xx.grad, WW.grad] + ([bb.grad] if bias else []), metrics

    want, wm = run(ref.grpo_loss)
    got, gm = run(G.fused_linear_grpo_loss, chunk_size=1)
    assert len(calls) == 2  # two sequences with completion tokens, one chunk each, on the native path
    for name, w, o in zip(("loss", "grad_x", "grad_W", "grad_b"), want, got):
        torch.testing.assert_close(o, w, atol=2e-5, rtol=1e-4, msg=lambda s: f"{name}: {s}")
    for k in ("kl", "entropy", "ratio_mean"):
        torch.testing.assert_close(getattr(gm, k), wm[k] if isinstance(wm, dict) else getattr(wm, k),
                                   atol=1e-5, rtol=1e-5)


def test_lm_head_logps_native(native_dispatch):
    x, W = torch.randn(2, 5, 16), torch.randn(400, 16)
    ids = torch.randint(0, 400, (2, 5))
    got = G.lm_head_logps(x, W, ids, temperature=0.7)
    want = ref.logps_and_entropy((x @ W.t()) / 0.7, ids)
    for w, o in zip(want, got):
        torch.testing.assert_close(o, w, atol=1e-5, rtol=1e-5)


def test_user_lib_that_fails_to_load_raises(tmp_path):
    bogus = tmp_path / "liblatentfast_native.so"
    bogus.write_text("not a shared library")
    code = "from latentfast.ops import _native; _native.available()"
    env = {**os.environ, "LATENTFAST_NATIVE_LIB": str(bogus)}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode != 0
    assert "could not load the latentfast native library" in r.stderr and str(bogus) in r.stderr
    env["LATENTFAST_NATIVE_LIB"] = str(tmp_path / "missing.so")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode != 0 and "latentfast native library not found" in r.stderr


def test_build_failure_falls_back_with_one_log_line(tmp_path):
    """No usable compiler: available() is False with one warning line, nothing raises, and
    the op still runs (torch path). LATENTFAST_NATIVE_BUILD=0 skips the build silently."""
    code = ("import torch; from latentfast.ops import _native, grpo_loss; print(_native.available()); "
            "print(_native.why_unavailable())")
    env = {**os.environ, "CXX": "/bin/false", "LATENTFAST_CACHE": str(tmp_path / "cache"), "TRITON_INTERPRET": "0"}
    env.pop("LATENTFAST_NATIVE_LIB", None)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == "False"
    lines = [ln for ln in r.stderr.splitlines() if "native CPU backend unavailable" in ln]
    assert len(lines) == 1 and "torch path runs instead" in lines[0], r.stderr
    env["LATENTFAST_NATIVE_BUILD"] = "0"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.split() == ["False", "LATENTFAST_NATIVE_BUILD=0"], (r.stdout, r.stderr)
    assert "unavailable" not in r.stderr


def test_stale_build_lock_is_removed_fresh_one_kept(tmp_path):
    lock = tmp_path / "lock"
    lock.write_text("")
    _native._clear_stale_lock(tmp_path)
    assert lock.exists()  # a build may be running: wait for it
    old = time.time() - _native.STALE_LOCK_S - 5
    os.utime(lock, (old, old))
    _native._clear_stale_lock(tmp_path)
    assert not lock.exists()


def test_sources_ship_with_the_package():
    """The build reads the C++ from the installed package (latentfast/kernels/csrc)."""
    names = {os.path.basename(p) for p in _native.sources()}
    assert {"grpo_loss.cpp", "thinking_residual.cpp"} <= names


# ------------------------------------------------------------------ thinking residual epilogues


@pytest.fixture
def tr_native(native_dispatch, monkeypatch):
    """Dispatch of thinking_residual() on CPU; counts the native epilogue calls, failing if
    _epilogues picks anything but the native ops."""
    calls = {"fwd": 0, "bwd": 0}
    real = TR._epilogues

    def counted(fn, key):
        def call(*args, **kw):
            calls[key] += 1
            return fn(*args, **kw)
        return call

    def spy(e):
        fwd, bwd = real(e)
        assert fwd == native_dispatch.thinking_residual_fwd_epilogue
        assert bwd == native_dispatch.thinking_residual_bwd_epilogue
        return counted(fwd, "fwd"), counted(bwd, "bwd")

    monkeypatch.setattr(TR, "_epilogues", spy)
    return calls


def _tr(recompute_gates):
    return lambda *ts: TR.thinking_residual(*ts, recompute_gates=recompute_gates)


@pytest.mark.parametrize("recompute_gates", [False, True])
@pytest.mark.parametrize("projection", [True, False])
@pytest.mark.parametrize("D", [1, 96, 200])
@pytest.mark.parametrize("N", [1, 7, 300])
def test_thinking_residual_native_fp32(tr_native, N, D, projection, recompute_gates):
    tensors = make_inputs(N, D, projection)
    out, _ = TR.thinking_residual(*tensors)
    assert "latentfast_thinking_residual" in type(out.grad_fn).__name__  # the custom op, not the recipe
    tr_native["fwd"] = 0
    assert_matches(tensors, op=_tr(recompute_gates))  # values and all eight (seven without W_p) gradients
    assert tr_native == {"fwd": 1, "bwd": 1}


@pytest.mark.parametrize("recompute_gates", [False, True])
def test_thinking_residual_native_zero_row_and_retain_graph(tr_native, recompute_gates):
    tensors = make_inputs(5, 96)
    with torch.no_grad():
        tensors[1][2].zero_()  # |p| = 0: the norm's subgradient, as torch's
    out, a = _tr(recompute_gates)(*tensors)
    leaves = [t for t in tensors if t is not None]
    first = torch.autograd.grad(out.sum() + a.sum(), leaves, retain_graph=True)
    second = torch.autograd.grad(out.sum() + a.sum(), leaves)  # a saved z must survive the in-place dz
    assert all(torch.isfinite(g).all() for g in first)
    for g1, g2 in zip(first, second):
        torch.testing.assert_close(g2, g1, atol=0, rtol=0)
    assert_matches(tensors, op=_tr(recompute_gates))


@pytest.mark.parametrize("lam", [lambda D: torch.full((D,), -30.0), lambda D: torch.full((D,), 30.0),
                                 lambda D: torch.linspace(-40, 40, D)], ids=["very-neg", "very-pos", "sweep"])
def test_thinking_residual_native_extreme_lambda(tr_native, lam):
    """Lambda < -20: softplus's linear branch; Lambda >> 0: a -> 1, g -> 1e-4 amplifies d/da
    1e4x, so against a float64 reference with the fp32 rounding that implies."""
    tensors = make_inputs(7, 64, lam=lam)
    ref64 = [None if t is None else t.detach().double().requires_grad_(True) for t in tensors]
    assert_matches(tensors, atol=1e-3, rtol=1e-3, ref_tensors=ref64)
    assert tr_native["bwd"] == 1


@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 3e-2), (torch.float16, 5e-3)])
@pytest.mark.parametrize("projection", [True, False])
def test_thinking_residual_native_half_inputs(tr_native, dtype, tol, projection):
    """bf16/fp16 inputs vs the fp32 reference on the same (rounded) inputs: the epilogues
    compute in fp32, so the error is the rounding of the GEMM outputs, out and the gradients
    (measured: <= 1.5e-2 bf16, <= 1.4e-3 fp16; eager in bf16 is off by O(1) in dW here)."""
    tensors = make_inputs(300, 200, projection, dtype=dtype)
    ref32 = [None if t is None else t.detach().float().requires_grad_(True) for t in tensors]
    assert_matches(tensors, atol=tol, rtol=tol, ref_tensors=ref32)
    assert tr_native == {"fwd": 1, "bwd": 1}


@pytest.mark.parametrize("projection", [True, False])
def test_thinking_residual_native_saved_activations(tr_native, projection):
    """The native path keeps what the kernel path does: z (2 N x D) or, recomputing the
    gates, nothing; eager keeps ~6 N x D (4 without the projection)."""
    from latentfast.profiling import saved_activation_bytes

    N, D = 300, 200
    tensors = make_inputs(N, D, projection)
    _, eager = saved_activation_bytes(lambda: tr_reference(*tensors), tensors)
    _, fused = saved_activation_bytes(lambda: TR.thinking_residual(*tensors), tensors)
    _, lean = saved_activation_bytes(lambda: TR.thinking_residual(*tensors, recompute_gates=True), tensors)
    assert tr_native["fwd"] == 2
    assert fused == 2 * N * D * 4
    assert fused <= eager / (3 if projection else 2)
    assert lean == 0


def test_thinking_residual_native_torch_compile(tr_native):
    from latentfast.nn import ThinkingResidual

    m = ThinkingResidual(64)
    e, h = torch.randn(5, 64, requires_grad=True), torch.randn(5, 64)
    out, a = torch.compile(m, fullgraph=True)(e, h)  # the custom op in the graph, no break
    assert tr_native["fwd"] == 1
    ref_out, _ = tr_reference(e, h, m.thinking_projection.weight, m.thinking_residual_gate_r.weight,
                              m.thinking_residual_gate_r.bias, m.thinking_residual_gate_i.weight,
                              m.thinking_residual_gate_i.bias, m.thinking_residual_Lambda.Lambda)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    (out.sum() + a.mean()).backward()
    assert tr_native["bwd"] == 1 and e.grad is not None


def test_thinking_residual_native_switch_and_float64(native_dispatch, monkeypatch):
    tensors = make_inputs(7, 32)
    assert TR._fused(tensors[0])
    monkeypatch.setenv("LATENTFAST_NATIVE", "0")  # switched off: the reference with plain autograd
    out, _ = TR.thinking_residual(*tensors)
    assert "latentfast" not in type(out.grad_fn).__name__
    monkeypatch.delenv("LATENTFAST_NATIVE")
    t64 = make_inputs(7, 32, dtype=torch.float64)  # fp64 always takes the reference
    out, _ = TR.thinking_residual(*t64)
    assert out.dtype == torch.float64 and "latentfast" not in type(out.grad_fn).__name__
    with pytest.raises(RuntimeError, match="not float64"):
        TR._epilogues(t64[0])


def _epilogue_args(N, D, dtype=torch.float32):
    g = torch.Generator().manual_seed(N + D)
    e, p, go, ga = (torch.randn(N, D, generator=g).to(dtype) for _ in range(4))
    z = torch.randn(N, 2 * D, generator=g).to(dtype)
    return e, p, z, torch.linspace(-3, 6, D), go, ga


def test_thinking_residual_epilogue_in_place_and_determinism(native):
    e, p, z, lam, go, ga = _epilogue_args(333, 70)
    bwd = native.thinking_residual_bwd_epilogue
    want = bwd(e, p, z, lam, go, ga, 8.0, 1e-8, True, False, False)
    p2, z2 = p.clone(), z.clone()
    got = bwd(e, p2, z2, lam, go, ga, 8.0, 1e-8, True, True, True)
    assert got[1].data_ptr() == p2.data_ptr() and got[2].data_ptr() == z2.data_ptr()  # written over p / z
    for w, o in zip(want, got):
        assert torch.equal(w, o)
    threads = torch.get_num_threads()
    try:  # column sums over fixed row chunks: bitwise the same for any thread count
        torch.set_num_threads(1)
        one = bwd(e, p, z, lam, go, ga, 8.0, 1e-8, True, False, False)
    finally:
        torch.set_num_threads(threads)
    for w, o in zip(want, one):
        assert torch.equal(w, o)
    empty = bwd(e[:0], p[:0], z[:0], lam, go[:0], None, 8.0, 1e-8, True, False, False)
    assert [t.shape for t in empty] == [(0, 70), (0, 70), (0, 140), (70,), (70,), (70,)]
    assert all((t == 0).all() for t in empty[3:])


def test_thinking_residual_epilogue_bad_input_is_a_clear_error(native):
    e, p, z, lam, go, ga = _epilogue_args(4, 8)
    fwd, bwd = native.thinking_residual_fwd_epilogue, native.thinking_residual_bwd_epilogue
    cases = [
        (lambda: fwd(e[0], p, z, lam, 8.0, 1e-8, True), r"e must be 2-D"),
        (lambda: fwd(e.double(), p, z, lam, 8.0, 1e-8, True), r"e must be float32, bfloat16 or float16"),
        (lambda: fwd(e, p.half(), z, lam, 8.0, 1e-8, True), r"p must have e's dtype Float"),
        (lambda: fwd(e, p, z[:, :8], lam, 8.0, 1e-8, True), r"z must have shape \(4, 16\)"),
        (lambda: fwd(e, p.t().contiguous().t(), z, lam, 8.0, 1e-8, True), r"p must be contiguous"),
        (lambda: fwd(e, p, z, lam[:3], 8.0, 1e-8, True), r"Lambda must have shape \(8,\)"),
        (lambda: bwd(e, p, z, lam, go[:2], ga, 8.0, 1e-8, True, False, False), r"grad_out must have shape \(4, 8\)"),
        (lambda: bwd(e, p, z, lam, go, ga.bfloat16(), 8.0, 1e-8, True, False, False), r"grad_a must have e's dtype"),
    ]
    for fn, msg in cases:
        with pytest.raises(RuntimeError, match=msg):
            fn()
