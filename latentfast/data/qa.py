"""Question/answer rows as a supervised batch: prompt + answer + eos, targets on the answer."""
from __future__ import annotations

import torch

from .gsm8k import format_prompt


def encode_answers(tok, rows, max_length, device, prompt=format_prompt):
    """Right-padded prompt + answer + eos; ``targets`` (the next token) on the answer only.
    ``prompt(question) -> str`` renders the prompt (default ``Question: ...\nAnswer:``)."""
    ids, tgts = [], []
    for r in rows:
        p = tok(prompt(r["question"]))["input_ids"]
        a = tok(r["answer"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        x = (p + a)[:max_length]
        ids.append(x)
        tgts.append(([-100] * (len(p) - 1) + a)[:len(x) - 1] + [-100])
    T = max(map(len, ids))
    out = torch.full((len(rows), T), tok.pad_token_id, dtype=torch.long)
    tgt = torch.full((len(rows), T), -100, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for b, (x, t) in enumerate(zip(ids, tgts)):
        out[b, :len(x)], tgt[b, :len(t)], mask[b, :len(x)] = torch.tensor(x), torch.tensor(t), 1
    return {"input_ids": out.to(device), "attention_mask": mask.to(device), "targets": tgt.to(device)}
