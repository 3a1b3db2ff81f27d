"""Map a student's KV cache to a teacher's when their sizes differ, and which layers pair up.

    pairs = layer_map(student_cfg.num_hidden_layers, teacher_cfg.num_hidden_layers)  # relative depth
    pairs = layer_map(4, 12, [[0, 2], [3, 11]])                                          # explicit
    adapters = [kv_adapter("mlp", *kv_shape(student_cfg), *kv_shape(teacher_cfg)) for _ in pairs]
    k_t_like, v_t_like = adapters[i](k_s, v_s)        # (B, Hs, T, ds) -> (B, Ht, T, dt)

Adapters (one per layer pair, trained with the student), all over the concatenated KV
heads so GQA head counts may differ freely (Hs*ds -> Ht*dt):

    identity  no parameters; the shapes must already agree
    linear    ``KVProjection``: one linear map for K, one for V (identity-initialised when
              the shapes agree), today's single-teacher adapter
    mlp       Linear -> GELU -> Linear for K and for V (C2C-style projector, arXiv 2510.03215),
              plus the linear map as a skip path, so it starts as good as ``linear``
"""
from __future__ import annotations

from typing import Sequence

from torch import nn

from latentfast.choices import KV_ADAPTERS as ADAPTERS  # torch-free: teachers.yaml's choices
from latentfast.nn.kv_loss import KVProjection
from latentfast.nn.layer_pairs import layer_pairs



def kv_shape(config) -> tuple[int, int]:
    """(num_key_value_heads, head_dim) of a Hugging Face decoder config."""
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    d = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return int(heads), int(d)


class IdentityKVAdapter(nn.Module):
    def __init__(self, student_heads, student_head_dim, teacher_heads, teacher_head_dim):
        super().__init__()
        if (student_heads, student_head_dim) != (teacher_heads, teacher_head_dim):
            raise ValueError(f"kv_adapter 'identity' needs equal KV shapes, got student (kv heads, head dim) = "
                             f"({student_heads}, {student_head_dim}) and teacher ({teacher_heads}, "
                             f"{teacher_head_dim}); use kv_adapter 'linear' or 'mlp'")

    def forward(self, k, v):
        return k, v


class MLPKVAdapter(nn.Module):
    """``linear(x) + mlp(x)`` for K and V over the concatenated heads; the MLP's output
    layer starts at zero, so the adapter starts as the (identity-initialised) linear map."""

    def __init__(self, student_heads, student_head_dim, teacher_heads, teacher_head_dim, hidden: int | None = None):
        super().__init__()
        self.teacher_heads, self.teacher_head_dim = teacher_heads, teacher_head_dim
        d_in, d_out = student_heads * student_head_dim, teacher_heads * teacher_head_dim
        hidden = hidden or max(d_in, d_out)
        self.linear = KVProjection(student_heads, student_head_dim, teacher_heads, teacher_head_dim)
        self.k_mlp, self.v_mlp = (nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, d_out))
                                  for _ in range(2))
        for m in (self.k_mlp, self.v_mlp):
            nn.init.zeros_(m[-1].weight)
            nn.init.zeros_(m[-1].bias)

    def _mlp(self, net, x):
        B, H, T, d = x.shape
        y = net(x.transpose(1, 2).reshape(B, T, H * d).to(net[0].weight.dtype))
        return y.view(B, T, self.teacher_heads, self.teacher_head_dim).transpose(1, 2)

    def forward(self, k, v):
        lk, lv = self.linear(k, v)
        return lk + self._mlp(self.k_mlp, k), lv + self._mlp(self.v_mlp, v)


def kv_adapter(kind: str, student_heads: int, student_head_dim: int, teacher_heads: int, teacher_head_dim: int,
               hidden: int | None = None) -> nn.Module:
    """An adapter module ``(k, v) -> (k', v')`` of ``kind`` in ``ADAPTERS``."""
    if kind == "identity":
        return IdentityKVAdapter(student_heads, student_head_dim, teacher_heads, teacher_head_dim)
    if kind == "linear":
        return KVProjection(student_heads, student_head_dim, teacher_heads, teacher_head_dim)
    if kind == "mlp":
        return MLPKVAdapter(student_heads, student_head_dim, teacher_heads, teacher_head_dim, hidden)
    raise ValueError(f"kv_adapter must be one of {ADAPTERS}, got {kind!r}")


def layer_map(num_student_layers: int, num_teacher_layers: int, spec="relative_depth",
              student_layers="all") -> list[tuple[int, int]]:
    """[(student_block, teacher_block), ...]. ``spec='relative_depth'``: each of
    ``student_layers`` ('all' | 'middle' | 'last' | ints, as ``--kv_layers``) pairs with the
    teacher block at the same relative depth (``layer_pairs``); or an explicit list of
    ``[student, teacher]`` pairs (negative indices count from the end)."""
    if isinstance(spec, str):
        if spec != "relative_depth":
            raise ValueError(f"layer_map must be 'relative_depth' or a list of [student, teacher] pairs, got {spec!r}")
        return layer_pairs(num_student_layers, num_teacher_layers, student_layers)
    if not isinstance(spec, Sequence) or not spec:
        raise ValueError(f"layer_map must be 'relative_depth' or a non-empty list of [student, teacher] pairs, "
                         f"got {spec!r}")
    pairs = []
    for p in spec:
        if not isinstance(p, Sequence) or isinstance(p, str) or len(p) != 2 or \
                not all(isinstance(x, int) and not isinstance(x, bool) for x in p):
            raise ValueError(f"layer_map entry {p!r}: expected [student_layer, teacher_layer] (two ints)")
        s, t = p
        if not -num_student_layers <= s < num_student_layers:
            raise ValueError(f"layer_map entry {list(p)}: student layer {s} out of range for {num_student_layers} layers")
        if not -num_teacher_layers <= t < num_teacher_layers:
            raise ValueError(f"layer_map entry {list(p)}: teacher layer {t} out of range for {num_teacher_layers} layers")
        pairs.append((s % num_student_layers, t % num_teacher_layers))
    return pairs


def kv_adapters(kind: str, pairs, student_config, teacher_config, hidden: int | None = None) -> list[nn.Module]:
    """One adapter per layer pair, student config -> teacher config."""
    (sh, sd), (th, td) = kv_shape(student_config), kv_shape(teacher_config)
    return [kv_adapter(kind, sh, sd, th, td, hidden) for _ in pairs]


__all__ = ["ADAPTERS", "IdentityKVAdapter", "MLPKVAdapter", "kv_adapter", "kv_adapters", "kv_shape", "layer_map"]
