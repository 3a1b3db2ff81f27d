"""Data of MiniMind's preference and RL stages, and their demo data from the shipped GSM8K sample.

Formats (one JSON object per line, MiniMind's):
    dpo     {"chosen": [msgs], "rejected": [msgs]}       (msgs: {"role", "content"} dicts)
    rlaif   {"conversations": [msgs]}                     SFT format; the last (assistant) turn is a
                                                          placeholder that is dropped

``encode_dpo`` renders both sides with the chat template and masks the assistant spans as
SFT does (``data.minimind.encode_sft``); the batch holds the chosen rows then the rejected
ones. ``rlaif_prompt`` is MiniMind's ``RLAIFDataset``: the turns before the placeholder,
rendered with the generation prompt.
"""
from __future__ import annotations

import torch

from . import minimind as mm
from .jsonl import DataFileError


def read_dpo(path, limit: int | None = None) -> list[dict]:
    """``[{"chosen": msgs, "rejected": msgs}, ...]`` from a MiniMind DPO JSONL file."""
    from .jsonl import check_messages, iter_jsonl

    rows = []
    for n, row in iter_jsonl(path):
        if not isinstance(row, dict) or not isinstance(row.get("chosen"), list) or not isinstance(row.get("rejected"), list):
            raise DataFileError(f"{path}:{n}: each line needs 'chosen' and 'rejected' message lists (MiniMind's DPO format)")
        rows.append({k: check_messages(path, n, k, row[k]) for k in ("chosen", "rejected")})
        if limit and len(rows) >= limit:
            break
    if not rows:
        raise DataFileError(f"{path}: no preference pairs")
    return rows


def encode_dpo(tok, pairs: list[dict], max_length: int) -> dict:
    """``{"X", "Y", "loss_mask"}`` (2B x max_length-1): the chosen conversations, then the rejected."""
    both = [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs]
    return mm.encode_sft(tok, both, max_length)


def rlaif_messages(conversation: list[dict]) -> list[dict]:
    """The prompt turns of an RLAIF row: every turn but a final assistant placeholder."""
    msgs = [{"role": m["role"], "content": m["content"]} for m in conversation]
    return msgs[:-1] if msgs and msgs[-1]["role"] == "assistant" else msgs


def rlaif_prompt(tok, messages: list[dict]) -> str:
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode_prompts(tok, prompts: list[str], max_length: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``(input_ids, attention_mask)`` of rendered prompts, keeping the last
    ``max_length`` tokens of each (MiniMind cuts from the left)."""
    ids = [tok(p, add_special_tokens=False).input_ids[-max_length:] for p in prompts]
    n = max(len(i) for i in ids)
    pad = tok.pad_token_id
    input_ids = torch.tensor([[pad] * (n - len(i)) + i for i in ids], dtype=torch.long)
    mask = torch.tensor([[0] * (n - len(i)) + [1] * len(i) for i in ids], dtype=torch.long)
    return (input_ids.to(device), mask.to(device)) if device is not None else (input_ids, mask)


# ---------------------------------------------------------------------------- demo data
def _wrong(final: str, k: int) -> str:
    try:
        return str(int(float(final.replace(",", ""))) + 1 + k % 7)
    except ValueError:
        return final + "0"


def gsm8k_dpo_pairs(split: str = "train", limit: int | None = None) -> list[dict]:
    """Preference pairs: the worked answer with its correct final number (chosen) against a
    bare wrong number (rejected): they differ from the first response token, so truncation
    to a short ``max_seq_len`` keeps them apart."""
    from .gsm8k import load_gsm8k

    pairs = []
    for k, r in enumerate(load_gsm8k(split, limit)):
        steps, final = mm._solution(r["answer"])
        user = {"role": "user", "content": r["question"].strip()}
        pairs.append({"chosen": [user, {"role": "assistant", "content": f"{steps}\nThe answer is {final}."}],
                      "rejected": [user, {"role": "assistant", "content": f"The answer is {_wrong(final, k)}."}]})
    return pairs


def gsm8k_prompts(split: str = "train", limit: int | None = None) -> list[dict]:
    """RLAIF rows (a user question and MiniMind's placeholder assistant turn) with the gold
    final answer for the rule rewards: ``{"conversations": [...], "answer": "18"}``."""
    from .gsm8k import load_gsm8k

    rows = []
    for r in load_gsm8k(split, limit):
        _, final = mm._solution(r["answer"])
        rows.append({"conversations": [{"role": "user", "content": r["question"].strip()},
                                       {"role": "assistant", "content": "无"}], "answer": final})
    return rows


def gsm8k_short_reason(split: str = "train", limit: int | None = None) -> list[dict]:
    """Reasoning rows short enough for a CPU demo's rollouts: ``<think>`` holds only the
    solution's last step, ``<answer>`` the final number (MiniMind's reasoning format)."""
    from .gsm8k import load_gsm8k

    rows = []
    for r in load_gsm8k(split, limit):
        steps, final = mm._solution(r["answer"])
        last = steps.strip().splitlines()[-1].strip() if steps.strip() else final
        rows.append({"conversations": [
            {"role": "user", "content": r["question"].strip()},
            {"role": "assistant", "content": f"<think>\n{last}\n</think>\n<answer>\n{final}\n</answer>"}]})
    return rows
