"""Every prompt the trainers and evaluators build, in one place.

Chat format (the HRPO recipe, ``utils.py``): ``[{"role": "system", "content": SYSTEM_PROMPT},
{"role": "user", "content": question}]`` through ``tokenizer.apply_chat_template(...,
add_generation_prompt=True)``, tokenized without extra special tokens (the template holds
them). Plain format (base models, ``--no_chat_template``): ``"Question: {q}\\nAnswer:\\n"`` (a
user message that already holds ``Question:`` just gets ``\\nAnswer:\\n``), preceded by the
system prompt only when one is given explicitly.
"""
from __future__ import annotations

from .rewards import MARKER as ANSWER_MARKER
# The recipe's system prompt, word for word.
SYSTEM_PROMPT = (
    "A conversation between User and Assistant. The user asks a question, and the assistant solves it. "
    "The assistant first thinks about the reasoning process in the mind and then provides the user with the "
    f"answer. The final answer is provided after the {ANSWER_MARKER} tag, i.e., {{reasoning process}} "
    f"{ANSWER_MARKER} {{answer}}."
)
PROMPT_TEMPLATE = "Question: {question}\nAnswer:\n"


def format_prompt(question: str) -> str:
    """The plain prompt; the model continues with the worked answer."""
    return PROMPT_TEMPLATE.format(question=question.strip())


def uses_chat_template(tokenizer, chat_template: bool | None = None) -> bool:
    """``None``: the chat format when the tokenizer has a template. ``True`` insists on it."""
    has = bool(getattr(tokenizer, "chat_template", None))
    if chat_template and not has:
        raise ValueError("chat_template=True but the tokenizer has no chat template (pass --no_chat_template)")
    return has if chat_template is None else bool(chat_template)


def chat_messages(user: str, system_prompt: str | None = SYSTEM_PROMPT) -> list[dict]:
    """The recipe's conversation; an empty or ``None`` system prompt leaves the system turn out."""
    msgs = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return msgs + [{"role": "user", "content": user.strip()}]


def render_prompt(tokenizer, user: str, system_prompt: str | None = None, chat_template: bool | None = None) -> str:
    """Prompt text for one question (``user`` = the task's user message).

    ``system_prompt=None`` means the recipe's in the chat format and none in the plain one;
    ``""`` means none in either."""
    if uses_chat_template(tokenizer, chat_template):
        sp = SYSTEM_PROMPT if system_prompt is None else system_prompt
        return tokenizer.apply_chat_template(chat_messages(user, sp), tokenize=False, add_generation_prompt=True)
    # tasks whose user message already asks the question (multiple choice, RAG) are not wrapped twice
    plain = f"{user.strip()}\nAnswer:\n" if "Question:" in user else format_prompt(user)
    return f"{system_prompt.strip()}\n\n{plain}" if system_prompt else plain


def encode_prompts(tokenizer, users: list[str], max_length: int, device=None, system_prompt: str | None = None,
                   chat_template: bool | None = None):
    """Left-padded, left-truncated ``(input_ids, attention_mask)`` for a batch of questions."""
    chat = uses_chat_template(tokenizer, chat_template)
    texts = [render_prompt(tokenizer, u, system_prompt, chat) for u in users]
    tokenizer.padding_side, tokenizer.truncation_side = "left", "left"
    # the chat template writes its own BOS/turn tokens (the recipe: add_special_tokens=False)
    enc = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=max_length,
                    add_special_tokens=not chat)
    return enc.input_ids.to(device), enc.attention_mask.to(device)


def prepare_tokenizer(tokenizer):
    """Left padding for batched generation; pad = EOS when the tokenizer has no pad token
    (Llama-3.2 Instruct; Qwen2.5 Instruct has its own), as the recipe pads."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer
