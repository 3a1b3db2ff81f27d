from .gsm8k import format_prompt, load_gsm8k, load_jsonl, sample_path
from .rewards import REWARDS, correctness_reward, extract_answer, format_reward, get_reward_funcs, normalize_number
from .synthetic import make_arithmetic

# the tokenizer needs transformers (~1 s to import): loaded on first use, so the data helpers (and the
# command lines' --help, which read task names from here) stay light
_TOKENIZER_NAMES = ("ANSWER_MARKER", "BOT", "EOT", "build_tokenizer")


def __getattr__(name):
    if name in _TOKENIZER_NAMES:
        from . import tokenizer

        return getattr(tokenizer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["REWARDS", "correctness_reward", "extract_answer", "format_prompt", "format_reward", "get_reward_funcs",
           "load_gsm8k", "load_jsonl", "make_arithmetic", "normalize_number", "sample_path", *_TOKENIZER_NAMES]
