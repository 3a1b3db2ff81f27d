from .gsm8k import format_prompt, load_gsm8k, load_jsonl, sample_path
from .rewards import REWARDS, correctness_reward, extract_answer, format_reward, get_reward_funcs, normalize_number
from .synthetic import make_arithmetic
from .tokenizer import ANSWER_MARKER, BOT, EOT, build_tokenizer
