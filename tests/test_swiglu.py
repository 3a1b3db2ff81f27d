"""ops.swiglu_mlp (two saved intermediates, routing weight folded in) vs the plain MLP."""
import pytest
import torch

from latentfast.ops import swiglu_mlp
from latentfast.reference.swiglu import swiglu_mlp as swiglu_ref


def _inputs(shape, H=24, inter=40, scaled=True, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, H, generator=g, dtype=dtype)
    ws = [torch.randn(inter, H, generator=g, dtype=dtype) * 0.3, torch.randn(inter, H, generator=g, dtype=dtype) * 0.3,
          torch.randn(H, inter, generator=g, dtype=dtype) * 0.3]
    s = torch.rand(*shape, generator=g, dtype=dtype) if scaled else None
    return [t.requires_grad_() if t is not None else None for t in (x, *ws, s)]


@pytest.mark.parametrize("shape,scaled", [((7,), True), ((2, 5), False), ((1,), True), ((33,), False)])
def test_values_and_grads_match_reference(shape, scaled):
    args = _inputs(shape, scaled=scaled)
    dy = torch.randn(*shape, 24)
    outs = []
    for fn in (swiglu_mlp, swiglu_ref):
        for t in args:
            if t is not None:
                t.grad = None
        y = fn(*args)
        (y * dy).sum().backward()
        outs.append([y.detach()] + [t.grad.clone() for t in args if t is not None])
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_extreme_inputs_stay_finite():
    x, wg, wu, wd, s = _inputs((6,))
    with torch.no_grad():
        x.mul_(50)
    y = swiglu_mlp(x, wg, wu, wd, s)
    y.sum().backward()
    assert torch.isfinite(y).all() and all(torch.isfinite(t.grad).all() for t in (x, wg, wu, wd, s))
    yr = swiglu_ref(x, wg, wu, wd, s)
    torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-3)


def test_bf16_autocast_grads_in_param_dtype():
    x, wg, wu, wd, s = _inputs((9,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = swiglu_mlp(x, wg, wu, wd, s)
        yr = swiglu_ref(x, wg, wu, wd, s)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), yr.float(), rtol=2e-2, atol=2e-2)
    y.float().sum().backward()
    assert wg.grad.dtype == torch.float32 and x.grad.dtype == torch.float32 and s.grad.dtype == torch.float32


def test_bad_shapes_name_the_argument():
    x, wg, wu, wd, s = _inputs((4,))
    with pytest.raises(ValueError, match="w_down"):
        swiglu_mlp(x, wg, wu, wd.t(), s)
    with pytest.raises(ValueError, match="row_scale"):
        swiglu_mlp(x, wg, wu, wd, s[:2])


def test_saves_fewer_bytes_than_autograd():
    from latentfast.profiling import saved_activation_bytes

    x, wg, wu, wd, s = _inputs((64,), H=32, inter=128)
    ins = (x, wg, wu, wd, s)
    _, lean = saved_activation_bytes(lambda: swiglu_mlp(*ins), ins)
    _, plain = saved_activation_bytes(lambda: swiglu_ref(*ins), ins)
    assert lean == 2 * 64 * 128 * 4  # gate(x) and up(x) only
    assert plain >= 4 * 64 * 128 * 4
