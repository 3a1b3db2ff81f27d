"""Held-out answer metrics of a causal LM: answer-token CE and greedy-decoding accuracy."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from latentfast.data import format_prompt
from latentfast.data.qa import encode_answers
from latentfast.data.rewards import correctness_reward
from latentfast.generation import generate


def answer_ce(lm, hidden, targets):
    """Mean CE of the target tokens; logits only at those positions (no B x T x V tensor)."""
    sel = targets != -100
    return F.cross_entropy(lm.get_output_embeddings()(hidden[sel]).float(), targets[sel])


@torch.no_grad()
def answer_metrics(lm, tok, rows, max_length, max_new_tokens, device, amp, rank=0, world=1, batch=32) -> dict:
    """Held-out answer CE and greedy accuracy of ``lm`` over ``rows`` (split across ranks)."""
    was = lm.training
    lm.eval()
    mine = rows[rank::world]
    sums = torch.zeros(4, dtype=torch.float64)
    for i in range(0, len(mine), batch):
        chunk = mine[i:i + batch]
        b = encode_answers(tok, chunk, max_length, device)
        with amp():
            ce = answer_ce(lm, lm.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
                           .last_hidden_state, b["targets"])
        n_tok = int((b["targets"] != -100).sum())
        tok.padding_side = "left"
        enc = tok([format_prompt(r["question"]) for r in chunk], return_tensors="pt", padding=True).to(device)
        with amp():  # greedy, token-identical to lm.generate(do_sample=False); ranks decode independently
            ro = generate(lm, enc.input_ids, enc.attention_mask, max_new_tokens, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id, sync_ranks=False)
        texts = tok.batch_decode(ro.completion_ids, skip_special_tokens=True)
        sums += torch.tensor([ce.item() * n_tok, n_tok, sum(correctness_reward(texts, [r["answer"] for r in chunk])),
                              len(chunk)], dtype=torch.float64)
    if world > 1:
        t = sums.to(device)
        torch.distributed.all_reduce(t)
        sums = t.cpu()
    lm.train(was)
    return {"eval_ce": sums[0].item() / max(1, sums[1].item()), "eval_accuracy": sums[2].item() / max(1, sums[3].item())}
