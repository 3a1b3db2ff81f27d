"""latentfast-hrpo-eval on checkpoints saved by short demo runs: its metrics and generations
agree with the trainer's own held-out evaluation of the same weights, other tasks are read
from the checkpoint, and two gloo ranks give the single-process result."""
import json
import os
import pathlib

import pytest
import torch

from latentfast.data.prompts import SYSTEM_PROMPT
from latentfast.data.tasks import TASKS
from latentfast.eval import hrpo as hrpo_eval
from latentfast.train import hrpo

FIX = pathlib.Path(__file__).parent / "fixtures" / "hrpo"
SHORT = ["--sft_steps", "1", "--max_steps", "2", "--per_device_train_batch_size", "8", "--group_size", "4",
         "--max_completion_length", "12", "--eval_size", "8", "--save_steps", "0", "--seed", "5"]
COMPARED = ("accuracy", "reward", "format", "completion_length", "embeds_ratio", "thinking_fraction")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("hrpo_demo")
    hrpo.main(SHORT + ["--output_dir", str(out)])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return out, rows[-1]  # the final held-out evaluation, of the saved weights


def test_eval_entrypoint_agrees_with_the_trainers_held_out_evaluation(demo_run):
    out, final = demo_run
    m = hrpo_eval.main(["--checkpoint_path", str(out), "--batch_size", "64"])  # a run folder: its latest checkpoint
    ckpt = out / "checkpoint-2"
    assert m["checkpoint"] == str(ckpt) and m["n"] == 8 and m["task"] == "gsm8k"
    for k in COMPARED:
        assert m[k] == pytest.approx(final[f"eval_{k}"], abs=1e-9), k
    assert 0 < m["embeds_ratio"] <= 1 and m["completion_length"] > 0
    saved = json.loads((ckpt / "eval_gsm8k.json").read_text())
    assert saved["accuracy"] == m["accuracy"]
    gens = [json.loads(line) for line in (ckpt / "eval_gsm8k_generations.jsonl").read_text().splitlines()]
    assert [g["index"] for g in gens] == list(range(8))
    task = TASKS["gsm8k"]
    assert [g["reward"] for g in gens] == task.rewards["hrpo"]([g["completion"] for g in gens],
                                                               [g["gold"] for g in gens])
    assert sum(g["completion_length"] for g in gens) / 8 == pytest.approx(m["completion_length"])


def test_sampling_and_subset_options(demo_run, tmp_path, capsys):
    out, _ = demo_run
    args = ["--checkpoint_path", str(out / "checkpoint-2"), "--temperature", "1.0", "--num_samples", "4",
            "--output_dir", str(tmp_path)]
    a, b = hrpo_eval.main(args), hrpo_eval.main(args)
    assert a["n"] == 4 and not a["greedy"] and a["completion_length"] == b["completion_length"]  # seeded
    assert (tmp_path / "eval_gsm8k_generations.jsonl").exists()
    with pytest.raises(SystemExit):  # greedy and a sampling temperature exclude each other
        hrpo_eval.build_parser().parse_args(["--checkpoint_path", "x", "--greedy", "--temperature", "1"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:  # an argparse error naming the flag, before anything is loaded
        hrpo_eval.main(["--checkpoint_path", str(tmp_path)])
    assert e.value.code == 2 and "--checkpoint_path" in capsys.readouterr().err


def test_other_task_trains_and_evaluates_from_the_checkpoint(tmp_path):
    out = tmp_path / "mmlu"
    argv = ["--task", "mmlu_stem", "--train_data", str(FIX / "mmlu.jsonl"), "--eval_data", str(FIX / "mmlu_stem.jsonl"),
            "--system_prompt", SYSTEM_PROMPT, "--sft_steps", "0", "--max_steps", "1", "--per_device_train_batch_size",
            "4", "--group_size", "4", "--max_completion_length", "6", "--max_prompt_length", "256", "--eval_size", "3",
            "--save_steps", "0", "--output_dir", str(out)]
    res = hrpo.main(argv)
    state = json.loads((out / "checkpoint-1" / "trainer_state.json").read_text())["extra"]["hrpo"]
    assert state["task"] == "mmlu_stem" and state["system_prompt"] == SYSTEM_PROMPT and state["base_model"] == "tiny"
    m = hrpo_eval.main(["--checkpoint_path", str(out / "checkpoint-1")])
    assert m["task"] == "mmlu_stem" and m["n"] == 3 and m["accuracy"] == res["eval_accuracy_after"]
    final = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    for k in COMPARED:
        assert m[k] == pytest.approx(final[f"eval_{k}"], abs=1e-9), k
    assert set(m["accuracy_by_subject"]) == {"physics", "calculus", "chemistry"}
    gens = [json.loads(line) for line in (out / "checkpoint-1" / "eval_mmlu_stem_generations.jsonl").read_text()
            .splitlines()]
    assert gens[0]["gold"] == "B" and gens[0]["question"].startswith("Question: The SI unit of force is\nOptions:")



def _worker(rank, world, port, argv, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    m = hrpo_eval.main(argv)
    pathlib.Path(out, f"rank{rank}.json").write_text(json.dumps(m))


def test_two_ranks_give_the_single_process_result(demo_run, tmp_path, two_ranks):
    out, final = demo_run
    argv = ["--checkpoint_path", str(out / "checkpoint-2"), "--batch_size", "64", "--output_dir", str(tmp_path)]
    two_ranks(_worker, argv, str(tmp_path))
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    for k in COMPARED:
        assert r0[k] == r1[k] == pytest.approx(final[f"eval_{k}"], abs=1e-6), k
    gens = (tmp_path / "eval_gsm8k_generations.jsonl").read_text().splitlines()
    assert [json.loads(g)["index"] for g in gens] == list(range(8))  # both ranks' rows, in order


@pytest.mark.parametrize("flag", ["--data", "--dataset_root", "--subset_path", "--model_name"])
def test_path_flags_fail_like_a_cli(demo_run, tmp_path, capsys, flag):
    """Each path flag is checked before the checkpoint is loaded: exit 2 naming it, nothing written."""
    out, _ = demo_run
    before = sorted(p.name for p in (out / "checkpoint-2").iterdir())
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        hrpo_eval.main(["--checkpoint_path", str(out / "checkpoint-2"), flag, str(tmp_path / "missing")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and flag in err and "expected" in err and "Traceback" not in err
    assert sorted(p.name for p in (out / "checkpoint-2").iterdir()) == before
