"""Loading Hugging Face models and tokenizers from local files only (nothing is
downloaded at run time): ``from_local`` (any ``from_pretrained`` class) and
``load_causal_lm`` (a tokenizer and causal LM by name, ``tiny`` built in code)."""
from __future__ import annotations


import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from latentfast.cli import is_local_model
from latentfast.data import build_tokenizer
from latentfast.seam import Seam

from .tiny import build_tiny_causal_lm


def from_local(cls, name, **kwargs):
    """``cls.from_pretrained(name, local_files_only=True, **kwargs)``; a clear error
    naming ``name`` when it is neither a local model directory nor already cached."""
    name = str(name)
    if not is_local_model(name):
        raise FileNotFoundError(f"model {name!r} not found locally: pass a local Hugging Face model directory "
                                f"(nothing is downloaded at run time)")
    kwargs.setdefault("local_files_only", True)
    try:
        return cls.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as e:
        raise OSError(f"could not load {cls.__name__} from local files at {name!r} (nothing is downloaded at "
                      f"run time): {e}") from e


_SEAM = Seam()
# ``with substitute(loader):`` makes ``load_causal_lm(...)`` return ``loader(...)`` (same arguments,
# same result): the planner's models built from a config alone on fake tensors
substitute = _SEAM.substitute


def load_causal_lm(name: str, device, dtype=None, seed: int = 0, size: str = "tiny", **overrides):
    """(tokenizer, model). ``name='tiny'`` builds the project tokenizer and a small Qwen2
    from a config (``size`` / ``overrides``, random weights, no download); anything
    else is a local Hugging Face model path."""
    if _SEAM.current is not None:
        return _SEAM.current(name, device, dtype=dtype, seed=seed, size=size, **overrides)
    if name == "tiny":
        tok = build_tokenizer()
        lm = build_tiny_causal_lm(tok, size=size, seed=seed, **overrides).to(device)
        return tok, lm if dtype is None else lm.to(dtype)
    tok = from_local(AutoTokenizer, name)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if dtype is None:
        dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return tok, from_local(AutoModelForCausalLM, name, dtype=dtype).to(device)


__all__ = ["from_local", "load_causal_lm", "substitute"]
