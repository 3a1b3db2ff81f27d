"""Record a Hugging Face decoder's per-layer K/V (and Q) while it runs its normal attention.

    cap = KVCapture(model, layers=[1, 3], query_layers=[3])
    with cap:
        out = model(input_ids, attention_mask=mask)      # SDPA / flash: no attention matrix
    k, v = cap.kv(3)          # (B, H_kv, T, d): post-RoPE keys and values, i.e. the KV cache
    q, k = cap.qk(3)          # (B, H, T, d) post-RoPE queries, for attention_token_importance

Forward hooks on each attention module's ``k_proj``/``v_proj``/``q_proj`` (or
``k_norm``/``q_norm`` when the model has them, as Qwen3 does) catch the projections;
a hook on the attention module itself picks up the ``position_embeddings`` (cos, sin)
the decoder passes in and rotates q/k with the model's own ``apply_rotary_pos_emb``.
So the keys are exactly what the model caches and q·k exactly what its attention
softmaxes, for Llama/Qwen2/Qwen3/Mistral-style models, without ``output_attentions``
(which forces eager attention and builds B×H×T×T per layer). Captured tensors keep
their autograd graph (the student's KV loss backpropagates through them).
"""
from __future__ import annotations

import sys

import torch


def decoder_layers(model):
    """The list of decoder blocks of a causal LM (PEFT-wrapped or not)."""
    m = model.get_base_model() if hasattr(model, "get_base_model") else model
    base = getattr(m, "model", m)
    if not hasattr(base, "layers"):
        raise TypeError(f"{type(m).__name__}: no .model.layers (expected a Llama/Qwen-style decoder)")
    return base.layers


class KVCapture:
    def __init__(self, model, layers, query_layers=()):
        self.layers = sorted(set(int(i) for i in layers) | set(int(i) for i in query_layers))
        self.query_layers = set(int(i) for i in query_layers)
        self.model = model
        self._raw, self._out, self._handles = {}, {}, []
        self.enabled = False

    # -- hooks ------------------------------------------------------------------
    def _save(self, layer, name):
        def hook(mod, args, output):
            if self.enabled:
                self._raw[(layer, name)] = output
        return hook

    def _finish(self, layer, attn):
        rope = getattr(sys.modules[type(attn).__module__], "apply_rotary_pos_emb", None)

        def hook(mod, args, kwargs, output):
            if not self.enabled:
                return
            hs = kwargs.get("hidden_states", args[0] if args else None)
            B, T = hs.shape[:2]
            d = attn.head_dim
            k = self._raw.pop((layer, "k")).reshape(B, T, -1, d).transpose(1, 2)
            v = self._raw.pop((layer, "v")).reshape(B, T, -1, d).transpose(1, 2)
            q = self._raw.pop((layer, "q"), None)
            q = q.reshape(B, T, -1, d).transpose(1, 2) if q is not None else None
            pe = kwargs.get("position_embeddings")
            if pe is not None and rope is not None:
                cos, sin = pe
                q, k = rope(q if q is not None else k, k, cos, sin)
                if layer not in self.query_layers:
                    q = None
            self._out[layer] = (q, k, v)
        return hook

    def attach(self):
        blocks = decoder_layers(self.model)
        for i in self.layers:
            attn = blocks[i].self_attn
            k_mod = getattr(attn, "k_norm", None) or attn.k_proj
            self._handles.append(k_mod.register_forward_hook(self._save(i, "k")))
            self._handles.append(attn.v_proj.register_forward_hook(self._save(i, "v")))
            if i in self.query_layers:
                q_mod = getattr(attn, "q_norm", None) or attn.q_proj
                self._handles.append(q_mod.register_forward_hook(self._save(i, "q")))
            self._handles.append(attn.register_forward_hook(self._finish(i, attn), with_kwargs=True))
        return self

    def remove(self):
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self):
        if not self._handles:
            self.attach()
        self.clear()
        self.enabled = True
        return self

    def __exit__(self, *exc):
        self.enabled = False
        self._raw.clear()

    # -- results ------------------------------------------------------------------
    def clear(self):
        self._raw.clear()
        self._out.clear()

    def kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        _, k, v = self._out[layer]
        return k, v

    def qk(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        q, k, _ = self._out[layer]
        if q is None:
            raise KeyError(f"layer {layer} was not in query_layers")
        return q, k
