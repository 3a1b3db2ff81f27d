"""MiniMind's data: its JSONL formats, the tensors its trainers train on, and demo
data built from the shipped GSM8K sample.

Formats (one JSON object per line):
    pretrain   {"text": "..."}
    SFT / LoRA / reasoning / distillation
               {"conversations": [{"role": "user", "content": "..."}, {"role": "assistant", ...}, ...]}
               (a first system turn may carry "functions": rendered as tools)

Encoding is MiniMind's (a8455ca ``dataset/lm_dataset.py``): pretraining text without
special tokens, right-padded to ``max_length``, loss on non-pad targets; SFT rendered
with the tokenizer's chat template, the loss on each assistant span — from after
``<|im_start|>assistant`` and its newline through ``<|im_end|>`` (and, as MiniMind, the
one token after it). Batches are ``X = ids[:, :-1]``, ``Y = ids[:, 1:]`` and the mask
aligned with ``Y``.
"""
from __future__ import annotations

import json
import pathlib
import re
import warnings

import torch

from .jsonl import DataFileError, check_messages, check_text, iter_jsonl

THINK_TAGS = ("<think>", "</think>", "<answer>", "</answer>")


# ---------------------------------------------------------------------------- files
def read_jsonl(path: str | pathlib.Path, field: str, limit: int | None = None) -> list:
    """The ``field`` value of every line of ``path`` (``"text"`` or ``"conversations"``),
    type-checked: a text that is not a string, or a conversation turn without string role and
    content, is an error naming file, line and field; so is a file whose texts are all empty."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    out, empty = [], []
    for n, row in iter_jsonl(path):
        if not isinstance(row, dict) or field not in row:
            raise DataFileError(f"{path}:{n}: each line needs a {field!r} field (MiniMind's format)")
        value = row[field]
        if field == "conversations":
            check_messages(path, n, field, value)
            blank = not any(isinstance(t["content"], str) and t["content"].strip() for t in value
                            if t["role"] == "assistant")
        else:
            blank = not check_text(path, n, field, value).strip()
        if blank:
            empty.append(n)
        out.append(value)
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise DataFileError(f"{path}: no rows (expected one JSON object per line)")
    what = "'text'" if field != "conversations" else "assistant 'content'"
    if len(empty) == len(out):
        raise DataFileError(f"{path}: every {what} is empty ({len(out)} rows): nothing to train on")
    if empty:
        warnings.warn(f"{path}: {len(empty)} of {len(out)} rows have an empty {what} (lines "
                      f"{', '.join(map(str, empty[:5]))}{' ...' if len(empty) > 5 else ''}): they add no loss",
                      RuntimeWarning, stacklevel=2)
    return out


def write_jsonl(rows: list[dict], path: str | pathlib.Path) -> pathlib.Path:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


# ---------------------------------------------------------------------------- encoding
def _shift(ids: torch.Tensor, mask: torch.Tensor) -> dict:
    return {"X": ids[:, :-1], "Y": ids[:, 1:], "loss_mask": mask[:, 1:]}


def encode_pretrain(tok, texts: list[str], max_length: int) -> dict:
    """``{"X", "Y", "loss_mask"}`` (B x max_length-1): text truncated/padded to
    ``max_length``, loss on every non-pad target."""
    enc = tok([str(t) for t in texts], max_length=max_length, padding="max_length", truncation=True,
              add_special_tokens=False, return_tensors="pt")
    ids = enc.input_ids
    return _shift(ids, (ids != tok.pad_token_id).long())


def render_chat(tok, conversation: list[dict]) -> str:
    tools = None
    if conversation and conversation[0]["role"] == "system" and conversation[0].get("functions"):
        tools = conversation[0]["functions"]
    return tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=False, tools=tools)


def span_markers(tok) -> tuple[list[int], list[int]]:
    """Token ids of ``<|im_start|>assistant`` and of ``<|im_end|>``."""
    return (tok(f"{tok.bos_token}assistant", add_special_tokens=False).input_ids,
            tok(tok.eos_token, add_special_tokens=False).input_ids)


def assistant_mask(ids: list[int], start: list[int], end: list[int]) -> list[int]:
    """1 at input positions whose token the loss is taken on (MiniMind's rule): after each
    ``start`` marker and the token that follows it, through the ``end`` marker plus one."""
    n, mask, i = len(ids), [0] * len(ids), 0
    while i < n:
        if ids[i:i + len(start)] == start:
            s = e = i + len(start)
            while e < n and ids[e:e + len(end)] != end:
                e += 1
            for j in range(s + 1, min(e + len(end) + 1, n)):
                mask[j] = 1
            i = e + len(end) if e < n else n
        else:
            i += 1
    return mask


def encode_sft(tok, conversations: list[list[dict]], max_length: int) -> dict:
    """``{"X", "Y", "loss_mask"}`` for chat rows: the loss on the assistant spans only."""
    start, end = span_markers(tok)
    rows, masks = [], []
    for conv in conversations:
        ids = tok(render_chat(tok, conv), add_special_tokens=False).input_ids[:max_length]
        ids = ids + [tok.pad_token_id] * (max_length - len(ids))
        rows.append(ids)
        masks.append(assistant_mask(ids, start, end))
    return _shift(torch.tensor(rows, dtype=torch.long), torch.tensor(masks, dtype=torch.long))


def trim_padding(batch: dict) -> dict:
    """Drop the trailing columns where no row has a loss token. With right padding and a
    causal model this changes no loss value (dense models); the MoE aux loss counts every
    position, so MoE runs keep MiniMind's fixed length."""
    keep = int(batch["loss_mask"].any(0).nonzero().max()) + 1 if batch["loss_mask"].any() else 1
    return {k: v[:, :keep] for k, v in batch.items()}


# ---------------------------------------------------------------------------- reasoning tags
def tag_token_ids(tok, tags=THINK_TAGS) -> list[list[int]]:
    return [tok(t, add_special_tokens=False).input_ids for t in tags]


def tag_weights(Y: torch.Tensor, loss_mask: torch.Tensor, tag_ids: list[list[int]], weight: float = 10.0):
    """Per-target loss weights: ``loss_mask`` with ``weight`` at the targets that belong to
    a whole occurrence of one of the tags' token sequences, inside the mask.

    MiniMind (a8455ca) instead sets ``weight`` wherever a target equals *any* id of *any*
    tag (``isin``), so with the note-era tokenizer (``<think>`` = ``<``,``th``,``ink``,``>``)
    every ``<`` and ``>`` in the data is up-weighted, masked-out positions included."""
    w = loss_mask.to(torch.float32).clone()
    hit = torch.zeros_like(Y, dtype=torch.bool)
    for seq in tag_ids:
        n = len(seq)
        if n == 0 or Y.shape[1] < n:
            continue
        windows = Y.unfold(1, n, 1)  # B x (T-n+1) x n
        starts = (windows == torch.tensor(seq, device=Y.device)).all(-1)
        for j in range(n):
            hit[:, j:j + starts.shape[1]] |= starts
    w[hit & loss_mask.bool()] = weight
    return w


def minimind_tag_weights(Y: torch.Tensor, loss_mask: torch.Tensor, tag_ids: list[list[int]], weight: float = 10.0):
    """MiniMind's own rule, for comparison (see ``tag_weights``)."""
    w = loss_mask.to(torch.float32).clone()
    ids = torch.tensor(sorted({i for seq in tag_ids for i in seq}), device=Y.device)
    w[torch.isin(Y, ids)] = weight
    return w


# ---------------------------------------------------------------------------- demo data (GSM8K sample)
_CALC = re.compile(r"<<[^>]*>>")


def _solution(answer: str) -> tuple[str, str]:
    """(worked steps without calculator annotations, final answer) of a GSM8K answer."""
    body, _, final = answer.rpartition("####")
    return _CALC.sub("", body).strip(), final.strip()


def gsm8k_rows(kind: str, split: str = "train", limit: int | None = None) -> list[dict]:
    """MiniMind-format rows from the shipped GSM8K sample: ``"pretrain"`` ({"text"}),
    ``"sft"`` (question -> worked answer) or ``"reason"`` (question ->
    ``<think>steps</think><answer>final</answer>``)."""
    from .gsm8k import load_gsm8k

    rows = []
    for r in load_gsm8k(split, limit):
        steps, final = _solution(r["answer"])
        if kind == "pretrain":
            rows.append({"text": f"{r['question'].strip()}\n{steps}\nThe answer is {final}."})
        elif kind == "sft":
            rows.append({"conversations": [{"role": "user", "content": r["question"].strip()},
                                           {"role": "assistant", "content": f"{steps}\nThe answer is {final}."}]})
        elif kind == "reason":
            rows.append({"conversations": [
                {"role": "user", "content": r["question"].strip()},
                {"role": "assistant", "content": f"<think>\n{steps}\n</think>\n<answer>\n{final}\n</answer>"}]})
        else:
            raise ValueError(f"kind must be 'pretrain', 'sft' or 'reason', got {kind!r}")
    return rows
