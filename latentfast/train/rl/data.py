"""TRL's dataset formats for the RL trainers, and the built-in task sets.

    rows = load_dataset_rows("data.jsonl")          # JSON / JSONL file, a saved datasets folder, or a name
    text = render_prompt(tok, row["prompt"])         # standard (str) as is; conversational (messages)
                                                     # through the chat template + generation prompt
    p, c, r = preference_texts(tok, row)             # prompt / chosen / rejected as text

Formats (TRL): *prompt-only* ``{"prompt": str | [messages]}`` (GRPO, RLOO; every other column
is passed to the reward functions as a keyword, e.g. ``answer``); *preference*
``{"prompt", "chosen", "rejected"}`` or the implicit-prompt conversational form
``{"chosen": [...], "rejected": [...]}`` whose shared leading messages are the prompt (DPO).
Built-in names: ``gsm8k_sample`` / ``gsm8k_sample_test`` (the shipped GSM8K sample) and
``arithmetic`` (synthetic one-step word problems), as few-shot ``Question: ...\\nAnswer:`` prompts with an
``answer`` column (the gold number) for the ``accuracy`` reward; ``arithmetic_pairs``
(preference: the worked answer chosen over a wrong one).
"""
from __future__ import annotations

import json
import pathlib

BUILTIN = ("gsm8k_sample", "gsm8k_sample_test", "arithmetic", "arithmetic_pairs")
FEW_SHOT = ("Question: Sam has 5 pens. Then they get 3 more pens. How many pens does Sam have?\nAnswer: 5+3=8. "
            "The answer is 8.\n\nQuestion: Mia has 7 coins. Then they lose 2 coins. How many coins does Mia have?\n"
            "Answer: 7-2=5. The answer is 5.\n\nQuestion: Ben has 4 cards. Then they double their cards. How many "
            "cards does Ben have?\nAnswer: 4*2=8. The answer is 8.\n\n")


def _task_rows(name: str, n: int | None = None) -> list[dict]:
    from latentfast.data import load_gsm8k, make_arithmetic
    from latentfast.data.rewards import gold_answer

    if name == "arithmetic_pairs":  # preference pairs: the worked answer over one off by one
        rows = []
        for r in make_arithmetic(n or 2000, seed=1, min_steps=1, max_steps=2):
            gold = int(gold_answer(r["answer"]))
            work = r["answer"].rsplit("####", 1)[0].strip().replace("\n", ", ")
            rows.append({"prompt": f"Question: {r['question']}\nAnswer:", "chosen": f" {work}. The answer is {gold}.",
                         "rejected": f" The answer is {gold + 1}."})
        return rows
    if name == "arithmetic":
        raw = make_arithmetic(n or 5000, seed=0, min_steps=1, max_steps=1)
    else:
        raw = load_gsm8k("test" if name.endswith("test") else "train", n)
    return [{"prompt": f"{FEW_SHOT}Question: {r['question']}\nAnswer:", "answer": gold_answer(r["answer"])}
            for r in raw]


def load_dataset_rows(spec: str, split: str = "train", n: int | None = None) -> list[dict]:
    """Rows from a built-in name, a JSON/JSONL file, or a folder written by ``datasets``
    (``save_to_disk``, or data files ``load_dataset`` reads); nothing is downloaded."""
    if spec in BUILTIN:
        return _task_rows(spec, n)
    path = pathlib.Path(spec)
    if path.is_file():
        text = path.read_text()
        if path.suffix == ".json" and text.lstrip().startswith("["):
            rows = json.loads(text)
        else:
            rows = []
            for i, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise ValueError(f"--dataset_name {spec}: line {i} is not JSON ({e.msg})") from None
    elif path.is_dir():
        import datasets

        try:
            ds = datasets.load_from_disk(str(path))
        except FileNotFoundError:
            ds = datasets.load_dataset(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(f"--dataset_name {spec}: no split {split!r} (has {sorted(ds)})")
            ds = ds[split]
        rows = list(ds)
    else:
        raise FileNotFoundError(f"--dataset_name {spec!r}: no such file or folder (expected a JSON/JSONL file, a "
                                f"datasets folder, or one of {BUILTIN})")
    return rows[:n] if n else rows


def is_conversational(value) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) and "role" in m for m in value)


def render_prompt(tok, prompt) -> str:
    """TRL: a conversational prompt goes through the chat template with the generation
    prompt; a standard one is used as is."""
    if is_conversational(prompt):
        if not getattr(tok, "chat_template", None):
            raise ValueError("conversational prompts need a tokenizer with a chat template (this one has none); "
                             "use standard string prompts")
        return tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    if not isinstance(prompt, str):
        raise ValueError(f"a prompt must be a string or a list of {{'role', 'content'}} messages, got "
                         f"{type(prompt).__name__}")
    return prompt


def completion_text(tok, prompt_msgs, completion) -> str:
    """A response as text: a conversational one is the chat template of prompt + response,
    minus the rendered prompt (TRL's way to keep the template's tokens around the turn)."""
    if not is_conversational(completion):
        return completion
    full = tok.apply_chat_template(list(prompt_msgs) + list(completion), tokenize=False)
    head = tok.apply_chat_template(list(prompt_msgs), tokenize=False, add_generation_prompt=True)
    return full[len(head):] if full.startswith(head) else full


def check_prompt_rows(rows: list[dict], flag: str = "--dataset_name") -> None:
    if not rows:
        raise ValueError(f"{flag}: no rows")
    if "prompt" not in rows[0]:
        raise ValueError(f"{flag}: expected TRL's prompt-only format (a 'prompt' column), got columns "
                         f"{sorted(rows[0])}")


def preference_texts(tok, row: dict) -> tuple[str, str, str]:
    """(prompt, chosen, rejected) texts of one preference row (explicit or implicit prompt)."""
    if "chosen" not in row or "rejected" not in row:
        raise ValueError(f"--dataset_name: expected TRL's preference format ('chosen' and 'rejected' columns, "
                         f"'prompt' optional), got columns {sorted(row)}")
    chosen, rejected = row["chosen"], row["rejected"]
    prompt = row.get("prompt")
    if prompt is None:
        if not (is_conversational(chosen) and is_conversational(rejected)):
            raise ValueError("--dataset_name: rows without a 'prompt' column must be conversational (the shared "
                             "leading messages of chosen and rejected are the prompt)")
        k = 0
        while k < min(len(chosen), len(rejected)) - 1 and chosen[k] == rejected[k]:
            k += 1
        prompt, chosen, rejected = chosen[:k], chosen[k:], rejected[k:]
    if is_conversational(prompt):
        return render_prompt(tok, prompt), completion_text(tok, prompt, chosen), completion_text(tok, prompt, rejected)
    return render_prompt(tok, prompt), chosen, rejected


__all__ = ["BUILTIN", "FEW_SHOT", "check_prompt_rows", "is_conversational", "load_dataset_rows", "preference_texts",
           "render_prompt"]
