"""A small byte-level BPE tokenizer built in code (no downloads).

Trained deterministically on the synthetic arithmetic task plus the shipped GSM8K
sample, so it covers digits, arithmetic and GSM8K-ish English; byte-level, so any
text round-trips. Digits are split one per token (helps arithmetic). ``####`` is a
single token so generation can detect the answer marker on token ids, and
``<|bot|>``/``<|eot|>`` delimit latent thoughts (CODI). A small ChatML-shaped chat
template (``<|bos|>`` opens a turn, ``<|eos|>`` closes it, as Qwen's ``<|im_start|>`` /
``<|im_end|>``) lets the demo and the tests take the Instruct models' prompt path.
"""
from __future__ import annotations

import functools

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<|pad|>", "<|bos|>", "<|eos|>", "<|unk|>"
BOT, EOT = "<|bot|>", "<|eot|>"
ANSWER_MARKER = "####"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK, BOT, EOT]
# ChatML with the existing special tokens (no new ids: the vocabulary stays as it was)
CHAT_TEMPLATE = (
    "{% for m in messages %}" + BOS + "{{ m['role'] }}\n{{ m['content'] }}" + EOS + "\n{% endfor %}"
    "{% if add_generation_prompt %}" + BOS + "assistant\n{% endif %}"
)


def _corpus():
    from .gsm8k import load_gsm8k
    from .synthetic import make_arithmetic

    for row in make_arithmetic(2000, seed=1234, min_steps=1, max_steps=4):
        yield row["question"] + "\n" + row["answer"]
    for row in load_gsm8k("train"):
        yield row["question"] + "\n" + row["answer"]
    yield "Question: Answer: The answer is $1,234.50 + - * / = < > ( ) % ! ? ; : ' \""


@functools.lru_cache(maxsize=None)
def _tokenizer_json(vocab_size: int) -> str:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    tok.add_tokens([ANSWER_MARKER])  # non-special: kept when decoding with skip_special_tokens
    return tok.to_str()


def build_tokenizer(vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """The project tokenizer as a ``transformers.PreTrainedTokenizerFast``.

    Deterministic for a given ``vocab_size``. ``tokenizer.answer_marker_id`` is the
    id of ``####``; ``bot_token_id``/``eot_token_id`` those of ``<|bot|>``/``<|eot|>``.
    """
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json(vocab_size)),
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        additional_special_tokens=[BOT, EOT],
        padding_side="left",  # prompts are left-padded for batched generation
        clean_up_tokenization_spaces=False,
        chat_template=CHAT_TEMPLATE,
    )
    tok.answer_marker = ANSWER_MARKER
    tok.answer_marker_id = tok.convert_tokens_to_ids(ANSWER_MARKER)
    tok.bot_token_id = tok.convert_tokens_to_ids(BOT)
    tok.eot_token_id = tok.convert_tokens_to_ids(EOT)
    return tok
