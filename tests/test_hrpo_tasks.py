"""The HRPO recipe's prompts, rewards and tasks (HRPO ``utils.py``), on fixture rows under
tests/fixtures/hrpo/ and the shipped GSM8K sample."""
import pathlib
import re

import pytest

from latentfast.data import build_tokenizer, load_gsm8k
from latentfast.data import rewards as R
from latentfast.data.prompts import SYSTEM_PROMPT, encode_prompts, prepare_tokenizer, render_prompt
from latentfast.data.tasks import TASKS, get_task, load_task_rows, read_records
from latentfast.data.tasks.math import process_math_answer
from latentfast.data.tasks.rag import squad_normalize

FIX = pathlib.Path(__file__).parent / "fixtures" / "hrpo"
TOK = build_tokenizer()


def done(answer):  # a well-formed completion: reasoning, one marker, the answer
    return f"some reasoning\n#### {answer}"


# ----------------------------------------------------------------------------- prompts
def test_system_prompt_is_the_recipes():
    assert SYSTEM_PROMPT == (
        "A conversation between User and Assistant. The user asks a question, and the assistant solves it. The "
        "assistant first thinks about the reasoning process in the mind and then provides the user with the answer. "
        "The final answer is provided after the #### tag, i.e., {reasoning process} #### {answer}.")


def test_prompt_strings_with_and_without_chat_template():
    q = "  What is 2+3?\n"
    assert render_prompt(TOK, q) == (f"<|bos|>system\n{SYSTEM_PROMPT}<|eos|>\n<|bos|>user\nWhat is 2+3?<|eos|>\n"
                                     "<|bos|>assistant\n")
    assert render_prompt(TOK, q, system_prompt="") == "<|bos|>user\nWhat is 2+3?<|eos|>\n<|bos|>assistant\n"
    assert render_prompt(TOK, q, system_prompt="Be brief.").startswith("<|bos|>system\nBe brief.<|eos|>\n")
    assert render_prompt(TOK, q, chat_template=False) == "Question: What is 2+3?\nAnswer:\n"
    assert render_prompt(TOK, q, "Be brief.", chat_template=False) == "Be brief.\n\nQuestion: What is 2+3?\nAnswer:\n"
    # a task's user message that already asks the question is not wrapped twice
    mc = get_task("mmlu").load(str(FIX / "mmlu.jsonl"))[0]["question"]
    assert render_prompt(TOK, mc, chat_template=False) == mc + "\nAnswer:\n"


def test_encoded_prompts_are_left_padded_and_template_tokens_not_doubled():
    ids, mask = encode_prompts(TOK, ["Hi", "What is 2+3?"], 512, system_prompt="")
    assert ids.shape == mask.shape and mask[0, 0] == 0 and mask[:, -1].all()
    row = ids[1][mask[1].bool()].tolist()
    assert TOK.decode(row) == render_prompt(TOK, "What is 2+3?", system_prompt="")
    assert row.count(TOK.bos_token_id) == 2  # the template's two turn openers, no extra BOS
    short_ids, _ = encode_prompts(TOK, ["What is 2+3?"], 6, system_prompt="")
    assert TOK.decode(short_ids[0]) == TOK.decode(row[-6:])  # truncated on the left: the generation prompt stays


def test_plain_format_without_chat_template_and_pad_from_eos():
    tok = build_tokenizer()  # as a base model's: no pad token, no chat template
    tok.pad_token, tok.chat_template = None, None
    assert tok.pad_token is None and not tok.chat_template
    with pytest.raises(ValueError, match="no chat template"):
        render_prompt(tok, "q", chat_template=True)
    assert render_prompt(tok, "q") == "Question: q\nAnswer:\n"  # auto: no template -> plain, no system turn
    prepare_tokenizer(tok)
    assert tok.pad_token == tok.eos_token and tok.padding_side == "left"


# ----------------------------------------------------------------------------- the recipe's GSM8K reward
def test_gsm8k_normaliser_edge_cases():
    p = R.process_gsm8k_answer
    assert p("72") == "72" and p("$1,000.") == "0"  # numbers are found before commas go: "1,000" -> "000" -> 0
    assert p("1,234") == "234" and p("12.50") == "12.5" and p("3.0") == "3" and p("-0.50") == "-0.5"
    assert p("3/4") == "0.75" and p("48/2") == "24" and p("-3/4") == "-0.75"
    assert p("5/0") == "5/0" and p("08/2") == "08/2"  # not evaluable: kept as written
    assert p("7/") == "7" and p("it is 5 then 6.") == "6" and p("none") == ""
    assert p("12345678901234567890/10") == "1.2345678901234568e+18"  # int / int, correctly rounded


def test_one_marker_matches_the_recipes_regex():
    pattern = r"^(?:(?!####).)*####(?:(?!####).)*$"
    for s in ["####", "a #### b", "#### 1 #### 2", "#####", "######", "#######", "########", "", "no marker",
              "x\n####\n5", "# ### ## ##", "##########", "a####b####"]:
        assert R.one_marker(s) == bool(re.search(pattern, s, re.DOTALL)), s


def test_hrpo_reward_needs_correct_and_exactly_one_marker():
    gold = "4+3=7\n#### 7"
    reward, acc = R.hrpo_gsm8k_reward, get_task("gsm8k").accuracy
    comps = ["so 7.\n#### 7", "#### 7.00", "#### $7", "#### 7\n#### 7", "#### 6", "the answer is 7", "#### 7 apples"]
    assert reward(comps, [gold] * len(comps)) == [1, 1, 1, 0, 0, 0, 1]
    assert acc(comps, [gold] * len(comps)) == [1, 1, 1, 1, 0, 1, 1]  # the eval metric does not count markers
    assert reward(["#### 0.5"], ["1/2"]) == [1.0]  # a bare gold


def test_shipped_gsm8k_sample_gold_scores_one_and_doubled_marker_zero():
    rows = load_gsm8k("train") + load_gsm8k("test")
    golds = [r["answer"] for r in rows]
    hrpo = get_task("gsm8k").rewards["hrpo"]
    assert hrpo(golds, golds) == [1.0] * len(rows)
    doubled = [g + "\n#### " + g.rsplit("####", 1)[1].strip() for g in golds]
    assert hrpo(doubled, golds) == [0.0] * len(rows)
    assert R.correctness_reward(doubled, golds) == [1.0] * len(rows)  # the split reward alone does not check


# ----------------------------------------------------------------------------- tasks and loaders
def test_registry_and_reward_lookup():
    assert set(TASKS) == {"gsm8k", "math", "mmlu", "mmlu_stem", "arc_c", "openbookqa", "qasc", "rag"}
    fns = R.get_reward_funcs(["hrpo", "format"], get_task("math"))
    assert fns[0] is TASKS["math"].rewards["hrpo"]
    with pytest.raises(ValueError, match="unknown reward 'nope'"):
        R.get_reward_funcs(["nope"], get_task("rag"))
    with pytest.raises(ValueError, match="unknown task"):
        get_task("gsm9k")


def test_gsm8k_dataset_root_and_builtin_names():
    train = load_task_rows("gsm8k", None, "train", dataset_root=str(FIX / "gsm8k"))
    test = load_task_rows("gsm8k", None, "test", dataset_root=str(FIX / "gsm8k"))
    assert len(train) == 2 and len(test) == 3
    hrpo = TASKS["gsm8k"].rewards["hrpo"]
    assert hrpo([done("4.50"), done("4.5"), done("9/2")], [train[1]["answer"]] * 2 + [test[0]["answer"]]) == [1, 1, 1]
    assert len(load_task_rows("gsm8k", None, "test", 5)) == 5  # no data: the shipped sample
    assert len(load_task_rows("gsm8k", "synthetic", "test", 7, seed=1)) == 7
    with pytest.raises(ValueError, match="gsm8k data"):
        load_task_rows("math", "synthetic", "train")
    with pytest.raises(ValueError, match="needs data"):
        load_task_rows("mmlu", None, "train")


def test_math_loader_folder_and_math500_and_normaliser():
    t = TASKS["math"]
    train = load_task_rows(t, None, "train", dataset_root=str(FIX / "math"))
    test = load_task_rows(t, None, "test", dataset_root=str(FIX / "math"))
    assert len(train) == 2 and len(test) == 3 and {r["type"] for r in test} == {"Geometry", "Prealgebra"}
    golds = {r["question"]: r["answer"] for r in test}
    hrpo = t.rewards["hrpo"]
    area = golds["A square has side 3 cm. What is its area?"]
    frac = golds["Write 0.75 as a fraction."]
    root2 = golds["What is the value of $x$ if $x + 1 = \\sqrt2 + 1$?"]
    # units go (gold "9"); written bare, the last number is read: the exponent 2, as in the recipe
    assert hrpo([done("9 \\text{ cm}^2"), done("$9$"), done("\\boxed{9}"), done("$9 \\text{ cm}^2$")],
                [area] * 4) == [0, 1, 1, 1]
    # LaTeX is read inside $..$, \(..\), \[..\] or \boxed{}; bare text gives its last number (as the recipe)
    assert hrpo([done("$\\frac34$"), done("\\boxed{3/4}"), done("$\\tfrac{3}{4}$"), done("3/4"), done("\\frac34")],
                [frac] * 5) == [1, 1, 1, 0, 0]
    assert hrpo([done("$\\sqrt2$"), done("$x = \\sqrt{2}$"), done("$\\sqrt{2}$."), done("\\sqrt2")],
                [root2] * 4) == [1, 1, 1, 0]
    m500 = t.load(str(FIX / "math500.jsonl"))
    assert process_math_answer(t.gold(m500[1]["answer"])) == "(3,\\frac{\\pi}{2})"
    assert hrpo([done("$\\left( 3, \\frac{\\pi}{2} \\right)$"), done("(3, \\frac{\\pi}{2})")],
                [m500[1]["answer"]] * 2) == [1, 0]
    # the recipe's normaliser, step by step
    assert process_math_answer("The answer is \\boxed{\\frac{1}{2}}.") == "\\frac{1}{2}"
    assert process_math_answer("\\boxed{\\text{(B)}}") == "(b)" and process_math_answer("90^\\circ") == "90"
    assert process_math_answer("50\\%") == "50" and process_math_answer("\\boxed{ {.5} }") == "{0.5}"
    assert process_math_answer("\\boxed{\\frac1}") == "\\frac1"  # malformed: left as is


def test_multiple_choice_loaders_and_letters():
    mmlu = TASKS["mmlu"].load(str(FIX / "mmlu.jsonl"))
    assert mmlu[0]["question"] == "Question: What is 2 + 2?\nOptions:\nA. 3\nB. 4\nC. 5\nD. 22"
    assert [r["answer"] for r in mmlu] == ["B", "C"]  # int index or letter
    hrpo = TASKS["mmlu"].rewards["hrpo"]
    assert hrpo([done("B"), done("(B)."), done("b"), done("B is right, not a")], ["B"] * 4) == [1, 1, 1, 0]
    stem = TASKS["mmlu_stem"].load(str(FIX / "mmlu_stem.jsonl"))
    assert [r["subject"] for r in stem] == ["physics", "calculus", "chemistry"]
    arc = TASKS["arc_c"].load(str(FIX / "arc_c.jsonl"))
    assert [r["answer"] for r in arc] == ["C", "B"]  # numeric labels "1".."4" -> the letter shown
    assert "\nB. heart\n" in arc[1]["question"] + "\n"
    assert TASKS["arc_c"].load(str(FIX / "arc_ai2_original.jsonl"))[0] == arc[0]
    obqa = TASKS["openbookqa"].load(str(FIX / "openbookqa.jsonl"))
    assert obqa[0]["question"].startswith("Question: A magnet will stick to\nOptions:") and obqa[0]["answer"] == "D"
    qasc = TASKS["qasc"].load(str(FIX / "qasc.jsonl"))
    assert qasc[0]["answer"] == "F" and "\nH. sound" in qasc[0]["question"]
    assert TASKS["qasc"].rewards["hrpo"]([done("F"), done("E")], ["F", "F"]) == [1, 0]


def test_rag_prompt_topk_and_squad_match():
    rows = TASKS["rag"].load(str(FIX / "rag.jsonl"))
    assert rows[0]["question"] == (
        "Context (which may or may not be relevant):\n"
        "Eiffel Tower::::The Eiffel Tower is a wrought-iron lattice tower in Paris, France.\n"
        "Paris::::Paris is the capital of France.\nTower::::A tower is a tall structure.\n\n"
        "Question: where is the eiffel tower")
    assert squad_normalize("  The  Eiffel-Tower! ") == "eiffeltower" and squad_normalize("An apple") == "apple"
    hrpo = TASKS["rag"].rewards["hrpo"]
    assert hrpo([done("paris."), done("Paris, France"), done("London"), done("The William Shakespeare")],
                [rows[0]["answer"]] * 3 + [rows[1]["answer"]]) == [1, 1, 0, 1]


def test_loader_errors_name_the_path_and_expected_fields(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl: row 0: not a mmlu row .*'choices'.*expected rows"):
        TASKS["mmlu"].load(str(bad))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        TASKS["rag"].load(str(tmp_path / "missing.jsonl"))
    (tmp_path / "j.json").write_text('[{"question": "q", "answer": "#### 1"}]')
    assert read_records(str(tmp_path / "j.json")) == [{"question": "q", "answer": "#### 1"}]
    arc = tmp_path / "arc.jsonl"
    arc.write_text('{"question": "q", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "E"}\n')
    with pytest.raises(ValueError, match="answerKey 'E' not among the labels"):
        TASKS["arc_c"].load(str(arc))


def test_save_to_disk_folder_needs_datasets(tmp_path):
    (tmp_path / "dataset_info.json").write_text("{}")
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match=r"latentfast\[datasets\]"):
            read_records(str(tmp_path))
    else:
        pytest.skip("datasets is installed: the folder would be read")
