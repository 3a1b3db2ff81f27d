"""MiniMind data: formats, the assistant-span mask, reasoning-tag weights, GSM8K demo rows."""
import json

import pytest
import torch

from latentfast.data.minimind import (assistant_mask, encode_pretrain, encode_sft, gsm8k_rows,
                                      minimind_tag_weights, read_jsonl, tag_token_ids, tag_weights, trim_padding,
                                      write_jsonl)
from latentfast.models.minimind import load_tokenizer

TOK = load_tokenizer()


def test_pretrain_encoding_is_minimind_shift_and_pad_mask():
    b = encode_pretrain(TOK, ["hello world", "a"], 12)
    ids = TOK(["hello world", "a"], add_special_tokens=False).input_ids
    assert b["X"].shape == b["Y"].shape == b["loss_mask"].shape == (2, 11)
    assert b["X"][0, :len(ids[0])].tolist() == ids[0] and b["Y"][0, :len(ids[0]) - 1].tolist() == ids[0][1:]
    assert b["loss_mask"][1].sum() == len(ids[1]) - 1  # non-pad targets only


def test_assistant_span_mask_matches_minimind_rule():
    conv = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
            {"role": "user", "content": "and 3+3?"}, {"role": "assistant", "content": "6"}]
    b = encode_sft(TOK, [conv], 80)
    Y, m = b["Y"][0], b["loss_mask"][0].bool()
    text = TOK.decode(Y[m])
    # both answers, each with its <|im_end|> and the newline after it; no user/system text
    assert text == "4<|im_end|>\n6<|im_end|>\n"
    # the plain rule on a toy sequence: start marker [1, 9], end [2]
    assert assistant_mask([5, 1, 9, 7, 3, 3, 2, 4, 0], [1, 9], [2]) == [0, 0, 0, 0, 1, 1, 1, 1, 0]


def test_truncated_span_runs_to_the_end_and_trim_keeps_loss():
    conv = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "word " * 50}]
    b = encode_sft(TOK, [conv], 40)
    assert b["loss_mask"][0, -1] == 1
    short = encode_sft(TOK, [[{"role": "user", "content": "q"}, {"role": "assistant", "content": "ok"}]], 64)
    t = trim_padding(short)
    assert t["X"].shape[1] < 63 and t["loss_mask"].sum() == short["loss_mask"].sum()


def test_tag_weights_whole_tags_inside_mask_only():
    tags = tag_token_ids(TOK)
    assert tags[0] == [30, 450, 1573, 32]  # '<','th','ink','>' in the note-era tokenizer
    text = "<|im_start|>assistant\n<think>\na<b</think>\n<answer>\n5\n</answer><|im_end|>\n"
    ids = TOK(text, add_special_tokens=False).input_ids
    Y = torch.tensor([ids[1:]])
    mask = torch.ones_like(Y)
    mask[0, :2] = 0
    w = tag_weights(Y, mask, tags)
    tag_tokens = sum(len(TOK(t, add_special_tokens=False).input_ids) for t in ("<think>", "</think>", "<answer>",
                                                                              "</answer>"))
    assert int((w == 10).sum()) == tag_tokens
    upstream = minimind_tag_weights(Y, mask, tags)
    assert int((upstream == 10).sum()) > tag_tokens  # MiniMind also hits the stray '<' pieces
    t3 = load_tokenizer("minimind-3")
    assert tag_token_ids(t3, ("<think>", "</think>")) == [[25], [26]]


def test_gsm8k_demo_rows_and_jsonl_round_trip(tmp_path):
    pre, sft, rea = gsm8k_rows("pretrain", limit=3), gsm8k_rows("sft", limit=3), gsm8k_rows("reason", limit=3)
    assert "text" in pre[0] and "<<" not in pre[0]["text"] and "The answer is 72." in pre[0]["text"]
    assert sft[0]["conversations"][1]["role"] == "assistant"
    assert rea[0]["conversations"][1]["content"].startswith("<think>\n") and "<answer>\n72\n</answer>" in \
        rea[0]["conversations"][1]["content"]
    p = write_jsonl(sft, tmp_path / "sft.jsonl")
    assert read_jsonl(p, "conversations") == [r["conversations"] for r in sft]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"txt": "x"}) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl:1.*'text'"):
        read_jsonl(bad, "text")
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        read_jsonl(tmp_path / "nope.jsonl", "text")
