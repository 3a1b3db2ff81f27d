"""Loading Hugging Face models and tokenizers from local files only (nothing is
downloaded at run time)."""
from __future__ import annotations

import pathlib


def _is_local(name: str) -> bool:
    if pathlib.Path(name).is_dir():
        return True
    try:  # a hub id whose files are already in the local cache
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except Exception:  # not a valid repo id, no cache
        return False


def from_local(cls, name, **kwargs):
    """``cls.from_pretrained(name, local_files_only=True, **kwargs)``; a clear error
    naming ``name`` when it is neither a local model directory nor already cached."""
    name = str(name)
    if not _is_local(name):
        raise FileNotFoundError(f"model {name!r} not found locally: pass a local Hugging Face model directory "
                                f"(nothing is downloaded at run time)")
    kwargs.setdefault("local_files_only", True)
    try:
        return cls.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as e:
        raise OSError(f"could not load {cls.__name__} from local files at {name!r} (nothing is downloaded at "
                      f"run time): {e}") from e


__all__ = ["from_local"]
