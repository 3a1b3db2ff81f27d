"""Data utilities: tokenizer, synthetic task, GSM8K sample, rewards."""
from latentfast.data import (build_tokenizer, correctness_reward, extract_answer, format_prompt, format_reward,
                             load_gsm8k, make_arithmetic, normalize_number, sample_path)
from latentfast.models.tiny import build_tiny_causal_lm


def test_tokenizer_roundtrip_and_special_ids():
    tok = build_tokenizer()
    text = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72"
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text
    assert tok.answer_marker_id in ids and tok.convert_ids_to_tokens(tok.answer_marker_id) == "####"
    assert len({tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.bot_token_id, tok.eot_token_id}) == 5
    assert tok(text)["input_ids"] == build_tokenizer()(text)["input_ids"]  # deterministic


def test_synthetic_is_gsm8k_format_and_deterministic():
    rows = make_arithmetic(50, seed=3, min_steps=2, max_steps=2)
    assert rows == make_arithmetic(50, seed=3, min_steps=2, max_steps=2)
    for r in rows:
        lines = r["answer"].split("\n")
        assert len(lines) == 3 and lines[-1].startswith("#### ")
        # the worked steps are correct arithmetic
        last = lines[1].split("=")[1]
        assert extract_answer(r["answer"]) == last
        assert correctness_reward([r["answer"]], [r["answer"]]) == [1.0]


def test_named_synthetic_sets_reach_every_loader():
    import pytest

    from latentfast.data.rows import DATA_NAMES, load_rows
    from latentfast.data.synthetic import SETS, synthetic_rows
    from latentfast.data.tasks import load_task_rows

    one = synthetic_rows("synthetic_one_step", 40, seed=5)
    assert all(len(r["answer"].split("\n")) == 2 for r in one)  # one worked line, then '#### n'
    assert {len(r["answer"].split("\n")) for r in synthetic_rows("synthetic", 200, seed=5)} == {2, 3, 4}
    for name in SETS:
        assert name in DATA_NAMES and load_rows(name, 40, seed=5) == synthetic_rows(name, 40, seed=5)
        task_rows = load_task_rows("gsm8k", name, "train", 40, seed=5)
        assert [r["question"] for r in task_rows] == [r["question"] for r in synthetic_rows(name, 40, seed=5)]
    with pytest.raises(ValueError, match="synthetic_one_step"):
        synthetic_rows("synthetic_two_steps", 4)
    with pytest.raises(ValueError, match="needs a path"):
        load_task_rows("math", "synthetic_one_step", "train")


def test_gsm8k_sample_ships():
    assert len(load_gsm8k("train")) == 200 and len(load_gsm8k("test")) == 100
    assert sample_path("test").endswith("gsm8k_sample_test.jsonl")
    assert format_prompt(" Q? ").startswith("Question: Q?\n")


def test_rewards_normalisation_and_format():
    assert normalize_number("$1,000.00") == "1000"
    assert normalize_number("72.") == "72" and normalize_number("-0.50") == "-0.5"
    assert correctness_reward(["x\n#### 1,000.0", "#### $12", "no marker"], ["#### 1000", "12", "#### 3"]) == [1, 1, 0]
    assert format_reward(["#### 3", "#### 3 #### 4", "3"]) == [1.0, 0.0, 0.0]


def test_tiny_model_covers_tokenizer():
    tok = build_tokenizer()
    model = build_tiny_causal_lm(tok)
    assert model.config.vocab_size >= len(tok)
    assert model.config.pad_token_id == tok.pad_token_id
