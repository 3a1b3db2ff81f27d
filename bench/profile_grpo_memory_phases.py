"""Where latentfast-grpo's memory goes on gemma-3-270m (CPU, fp32, LoRA r8, the settings of
bench_rl_trl_gemma.py): the process RSS above the paged-in model after each phase of a step
(rollout, loss forward, backward), sampled every 5 ms. Results: bench/results/rl_vs_trl_gemma_cpu.md.

    python bench/profile_grpo_memory_phases.py
"""
import argparse
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
argparse.ArgumentParser(description=__doc__, allow_abbrev=False,
                        formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

import bench_rl_trl_gemma as B  # noqa: E402
import torch  # noqa: E402
from measure import PeakRSS  # noqa: E402

from latentfast.models.gemma3_270m import gemma3_270m_path  # noqa: E402
from latentfast.train.rl.grpo import GRPO, GRPOConfig  # noqa: E402

torch.set_num_threads(1)
mem = PeakRSS()
log = []
class P(GRPO):
    def build_model(self):
        m = super().build_model(); B.touch(m); mem.base = mem.peak = mem.proc.memory_info().rss; return m
    def batches(self, step):
        out = super().batches(step)
        log.append(("rollout", step, (mem.peak - mem.base) / 2**20, (mem.proc.memory_info().rss - mem.base) / 2**20)); return out
    def loss(self, mb):
        r = super().loss(mb)
        log.append(("loss_fwd", (mem.peak - mem.base) / 2**20, (mem.proc.memory_info().rss - mem.base) / 2**20)); return r
    def before_optimizer_step(self):
        log.append(("backward", (mem.peak - mem.base) / 2**20, (mem.proc.memory_info().rss - mem.base) / 2**20))
        return super().before_optimizer_step()
cfg = GRPOConfig(model_name_or_path=gemma3_270m_path(), use_peft=True, lora_r=8, lora_alpha=16, lora_dropout=0.05,
                 lora_target_modules=B.TARGETS, gradient_checkpointing=True, dtype="float32", device="cpu",
                 logging_steps=0, save_steps=0, max_steps=2, lr=1e-5, lr_scheduler_type="constant", warmup_ratio=0.0,
                 output_dir="/tmp/latentfast_grpo_memory_phases", seed=0, dataset_name="arithmetic", per_device_train_batch_size=8,
                 num_generations=4, max_completion_length=32, beta=0.0, temperature=1.0, reward_funcs=["accuracy"])
t = P(cfg)
with mem:
    t.fit()
for l in log: print(l)
print("peak above base MB", mem.mb)
