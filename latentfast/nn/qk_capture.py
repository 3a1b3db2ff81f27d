"""Grab post-RoPE queries and keys of chosen layers during a normal forward.

    with QKCapture(model, layers=[-1]) as cap:
        out = model(input_ids, attention_mask=mask)
    q, k = cap.qk[-1]                      # (B, H, T, d), (B, H_kv, T, d), detached
    imp = attention_token_importance(q, k, attention_mask=mask)

This replaces ``output_attentions=True`` (which forces eager attention and builds
(B, H, T, T) per layer): the model keeps its sdpa / flash attention, and a forward
pre-hook recomputes q and k of the selected layers from the layer input (two small
projections, no grad). Works for HF Llama-style attention (q_proj, k_proj, head_dim,
``position_embeddings`` kwarg; optional q_norm / k_norm as in Qwen3).
"""
from __future__ import annotations

import sys

import torch
from torch import nn


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The self-attention modules of ``model`` in layer order."""
    mods = [m for m in model.modules() if hasattr(m, "q_proj") and hasattr(m, "k_proj") and hasattr(m, "head_dim")]
    return sorted(mods, key=lambda m: getattr(m, "layer_idx", 0))


class QKCapture:
    def __init__(self, model: nn.Module, layers=(-1,)):
        self.attn = attention_modules(model)
        if not self.attn:
            raise ValueError("no attention module with q_proj / k_proj / head_dim found in model")
        n = len(self.attn)
        self.layers = [int(i) for i in (layers if isinstance(layers, (list, tuple)) else [layers])]
        for i in self.layers:
            if not -n <= i < n:
                raise ValueError(f"layer {i} out of range for {n} attention layers")
        self.qk: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._handles = []

    def _hook(self, key: int, attn: nn.Module):
        rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb

        def hook(module, args, kwargs):
            h = kwargs.get("hidden_states", args[0] if args else None)
            cos, sin = kwargs["position_embeddings"]
            with torch.no_grad():
                shape = (*h.shape[:-1], -1, module.head_dim)
                q = module.q_proj(h).view(shape)
                k = module.k_proj(h).view(shape)
                if hasattr(module, "q_norm"):
                    q, k = module.q_norm(q), module.k_norm(k)
                q, k = rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
            self.qk[key] = (q, k)

        return hook

    def __enter__(self):
        self.qk.clear()
        for i in self.layers:
            attn = self.attn[i]
            self._handles.append(attn.register_forward_pre_hook(self._hook(i, attn), with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        return False
