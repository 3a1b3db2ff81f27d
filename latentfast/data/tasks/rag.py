"""Open-domain QA with retrieved contexts (the recipe's ``hrpo_rag.py`` / ``eval_rag.py``: NQ,
TriviaQA, 2Wiki, HotpotQA, Bamboogle): ``{"question": str, "contexts": [str, ...],
"golden_answers": [str, ...]}`` per row, each context ``"title"\\ntext``. The prompt holds the
top 3 contexts; a prediction is right when it equals any gold answer after SQuAD
normalisation (lower case, punctuation and articles removed, whitespace collapsed)."""
from __future__ import annotations

import re
import string

from .base import Task

TOPK = 3
_PUNCT = set(string.punctuation)


def squad_normalize(text: str) -> str:
    """SQuAD's answer normalisation (the recipe's ``process_qa_answer``)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def rag_prompt(question: str, contexts, topk: int = TOPK) -> str:
    lines = ["Context (which may or may not be relevant):"]
    for ctx in list(contexts)[:topk]:
        title, *body = ctx.split("\n")
        lines.append("::::".join([title.strip('"')] + body))
    return "\n".join(lines) + f"\n\nQuestion: {question}"


def to_row(r: dict) -> dict:
    golds = r["golden_answers"] if "golden_answers" in r else r["answers"]
    golds = [golds] if isinstance(golds, str) else [str(g) for g in golds]
    if not golds:
        raise ValueError("no gold answers")
    return {"question": rag_prompt(r["question"], r.get("contexts", [])), "answer": golds}


TASK = Task("rag", doc='rows {"question": str, "contexts": ["\\"title\\"\\ntext", ...], "golden_answers": [str, ...]}',
            to_row=to_row, normalize=squad_normalize)
