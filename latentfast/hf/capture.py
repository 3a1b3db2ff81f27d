"""Record a Hugging Face decoder's per-layer q / k / v (and attention inputs) during its normal forward.

    cap = AttentionCapture(model, layers=[1, 3], query_layers=[3])
    with cap:
        out = model(input_ids, attention_mask=mask)      # SDPA / flash: no attention matrix
    k, v = cap.kv(3)          # (B, H_kv, T, d): post-RoPE keys and values, i.e. the KV cache
    q, k = cap.qk(3)          # (B, H, T, d) post-RoPE queries, for attention_token_importance
    h = cap.inputs(3)         # (B, T, D) the attention block's input (with ``inputs=True``)

    with QKCapture(model, layers=[-1]) as cap:           # detached (q, k) by layer, hooks only inside
        model(input_ids, attention_mask=mask)
    q, k = cap.qk[-1]

Forward hooks on each attention module's ``k_proj``/``v_proj``/``q_proj`` (or
``k_norm``/``q_norm`` when the model has them, as Qwen3 does) catch the projections;
a hook on the attention module itself picks up the ``position_embeddings`` (cos, sin)
the decoder passes in and rotates q/k with the model's own ``apply_rotary_pos_emb``.
So the keys are exactly what the model caches and q·k exactly what its attention
softmaxes, for Llama/Qwen2/Qwen3/Mistral-style models, without ``output_attentions``
(which forces eager attention and builds B×H×T×T per layer). Captured tensors keep
their autograd graph (the student's KV loss backpropagates through them) unless
``detach=True``. Layer indices may be negative (counted from the last block).
"""
from __future__ import annotations

import sys

import torch

from .adapter import decoder_layers


class AttentionCapture:
    def __init__(self, model, layers=(), query_layers=(), inputs: bool = False, detach: bool = False):
        self.model = model
        n = len(decoder_layers(model))

        def norm(i):
            i = int(i)
            if not -n <= i < n:
                raise ValueError(f"layer {i} out of range for {n} attention layers")
            return i % n

        self.query_layers = {norm(i) for i in query_layers}
        self.layers = sorted({norm(i) for i in layers} | self.query_layers)
        self._norm, self.keep_inputs, self.detach = norm, inputs, detach
        self._raw, self._out, self._in, self._handles = {}, {}, {}, []
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
            if self.detach:
                q, k, v, hs = (t.detach() if t is not None else None for t in (q, k, v, hs))
            self._out[layer] = (q, k, v)
            if self.keep_inputs:
                self._in[layer] = hs
            self.on_layer(layer, q, k, v)
        return hook

    def on_layer(self, layer: int, q, k, v) -> None:
        """Called after each captured layer's forward (subclasses collect here)."""

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
        return False

    # -- results ------------------------------------------------------------------
    def clear(self):
        self._raw.clear()
        self._out.clear()
        self._in.clear()

    def kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        _, k, v = self._out[self._norm(layer)]
        return k, v

    def qk(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        q, k, _ = self._out[self._norm(layer)]
        if q is None:
            raise KeyError(f"layer {layer} was not in query_layers")
        return q, k

    def inputs(self, layer: int) -> torch.Tensor:
        if not self.keep_inputs:
            raise KeyError("attention inputs were not captured: pass inputs=True")
        return self._in[self._norm(layer)]


class KVCapture(AttentionCapture):
    """K/V of ``layers`` and Q of ``query_layers``, with their graph; hooks stay attached
    (``remove()`` detaches them), recording only inside ``with``."""

    def __init__(self, model, layers, query_layers=()):
        super().__init__(model, layers, query_layers)


class QKCapture(AttentionCapture):
    """Detached post-RoPE (q, k) of ``layers``, in the dict ``qk`` keyed by the given
    (possibly negative) index; hooks exist only inside ``with``."""

    def __init__(self, model, layers=(-1,)):
        layers = [int(i) for i in (layers if isinstance(layers, (list, tuple)) else [layers])]
        super().__init__(model, query_layers=layers, detach=True)
        self._keys = {}
        for i in layers:
            self._keys.setdefault(self._norm(i), []).append(i)
        self.qk: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def on_layer(self, layer, q, k, v):
        for key in self._keys[layer]:
            self.qk[key] = (q, k)

    def __enter__(self):
        self.qk.clear()
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        self.remove()
        return False


__all__ = ["AttentionCapture", "KVCapture", "QKCapture"]
