"""KV adapters across hidden sizes and GQA head counts, layer maps (relative depth and
explicit pairs) with their errors."""
import pytest
import torch

from latentfast.data import build_tokenizer
from latentfast.hf.capture import KVCapture
from latentfast.models import build_tiny_causal_lm
from latentfast.nn import KVProjection
from latentfast.nn.kv_adapter import MLPKVAdapter, kv_adapter, kv_adapters, kv_shape, layer_map
from latentfast.nn.layer_pairs import layer_pairs


@pytest.mark.parametrize("kind", ["linear", "mlp"])
@pytest.mark.parametrize("s,t", [((2, 16), (3, 32)), ((4, 8), (1, 64)), ((2, 16), (2, 16))])
def test_adapter_shapes_and_gradients(kind, s, t):
    a = kv_adapter(kind, *s, *t)
    k = torch.randn(2, s[0], 5, s[1], requires_grad=True)
    v = torch.randn(2, s[0], 5, s[1], requires_grad=True)
    ko, vo = a(k, v)
    assert ko.shape == vo.shape == (2, t[0], 5, t[1])
    (ko.square().sum() + vo.square().sum()).backward()
    assert k.grad.abs().sum() > 0 and all(p.grad is not None for p in a.parameters())
    if s == t:  # identity-initialised: starts as the identity map
        torch.testing.assert_close(ko, k)
        torch.testing.assert_close(vo, v)


def test_mlp_starts_as_linear_and_identity_checks_shapes():
    torch.manual_seed(0)
    m = MLPKVAdapter(2, 8, 3, 4)
    k, v = torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    for got, exp in zip(m(k, v), m.linear(k, v)):
        torch.testing.assert_close(got, exp)
    ident = kv_adapter("identity", 2, 8, 2, 8)
    assert ident(k, v) == (k, v) and not list(ident.parameters())
    with pytest.raises(ValueError, match="identity.*student .* = \\(2, 8\\).*teacher \\(3, 4\\)"):
        kv_adapter("identity", 2, 8, 3, 4)
    with pytest.raises(ValueError, match="must be one of"):
        kv_adapter("conv", 2, 8, 3, 4)
    assert isinstance(kv_adapter("linear", 2, 8, 3, 4), KVProjection)


def test_adapters_on_real_captured_caches():
    """Student and teacher of different widths / heads / GQA groups: each adapter maps the
    student's captured cache onto the paired teacher layer's shape."""
    s_lm = build_tiny_causal_lm(build_tokenizer(), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, intermediate_size=64)
    t_lm = build_tiny_causal_lm(build_tokenizer(), hidden_size=48, num_hidden_layers=5, num_attention_heads=6,
                                num_key_value_heads=3, intermediate_size=64)
    assert kv_shape(s_lm.config) == (2, 8) and kv_shape(t_lm.config) == (3, 8)
    pairs = layer_map(2, 5)
    assert pairs == layer_pairs(2, 5, "all") == [(0, 1), (1, 4)]
    ids = torch.randint(0, 64, (2, 7))
    with KVCapture(s_lm, [s for s, _ in pairs]) as cs:
        s_lm.model(input_ids=ids)
    with KVCapture(t_lm, [t for _, t in pairs]) as ct, torch.no_grad():
        t_lm.model(input_ids=ids)
    for kind in ("linear", "mlp"):
        for (s, t), a in zip(pairs, kv_adapters(kind, pairs, s_lm.config, t_lm.config)):
            ko, vo = a(*cs.kv(s))
            assert ko.shape == ct.kv(t)[0].shape and vo.shape == ct.kv(t)[1].shape


def test_layer_map_explicit_and_errors():
    assert layer_map(4, 12, [[0, 2], [-1, -1]]) == [(0, 2), (3, 11)]
    assert layer_map(4, 8, "relative_depth", "last") == [(3, 7)]
    with pytest.raises(ValueError, match="student layer 4 out of range for 4"):
        layer_map(4, 12, [[4, 0]])
    with pytest.raises(ValueError, match="teacher layer 12 out of range for 12"):
        layer_map(4, 12, [[0, 12]])
    with pytest.raises(ValueError, match="two ints"):
        layer_map(4, 12, [[0, 1, 2]])
    with pytest.raises(ValueError, match="relative_depth"):
        layer_map(4, 12, "depth")
