"""The static KV cache and the decoder's keyword names, across transformers versions
(the cache keyword itself is ``latentfast.hf.adapter.cache_kwarg``, the one place)."""
from __future__ import annotations

import inspect

import torch


def takes_cache_position(decoder) -> bool:
    """Older decoders (e.g. transformers 5.17) index the static cache by ``cache_position``."""
    return "cache_position" in inspect.signature(type(decoder).forward).parameters


def cache_len(n: int, bucketed: bool = True) -> int:
    """Static cache length for ``n`` = prompt + new tokens. ``bucketed`` (a compiled step):
    rounded up to a few buckets so prompts of different lengths reuse one compiled graph.
    Dense attention reads every slot (masked ones too), so eager steps use exactly ``n``."""
    if not bucketed:
        return n
    if n <= 256:
        return max(64, 1 << (n - 1).bit_length())
    return -(-n // 256) * 256


def static_cache(config, batch_size: int, max_cache_len: int, device, dtype):
    """An HF ``StaticCache`` (constructor signature of transformers >= 4.56, else the older one)."""
    from transformers import StaticCache

    try:
        return StaticCache(config=config, max_cache_len=max_cache_len)
    except TypeError:  # transformers < 4.56
        return StaticCache(config=config, max_batch_size=batch_size, max_cache_len=max_cache_len, device=device,
                           dtype=dtype)


def mark_static(*tensors: torch.Tensor) -> None:
    """Fixed addresses for CUDA graphs: buffers mutated inside the compiled step."""
    for t in tensors:
        torch._dynamo.mark_static_address(t)
