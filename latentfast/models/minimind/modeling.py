"""MiniMind as a Hugging Face causal LM (note-era code, MiniMind 2510 / a8455ca).

Parameter names are MiniMind's, so its ``.pth`` state dicts load as they are
(``model.layers.{i}.self_attn.q_proj.weight``, ``...mlp.experts.{j}.gate_proj.weight``,
``...mlp.gate.weight``, ``...mlp.shared_experts.{j}...``, ``model.norm.weight``,
``lm_head.weight`` tied to ``model.embed_tokens.weight``).

What changes from upstream and why:

* attention goes through Hugging Face's attention interface and causal-mask builder, so
  padding masks, ``position_ids``, ``inputs_embeds`` and every ``Cache`` (dynamic,
  static) work, and ``model.generate`` runs; ``flash_attn=True`` means SDPA (causal
  flag when no padding), ``flash_attn=False`` the plain softmax path;
* optional output gate per head (``headwise_attn_output_gate``) or per element
  (``elementwise_attn_output_gate``), laid out as the public fork that defined the
  flags: q_proj's output per KV group is ``[n_rep * D queries | n_rep * G gates]``,
  the gate taken from the raw projection (before RoPE) and applied as
  ``attn_out * sigmoid(gate)`` before ``o_proj``;
* MoE dispatch sorts tokens by expert (``moe.py``); the MoE aux loss is returned on the
  output as ``aux_loss`` (summed over layers, 0 for dense models and in eval mode) for
  the trainer to add, as MiniMind's trainers do;
* ``labels`` gives the shifted cross-entropy (ignore -100) as ``loss``; the aux loss is
  not folded into it (MiniMind's later code does the same).
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from latentfast.ops.swiglu import swiglu_mlp

from .configuration import MiniMindConfig
from .moe import MiniMindMoE, MiniMindMoEGate

try:  # transformers >= 5: initialisers that skip weights already loaded by from_pretrained
    from transformers import initialization as hf_init
except ImportError:  # pragma: no cover
    hf_init = nn.init

# transformers renamed the cache field ``past_key_values`` -> ``cache`` (5.2x); follow the installed one.
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
_MASK_PARAMS = set(inspect.signature(create_causal_mask).parameters)


@dataclass
class MiniMindModelOutput(BaseModelOutputWithPast):
    aux_loss: torch.FloatTensor | None = None


@dataclass
class MiniMindCausalLMOutput(CausalLMOutputWithPast):
    aux_loss: torch.FloatTensor | None = None


# ---------------------------------------------------------------------------- pieces
class MiniMindRMSNorm(nn.Module):
    """``weight * x / rms(x)``, normalised in fp32 and cast back (MiniMind's RMSNorm)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x)


def rope_tables(head_dim: int, end: int, theta: float, yarn: dict | None = None):
    """(cos, sin), each ``end x head_dim`` fp32: MiniMind's RoPE with optional YaRN, i.e.
    ``f_i' = f_i * ((1 - r_i) + r_i / factor)`` with ``r`` a linear ramp between the
    dimensions that complete ``beta_fast`` and ``beta_slow`` turns over the original
    context; both tables scaled by ``attention_factor``."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
    attn_factor = 1.0
    if yarn is not None:
        orig = yarn.get("original_max_position_embeddings", 2048)
        factor, attn_factor = yarn.get("factor", 16), yarn.get("attention_factor", 1.0)
        if end / orig > 1.0:
            def ramp_dim(turns):  # the dimension whose wavelength fits `turns` times into `orig`
                return head_dim * math.log(orig / (turns * 2 * math.pi)) / (2 * math.log(theta))

            low = max(math.floor(ramp_dim(yarn.get("beta_fast", 32.0))), 0)
            high = min(math.ceil(ramp_dim(yarn.get("beta_slow", 1.0))), head_dim // 2 - 1)
            ramp = ((torch.arange(head_dim // 2).float() - low) / max(high - low, 0.001)).clamp(0, 1)
            freqs = freqs * (1 - ramp + ramp / factor)
    angles = torch.outer(torch.arange(end).float(), freqs)
    cos = torch.cat([angles.cos(), angles.cos()], dim=-1) * attn_factor
    sin = torch.cat([angles.sin(), angles.sin()], dim=-1) * attn_factor
    return cos, sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x`` B x heads x T x D, ``cos``/``sin`` B x T x D."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + _rotate_half(x) * sin


def eager_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Plain softmax attention (MiniMind's ``flash_attn=False`` path) on Hugging Face's
    additive mask; returns (B x T x heads x D, weights)."""
    n_rep = module.num_key_value_groups
    key, value = key.repeat_interleave(n_rep, dim=1), value.repeat_interleave(n_rep, dim=1)
    scores = (query @ key.transpose(-2, -1)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask[..., : key.shape[-2]]
    probs = F.softmax(scores.float(), dim=-1).type_as(query)
    probs = F.dropout(probs, p=dropout, training=module.training)
    return (probs @ value).transpose(1, 2).contiguous(), probs


class MiniMindAttention(nn.Module):
    def __init__(self, config: MiniMindConfig, layer_idx: int):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_kv_heads  # read by HF's SDPA wrapper
        self.head_dim = config.head_dim
        self.scaling = self.head_dim ** -0.5
        self.is_causal = True
        self.gate = config.attn_gate
        self.gate_width = {"headwise": 1, "elementwise": self.head_dim, None: 0}[self.gate]
        q_out = self.num_heads * (self.head_dim + self.gate_width)
        self.q_proj = nn.Linear(config.hidden_size, q_out, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)
        self.attn_dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def _split_query(self, q: torch.Tensor):
        """q_proj output (B x T x out) -> queries B x T x H x D and gates B x T x H x G."""
        B, T, _ = q.shape
        if not self.gate:
            return q.view(B, T, self.num_heads, self.head_dim), None
        n_rep = self.num_key_value_groups
        q = q.view(B, T, self.num_kv_heads, n_rep * (self.head_dim + self.gate_width))
        q, gate = q.split([n_rep * self.head_dim, n_rep * self.gate_width], dim=-1)
        return (q.reshape(B, T, self.num_heads, self.head_dim),
                gate.reshape(B, T, self.num_heads, self.gate_width))

    def forward(self, x, position_embeddings, attention_mask=None, cache: Cache | None = None, **kwargs):
        B, T, _ = x.shape
        q, gate = self._split_query(self.q_proj(x))
        q = q.transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        impl = self.config._attn_implementation
        attend = eager_attention if impl in (None, "eager") else ALL_ATTENTION_FUNCTIONS[impl]
        out, _ = attend(self, q, k, v, attention_mask, dropout=self.attn_dropout if self.training else 0.0,
                        scaling=self.scaling)
        if gate is not None:  # B x T x H x D
            out = out * torch.sigmoid(gate)
        return self.resid_dropout(self.o_proj(out.reshape(B, T, -1)))


class MiniMindMLP(nn.Module):
    """SwiGLU: ``down(act(gate(x)) * up(x))``, times ``row_scale`` (MoE routing weights)
    when given. Plain Linears with SiLU and no dropout run ``ops.swiglu_mlp`` (same
    values, half the saved intermediates); anything else (PEFT-wrapped projections,
    another activation, dropout) runs the modules."""

    def __init__(self, config: MiniMindConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.dropout = nn.Dropout(config.dropout)
        self.hidden_act = config.hidden_act
        self.act_fn = ACT2FN[config.hidden_act]
        self.lean = True  # False: always the plain module path (comparisons)

    def _lean(self) -> bool:
        return (self.lean and self.hidden_act == "silu" and (self.dropout.p == 0 or not self.training)
                and type(self.gate_proj) is type(self.up_proj) is type(self.down_proj) is nn.Linear)

    def forward(self, x, row_scale=None):
        if self._lean():
            return swiglu_mlp(x, self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight, row_scale)
        y = self.dropout(self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x)))
        return y if row_scale is None else y * row_scale.unsqueeze(-1).to(y.dtype)


class MiniMindBlock(GradientCheckpointingLayer):
    """Pre-norm block; returns ``(hidden, aux_loss or None)``."""

    def __init__(self, layer_idx: int, config: MiniMindConfig):
        super().__init__()
        self.layer_id = layer_idx
        self.self_attn = MiniMindAttention(config, layer_idx)
        self.input_layernorm = MiniMindRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = MiniMindRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = MiniMindMoE(config, lambda: MiniMindMLP(config)) if config.use_moe else MiniMindMLP(config)

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
        h = hidden_states + self.self_attn(self.input_layernorm(hidden_states), position_embeddings,
                                           attention_mask=attention_mask, cache=cache)
        m = self.mlp(self.post_attention_layernorm(h))
        if isinstance(m, tuple):
            return h + m[0], m[1]
        return h + m, None


# ---------------------------------------------------------------------------- models
class MiniMindPreTrainedModel(PreTrainedModel):
    config_class = MiniMindConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MiniMindBlock"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = False  # MoE dispatch reads the expert counts on the host

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """Hugging Face's loader, after checking that the attention gate flags asked for
        (keyword overrides or ``config=``) match the saved model's (else its q_proj would
        not fit: an error naming the flag instead of a size-mismatch report)."""
        _check_gate_flags(pretrained_model_name_or_path, kwargs)
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    def _init_weights(self, module):
        # PyTorch's default initialisation, as MiniMind (which never calls HF's init).
        if isinstance(module, nn.Linear):
            hf_init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                hf_init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding) and not self.config.tie_word_embeddings:
            hf_init.normal_(module.weight, mean=0.0, std=1.0)
        elif isinstance(module, MiniMindRMSNorm):
            hf_init.ones_(module.weight)
        elif isinstance(module, MiniMindMoEGate):
            hf_init.kaiming_uniform_(module.weight, a=math.sqrt(5))
        elif isinstance(module, MiniMindModel):  # non-persistent RoPE tables (meta under from_pretrained)
            cos, sin = module.rope_tables()
            hf_init.copy_(module.freqs_cos, cos)
            hf_init.copy_(module.freqs_sin, sin)


GATE_FLAGS = ("headwise_attn_output_gate", "elementwise_attn_output_gate")


def _check_gate_flags(path, kwargs):
    import json
    import pathlib

    cfg_file = pathlib.Path(str(path)) / "config.json"
    if not cfg_file.is_file():
        return
    saved = json.loads(cfg_file.read_text())
    asked = kwargs.get("config")
    for flag in GATE_FLAGS:
        want = kwargs.get(flag, getattr(asked, flag, None) if asked is not None else None)
        have = bool(saved.get(flag, False))
        if want is not None and bool(want) != have:
            raise ValueError(f"{path} was saved with {flag}={int(have)} but {flag}={int(bool(want))} was asked for: "
                             f"the q_proj shapes differ; load it with {flag}={int(have)}")


def _as_cache(cache, past_key_values):
    cache = cache if cache is not None else past_key_values
    if cache is not None and not isinstance(cache, Cache):
        raise TypeError(f"past_key_values/cache must be a transformers Cache (DynamicCache, StaticCache, ...), "
                        f"got {type(cache).__name__}")
    return cache


class MiniMindModel(MiniMindPreTrainedModel):
    def __init__(self, config: MiniMindConfig):
        super().__init__(config)
        if not config.flash_attn:
            config._attn_implementation = "eager"
        self.vocab_size, self.num_hidden_layers = config.vocab_size, config.num_hidden_layers
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList([MiniMindBlock(i, config) for i in range(config.num_hidden_layers)])
        self.norm = MiniMindRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        cos, sin = self.rope_tables()
        self.register_buffer("freqs_cos", cos, persistent=False)
        self.register_buffer("freqs_sin", sin, persistent=False)
        self.post_init()

    def rope_tables(self):
        c = self.config
        return rope_tables(c.head_dim, c.max_position_embeddings, c.rope_theta, c.yarn_parameters)

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def _causal_mask(self, embeds, attention_mask, cache, position_ids):
        kw = dict(config=self.config, inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids)
        kw["cache" if "cache" in _MASK_PARAMS else "past_key_values"] = cache
        if "cache_position" in _MASK_PARAMS:  # older transformers
            past = cache.get_seq_length() if cache is not None else 0
            kw["cache_position"] = torch.arange(past, past + embeds.shape[1], device=embeds.device)
        return create_causal_mask(**kw)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                use_cache=None, output_hidden_states=None, past_key_values=None, return_dict=None,
                **kwargs) -> MiniMindModelOutput:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        cache = _as_cache(cache, past_key_values)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        output_hidden_states = (self.config.output_hidden_states if output_hidden_states is None
                                else output_hidden_states)
        embeds = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        T = embeds.shape[1]
        if position_ids is None:  # MiniMind: positions continue from the cache
            past = cache.get_seq_length() if cache is not None else 0
            position_ids = (torch.arange(T, device=embeds.device) + past).unsqueeze(0)
        if isinstance(attention_mask, dict):  # prepared by generate for a compilable cache
            attention_mask = attention_mask.get("full_attention", next(iter(attention_mask.values())))
        elif attention_mask is None or attention_mask.ndim == 2:
            attention_mask = self._causal_mask(embeds, attention_mask, cache, position_ids)
        pos = position_ids.expand(embeds.shape[0], T) if position_ids.shape[0] == 1 else position_ids
        cos_sin = (self.freqs_cos[pos].to(embeds.dtype), self.freqs_sin[pos].to(embeds.dtype))

        hidden = self.dropout(embeds)
        all_hidden = [] if output_hidden_states else None
        aux = embeds.new_zeros((), dtype=torch.float32)
        for layer in self.layers:
            if all_hidden is not None:
                all_hidden.append(hidden)
            hidden, layer_aux = layer(hidden, position_embeddings=cos_sin, attention_mask=attention_mask,
                                      cache=cache)
            if layer_aux is not None:
                aux = aux + layer_aux
        hidden = self.norm(hidden)
        if all_hidden is not None:
            all_hidden.append(hidden)
        return MiniMindModelOutput(last_hidden_state=hidden, hidden_states=tuple(all_hidden) if all_hidden else None,
                                   aux_loss=aux, **{CACHE_FIELD: cache if use_cache else None})


class MiniMindForCausalLM(MiniMindPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MiniMindConfig | None = None):
        config = config or MiniMindConfig()
        super().__init__(config)
        self.model = MiniMindModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.model.embed_tokens.weight = self.lm_head.weight  # MiniMind ties these always
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                labels=None, use_cache=None, output_hidden_states=None, logits_to_keep=0, past_key_values=None,
                return_dict=None, **kwargs) -> MiniMindCausalLMOutput:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         cache=_as_cache(cache, past_key_values), inputs_embeds=inputs_embeds, use_cache=use_cache,
                         output_hidden_states=output_hidden_states)
        hidden = out.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, keep, :])
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten().to(logits.device),
                                   ignore_index=-100)
        return MiniMindCausalLMOutput(loss=loss, logits=logits, hidden_states=out.hidden_states,
                                      aux_loss=out.aux_loss, **{CACHE_FIELD: getattr(out, CACHE_FIELD)})
