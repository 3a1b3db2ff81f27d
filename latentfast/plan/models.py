"""Models the planner builds from a config alone: named public configs written from their
published ``config.json`` values, or a local ``config.json`` / model folder. No weights are read.

Every model is built under ``FakeTensorMode`` (``latentfast.plan.fake``): parameters are fake
tensors with real shapes and dtypes, so a 7B model costs no memory and builds in seconds.
"""
from __future__ import annotations

import json
import pathlib

# Published config.json values (huggingface.co/<name>/blob/main/config.json). The -Instruct
# variants share the base model's architecture.
_QWEN = dict(model_type="qwen2", hidden_act="silu", rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=32768,
             attention_dropout=0.0, use_sliding_window=False)
_LLAMA = dict(model_type="llama", hidden_act="silu", rms_norm_eps=1e-5, rope_theta=500000.0, vocab_size=128256,
              max_position_embeddings=131072, tie_word_embeddings=True, mlp_bias=False, attention_bias=False,
              rope_scaling={"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                            "original_max_position_embeddings": 8192, "rope_type": "llama3"})
_GEMMA3 = dict(model_type="gemma3_text", hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6, vocab_size=262144,
               head_dim=256, sliding_window=512, rope_theta=1e6, rope_local_base_freq=10000.0,
               max_position_embeddings=32768, query_pre_attn_scalar=256, tie_word_embeddings=True,
               final_logit_softcapping=None, attn_logit_softcapping=None)
NAMED = {
    "Qwen2.5-0.5B": dict(_QWEN, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "Qwen2.5-1.5B": dict(_QWEN, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "Qwen2.5-7B": dict(_QWEN, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False, rope_theta=1e6),
    "Llama-3.2-1B": dict(_LLAMA, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64),
    "Llama-3.2-3B": dict(_LLAMA, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                         num_attention_heads=24, num_key_value_heads=8, head_dim=128),
    "gemma-3-270m": dict(_GEMMA3, hidden_size=640, intermediate_size=2048, num_hidden_layers=18, num_attention_heads=4,
                         num_key_value_heads=1, layer_types=None),
    "gemma-3-1b": dict(_GEMMA3, hidden_size=1152, intermediate_size=6912, num_hidden_layers=26, num_attention_heads=4,
                       num_key_value_heads=1, layer_types=None),
    # seed note 002: hidden 640, 12 layers, MoE (MiniMind's 1 shared + 4 routed, top-2), head-wise output gate
    "minimind-640x12-moe": dict(model_type="minimind", hidden_size=640, num_hidden_layers=12, use_moe=True,
                                headwise_attn_output_gate=True),
    "minimind-512x8": dict(model_type="minimind", hidden_size=512, num_hidden_layers=8),
    "minimind-768x16": dict(model_type="minimind", hidden_size=768, num_hidden_layers=16),
}
for _n in ("Qwen2.5-0.5B", "Qwen2.5-1.5B", "Qwen2.5-7B"):
    NAMED[_n + "-Instruct"] = NAMED[_n]
for _n in ("Llama-3.2-1B", "Llama-3.2-3B"):
    NAMED[_n + "-Instruct"] = NAMED[_n]
NAMED["gemma-3-1b-it"] = NAMED["gemma-3-1b"]
NAMED["gemma-3-270m-it"] = NAMED["gemma-3-270m"]
_LOWER = {k.lower(): k for k in NAMED}


def config_dict(name: str) -> dict:
    """The config values of a named model (case-insensitive, an ``org/`` prefix ignored) or
    of a local ``config.json`` / folder holding one."""
    path = pathlib.Path(name)
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        return json.loads(path.read_text())
    key = _LOWER.get(name.split("/")[-1].lower())
    if key is None:
        raise ValueError(f"--model: expected a config.json, a model folder or one of {sorted(NAMED)}, got {name!r}")
    return dict(NAMED[key])


def label(model) -> str:
    """A model's name for the plan's first line (a config dict: its type and shape)."""
    if isinstance(model, str):
        return model
    if model.get("_label"):
        return model["_label"]
    moe = " MoE" if model.get("use_moe") else ""
    return f"{model.get('model_type')} {model.get('hidden_size')}x{model.get('num_hidden_layers')}{moe} (config)"


def hf_config(name_or_dict):
    """A transformers config object (MiniMind's is registered by ``latentfast.models.minimind``)."""
    import latentfast.models.minimind  # noqa: F401  (registers model_type "minimind")
    from transformers import AutoConfig

    d = dict(config_dict(name_or_dict) if isinstance(name_or_dict, str) else name_or_dict)
    model_type = d.pop("model_type")
    if model_type == "gemma3_text" and d.get("layer_types") is None:  # 5 sliding : 1 global
        d["layer_types"] = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
                            for i in range(d["num_hidden_layers"])]
    d.pop("architectures", None)
    d.pop("_label", None)
    d.pop("transformers_version", None)
    d.pop("torch_dtype", None)
    d.pop("dtype", None)
    return AutoConfig.for_model(model_type, **d)


def kv_bytes_per_token(cfg, dtype_bytes: int = 2) -> int:
    """K and V of every layer for one token."""
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return 2 * cfg.num_hidden_layers * heads * hd * dtype_bytes
