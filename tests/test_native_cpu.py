"""Optional native CPU backend (kernels/csrc, CMakeLists.txt) vs the torch per-chunk functions.

A session fixture builds the library with CMake into a temporary folder (skipped only when
cmake or a C++ compiler is missing) and loads it through latentfast.ops._native. The suite
sets TRITON_INTERPRET=1 on CPU, so the ops are called directly, and the end-to-end checks
set TRITON_INTERPRET=0 so that dispatch reaches the native path.
"""
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

from latentfast.ops import _native
from latentfast.ops import grpo_loss as G
from latentfast.reference import grpo_loss as ref

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _compiler():
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


@pytest.fixture(scope="session")
def native(tmp_path_factory):
    """torch.ops.latentfast_native, built from this checkout."""
    if _native.loaded_path() is None:
        if shutil.which("cmake") is None:
            pytest.skip("cmake not found: cannot build the native CPU backend")
        if _compiler() is None:
            pytest.skip("no C++ compiler (c++/g++/clang++) found: cannot build the native CPU backend")
        build = tmp_path_factory.mktemp("native_build")
        gen = ["-G", "Ninja"] if shutil.which("ninja") else []
        cfg = ["cmake", "-S", ROOT, "-B", str(build), *gen, "-DCMAKE_BUILD_TYPE=Release",
               f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}", f"-DLATENTFAST_NATIVE_DIR={build / 'lib'}"]
        t0 = time.time()
        for cmd in (cfg, ["cmake", "--build", str(build)]):
            r = subprocess.run(cmd, capture_output=True, text=True)
            assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        print(f"\nnative CPU backend built in {time.time() - t0:.1f} s")
        libs = list((build / "lib").glob("*latentfast_native*"))
        assert len(libs) == 1, libs
        _native.load(libs[0])
    assert _native.available()
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
    monkeypatch.setattr(G, "_backends", lambda t: (native_dispatch.logit_stats,
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
