"""The MiniMind tokenizers shipped with the package (Apache-2.0, see ``tokenizer/NOTICE.md``)."""
from __future__ import annotations

import functools
import pathlib

from latentfast.choices import MINIMIND_DEFAULT_TOKENIZER, MINIMIND_TOKENIZERS

TOKENIZER_DIR = pathlib.Path(__file__).with_name("tokenizer")
# version -> folder (defined in latentfast.choices: latentfast-minimind --help lists them torch-free)
TOKENIZERS = MINIMIND_TOKENIZERS
DEFAULT_TOKENIZER = MINIMIND_DEFAULT_TOKENIZER


def tokenizer_path(version: str = DEFAULT_TOKENIZER) -> pathlib.Path:
    if version not in TOKENIZERS:
        raise ValueError(f"tokenizer version must be one of {sorted(TOKENIZERS)}, got {version!r}")
    return TOKENIZER_DIR / TOKENIZERS[version]


@functools.lru_cache(maxsize=None)
def _load(version: str):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(tokenizer_path(version)), local_files_only=True)


def load_tokenizer(version: str = DEFAULT_TOKENIZER):
    """A ``PreTrainedTokenizerFast`` with MiniMind's vocabulary, specials and chat template
    (ChatML; ``<|endoftext|>`` pad, ``<|im_start|>`` bos, ``<|im_end|>`` eos). A fresh
    copy each call (callers may change ``padding_side``)."""
    import copy

    return copy.deepcopy(_load(version))
