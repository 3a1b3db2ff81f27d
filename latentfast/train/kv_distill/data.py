"""Batches of a KV-distillation run: question/answer rows encoded with CODI's answer position
and each row's task/mode tag."""
from __future__ import annotations

import torch

from latentfast.data.qa import encode_answers


def encode(tok, rows, max_length, device):
    """``encode_answers`` (prompt + answer + eos, targets on the answer) plus ``answer_pos``,
    CODI's position: the token before the answer number (the last '####' token), else the
    last answer token."""
    out = encode_answers(tok, rows, max_length, device)
    marker = getattr(tok, "answer_marker_id", None)
    lens = out["attention_mask"].sum(1).tolist()
    pos = []
    for x, n in zip(out["input_ids"].tolist(), lens):
        hits = [i for i, v in enumerate(x[:n]) if v == marker] if marker is not None else []
        pos.append(hits[-1] if hits else n - 2)
    out["answer_pos"] = torch.tensor(pos, device=device)
    return out


def row_tag(row: dict) -> str | None:
    """A training row's task/mode tag (``per_task`` weighting, per-task weight logs)."""
    return row.get("mode") or row.get("task")
