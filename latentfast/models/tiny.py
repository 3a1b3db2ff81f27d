"""Small Qwen2 models built from a config (no downloads).

``size="tiny"`` trains on a 2-core CPU in minutes; ``"0.5b"``/``"1.5b"`` mirror
Qwen2.5-0.5B/1.5B shapes (random weights) for GPU benchmarks.
"""
from __future__ import annotations

from transformers import Qwen2Config, Qwen2ForCausalLM

PRESETS = {
    "tiny": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=384, tie_word_embeddings=True),
    "0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                 intermediate_size=4864, tie_word_embeddings=True, vocab_size=151936),
    "1.5b": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                 intermediate_size=8960, tie_word_embeddings=True, vocab_size=151936),
}


def tiny_config(vocab_size: int | None = None, size: str = "tiny", **overrides) -> Qwen2Config:
    """A ``Qwen2Config`` for ``size`` in ``PRESETS``; ``overrides`` win over the preset."""
    if size not in PRESETS:
        raise ValueError(f"size must be one of {sorted(PRESETS)}, got {size!r}")
    kw = dict(max_position_embeddings=2048, rms_norm_eps=1e-6, attention_dropout=0.0,
              use_cache=True)
    kw.update(PRESETS[size])
    if vocab_size is not None and "vocab_size" not in PRESETS[size]:
        kw["vocab_size"] = vocab_size
    kw.update(overrides)
    if "vocab_size" not in kw:
        raise ValueError("vocab_size is required for this preset")
    return Qwen2Config(**kw)


def build_tiny_causal_lm(tokenizer=None, size: str = "tiny", seed: int | None = 0, **overrides) -> Qwen2ForCausalLM:
    """A randomly initialised ``Qwen2ForCausalLM`` whose vocab covers ``tokenizer``."""
    import torch

    vocab = None
    if tokenizer is not None:
        vocab = -(-len(tokenizer) // 64) * 64  # round up: friendlier matmul shapes
    cfg = tiny_config(vocab, size, **overrides)
    if tokenizer is not None:
        if cfg.vocab_size < len(tokenizer):
            raise ValueError(f"vocab_size {cfg.vocab_size} < tokenizer size {len(tokenizer)}")
        cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id = (
            tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)
    if seed is not None:
        torch.manual_seed(seed)
    return Qwen2ForCausalLM(cfg)
