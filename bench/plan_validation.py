"""The planner against a real step on this CPU, per trainer (``latentfast.plan.validate``).

    python bench/plan_validation.py          # writes bench/results/plan_validation.md

Each row runs the trainer's own step (``latentfast.plan.trainers``) twice: on real CPU tensors,
its peak taken from the CPU allocator's events (``torch.profiler``, second step), and on fake
tensors (the prediction). A 2-layer Qwen2 (hidden 64, vocab 2048) or MiniMind (hidden 64, MoE),
4 sequences x 48 tokens (RL: 32 + 48), accumulation 2, fp32 (MiniMind's rollout stages: a 1-layer
Llama reward model, hidden 32) -- the cases of tests/test_plan.py.
"""
from __future__ import annotations

import json
import os
import pathlib
import tempfile
import time

os.environ.setdefault("TRITON_INTERPRET", "0")  # the fused ops' native CPU path

from latentfast.plan.steps import Workload  # noqa: E402
from latentfast.plan.validate import measured_peak, predicted_peak  # noqa: E402

SMALL = dict(model_type="qwen2", hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=2048, tie_word_embeddings=True, max_position_embeddings=1024)
MM = dict(model_type="minimind", hidden_size=64, num_hidden_layers=2, use_moe=True)
RM = dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
          num_key_value_heads=1, vocab_size=1024, max_position_embeddings=512, dtype="float32")  # a reward model


def cases(small):
    mm_student = dict(MM, hidden_size=32, num_hidden_layers=1, use_moe=False)
    return [
        ("latentfast-sft", Workload(small, "sft", trainer="sft")),
        ("latentfast-kv-distill", Workload(small, "kv", teachers=[small], trainer="kv")),
        ("latentfast-kv-distill, 2 teachers", Workload(small, "kv", teachers=[small, small], trainer="kv")),
        ("latentfast-codi LoRA r4", Workload(small, "codi", lora_rank=4, trainer="codi")),
        ("latentfast-grpo LoRA r4, beta 0.04", Workload(small, "grpo", lora_rank=4, beta=0.04, trainer="grpo")),
        ("latentfast-grpo, checkpointing", Workload(small, "grpo", grad_ckpt=True, trainer="grpo")),
        ("latentfast-rloo LoRA r4, beta 0.04", Workload(small, "grpo", lora_rank=4, beta=0.04, trainer="rloo")),
        ("latentfast-dpo", Workload(small, "dpo", trainer="dpo")),
        ("latentfast-hrpo LoRA r4, beta 0.005", Workload(small, "hrpo", lora_rank=4, beta=0.005, trainer="hrpo")),
        ("minimind pretrain (MoE)", Workload(MM, "sft", trainer="pretrain")),
        ("minimind full_sft (MoE)", Workload(MM, "sft", trainer="full_sft")),
        ("minimind lora r4 (MoE)", Workload(MM, "sft", lora_rank=4, trainer="lora")),
        ("minimind distill_reason (MoE)", Workload(MM, "sft", trainer="distill_reason")),
        ("minimind distillation (MoE teacher)", Workload(mm_student, "distill", teachers=[MM], trainer="distillation")),
        ("minimind dpo (MoE)", Workload(MM, "dpo", trainer="minimind_dpo")),
        ("minimind grpo (MoE), 1 x 4 gen, reward model", Workload(MM, "grpo", beta=0.02, reward_model=RM,
                                                                   trainer="minimind_grpo")),
        ("minimind spo (MoE), 4 x 1, reward model", Workload(MM, "grpo", beta=0.02, reward_model=RM,
                                                              trainer="minimind_spo")),
        ("minimind ppo (MoE), critic, reward model", Workload(MM, "ppo", beta=0.02, reward_model=RM,
                                                               trainer="minimind_ppo")),
    ]


def main() -> int:
    small = str(pathlib.Path(tempfile.mkdtemp()) / "config.json")
    pathlib.Path(small).write_text(json.dumps(SMALL))
    rows = ["| trainer (its own step) | measured peak | predicted | ratio |", "|---|---|---|---|"]
    for label, w in cases(small):
        w = w.replace(micro_batch=4, grad_accum=2, prompt_len=32 if w.rl else 0, completion_len=48, bf16=False)
        t0 = time.perf_counter()
        m, p = measured_peak(w), predicted_peak(w)
        rows.append(f"| {label} | {m / 1e6:.2f} MB | {p / 1e6:.2f} MB | {p / m:.3f} |")
        print(rows[-1], f"({time.perf_counter() - t0:.0f} s)", flush=True)
    text = "\n".join(rows) + "\n"
    out = pathlib.Path("bench/results/plan_validation.md")
    out.write_text(__doc__.split("\n\n", 2)[2].strip() + "\n\n" + text)
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
