"""Data that would train on garbage is refused at load, naming file, line and field (issue 26):
non-string texts, all-empty texts, a NaN / null question, undecodable bytes, an over-long line."""
import json

import pytest

from latentfast.data import jsonl
from latentfast.data.gsm8k import load_jsonl
from latentfast.data.minimind import read_jsonl
from latentfast.data.minimind_rl import read_dpo


def _write(path, lines):
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


@pytest.mark.parametrize("bad,kind", [(None, "null"), (7, "a number"), ({"a": 1}, "an object"), ([1], "a list"),
                                      (True, "a boolean")])
def test_minimind_text_that_is_not_a_string_names_line_and_field(tmp_path, bad, kind):
    f = _write(tmp_path / "p.jsonl", [{"text": "ok"}, {"text": bad}])
    with pytest.raises(ValueError, match=rf"p\.jsonl:2: field 'text' must be a string, got {kind}"):
        read_jsonl(f, "text")


def test_all_empty_texts_are_an_error_some_are_a_warning(tmp_path):
    f = _write(tmp_path / "p.jsonl", [{"text": ""}, {"text": "  "}])
    with pytest.raises(ValueError, match=r"p\.jsonl: every 'text' is empty \(2 rows\)"):
        read_jsonl(f, "text")
    f = _write(tmp_path / "q.jsonl", [{"text": ""}, {"text": "hello"}])
    with pytest.warns(RuntimeWarning, match=r"1 of 2 rows have an empty 'text' \(lines 1\)"):
        assert read_jsonl(f, "text") == ["", "hello"]


def test_conversation_turns_are_checked(tmp_path):
    good = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    f = _write(tmp_path / "s.jsonl", [{"conversations": good},
                                     {"conversations": [{"role": "user", "content": {"x": 1}}]}])
    with pytest.raises(ValueError, match=r"s\.jsonl:2: field 'conversations\[0\]\.content' must be a string"):
        read_jsonl(f, "conversations")
    f = _write(tmp_path / "e.jsonl", [{"conversations": [{"role": "user", "content": "q"},
                                                         {"role": "assistant", "content": ""}]}])
    with pytest.raises(ValueError, match="every assistant 'content' is empty"):
        read_jsonl(f, "conversations")
    tool = [{"role": "user", "content": "q"}, {"role": "assistant", "content": None, "tool_calls": [{"x": 1}]},
            {"role": "assistant", "content": "done"}]
    assert read_jsonl(_write(tmp_path / "t.jsonl", [{"conversations": tool}]), "conversations") == [tool]
    f = _write(tmp_path / "d.jsonl", [{"chosen": good, "rejected": [{"role": "assistant", "content": None}]}])
    with pytest.raises(ValueError, match=r"d\.jsonl:1: field 'rejected\[0\]\.content' must be a string, got null"):
        read_dpo(f)


@pytest.mark.parametrize("line,msg", [('{"question": NaN, "answer": "1"}', "field 'question' must be a string, got "
                                       "the number nan"),
                                      ('{"question": null, "answer": "1"}', "field 'question' must be a string, got null"),
                                      ('{"question": " ", "answer": "1"}', "field 'question' is empty"),
                                      ('{"question": "q", "answer": {"a": 1}}', "field 'answer' must be a string")])
def test_bad_question_or_answer_names_the_row(tmp_path, line, msg):
    f = _write(tmp_path / "g.jsonl", ['{"question": "q", "answer": "1"}', line])
    with pytest.raises(ValueError, match=rf"g\.jsonl:2: {msg}"):
        load_jsonl(str(f))


def test_numeric_answer_is_kept_as_text(tmp_path):
    f = _write(tmp_path / "g.jsonl", ['{"question": "q", "answer": 42}'])
    assert load_jsonl(str(f))[0]["answer"] == "42"


def test_undecodable_bytes_name_the_line(tmp_path):
    f = tmp_path / "b.jsonl"
    f.write_bytes(b'{"text": "a"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"b\.jsonl:2: not UTF-8 text \(byte 0xe9"):
        read_jsonl(f, "text")


def test_over_long_line_is_an_error_without_reading_it_all(tmp_path, monkeypatch):
    monkeypatch.setattr(jsonl, "MAX_LINE_BYTES", 1000)
    monkeypatch.setattr(jsonl.iter_jsonl, "__defaults__", (1000,))
    f = _write(tmp_path / "l.jsonl", [{"text": "short"}, {"text": "x" * 5000}])
    with pytest.raises(ValueError, match=r"l\.jsonl:2: line longer than 1000 bytes"):
        read_jsonl(f, "text")
    _write(f, [{"text": "x" * 980}])  # at the limit: fine
    assert len(read_jsonl(f, "text")[0]) == 980


def test_minimind_cli_reports_bad_data_before_training(tmp_path):
    from latentfast.train.minimind.pretrain import Pretrain, PretrainArgs

    f = _write(tmp_path / "p.jsonl", [{"text": "ok"}, {"text": None}])
    cfg = PretrainArgs.from_dict(dict(hidden_size=32, num_hidden_layers=1, max_seq_len=48, batch_size=2, max_steps=2,
                                      device="cpu", dtype="float32", data_path=str(f), save_dir=str(tmp_path / "o")))
    with pytest.raises(ValueError, match=r"p\.jsonl:2: field 'text'"):
        Pretrain(cfg).fit()
    assert not list((tmp_path / "checkpoints").rglob("*.safetensors"))


def test_default_line_limit_stops_a_huge_line(tmp_path):
    f = tmp_path / "big.jsonl"
    f.write_text(json.dumps({"text": "x" * (jsonl.MAX_LINE_BYTES + 10)}) + "\n")  # 4 MiB + : the 31 MB line's kind
    with pytest.raises(ValueError, match=rf"big\.jsonl:1: line longer than {jsonl.MAX_LINE_BYTES} bytes"):
        read_jsonl(f, "text")


def test_hrpo_task_jsonl_with_bad_bytes_names_the_line(tmp_path):
    from latentfast.data.tasks import get_task

    f = tmp_path / "mmlu.jsonl"
    good = json.dumps({"question": "q", "choices": ["a", "b"], "answer": 1}).encode()
    f.write_bytes(good + b"\n" + good[:-2] + b"\xff\"}\n")
    with pytest.raises(ValueError, match=r"mmlu\.jsonl:2: not UTF-8 text"):
        get_task("mmlu").load(str(f))


def test_hrpo_nan_question_is_an_argument_error_naming_the_row(tmp_path, capsys):
    from latentfast.train import hrpo

    f = _write(tmp_path / "train.jsonl", ['{"question": "q", "answer": "1"}', '{"question": NaN, "answer": "2"}'])
    with pytest.raises(SystemExit) as e:
        hrpo.main(["--train_data", str(f), "--output_dir", str(tmp_path / "run")])
    assert e.value.code == 2
    assert "train.jsonl:2: field 'question' must be a string, got the number nan" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
