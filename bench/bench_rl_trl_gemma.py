"""latentfast-grpo / latentfast-dpo against TRL 1.16's GRPOTrainer / DPOTrainer on google/gemma-3-270m
(issue 27's benchmark): same model folder, data, batch, group size, lengths and LoRA settings.

    python bench/bench_rl_trl_gemma.py                      # both algorithms, both sides, -> bench/results/
    python bench/bench_rl_trl_gemma.py --side ours --algo grpo --steps 3     # one side (what the driver runs)

Each side runs in its own process (so peak memory is its own). Per optimizer step: wall
seconds and CPU seconds (user + sys of the process: less sensitive to other jobs on a shared
machine), the median over the steps after a warm-up step; for GRPO the rollout (generation +
reward) apart. Memory: the process's peak RSS (``ru_maxrss``, model included) and the peak
above the RSS just before training (a 5 ms sampler), the weights paged in first on both sides
(the safetensors file is memory-mapped). Both sides: fp32 on the CPU, LoRA r/alpha/
dropout on q/k/v/o, gradient checkpointing (TRL's default), constant learning rate, the
few-shot arithmetic prompts (``latentfast.train.rl.data``) and the same ``accuracy`` reward
function (TRL signature); TRL's defaults for everything else (HF ``generate``, full logits).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import resource
import statistics
import subprocess
import sys
import time

from measure import PeakRSS, record_time  # (bench/ is the script's folder: first on sys.path)

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def touch(model) -> None:
    """Page in every weight (safetensors are memory-mapped: the first forward would otherwise add
    the whole model file to the RSS and count it as training memory)."""
    import torch

    with torch.no_grad():
        for p in model.parameters():
            p.float().sum()


def med(xs):
    return statistics.median(xs[1:]) if len(xs) > 1 else (xs[0] if xs else None)


# ---------------------------------------------------------------------------- TRL
def run_trl(a) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback

    from latentfast.train.rl.data import load_dataset_rows
    from latentfast.train.rl.rewards import accuracy

    times, cpus, rollout = [], [], []

    class Clock(TrainerCallback):
        def on_step_begin(self, *_, **__):
            self.t0, self.c0 = time.perf_counter(), cpu_s()

        def on_step_end(self, *_, **__):
            times.append(time.perf_counter() - self.t0)
            cpus.append(cpu_s() - self.c0)

    peft = LoraConfig(r=a.lora_r, lora_alpha=a.lora_alpha, lora_dropout=0.05, target_modules=TARGETS,
                      task_type="CAUSAL_LM")
    common = dict(output_dir=a.out, gradient_accumulation_steps=1, max_steps=a.steps + 1, learning_rate=a.lr,
                  lr_scheduler_type="constant", warmup_steps=0, logging_steps=1000, save_strategy="no", report_to=[],
                  use_cpu=True, bf16=False, seed=0, dataloader_num_workers=0, disable_tqdm=True,
                  gradient_checkpointing=True)
    if a.algo == "grpo":
        from trl import GRPOConfig, GRPOTrainer

        rows = load_dataset_rows("arithmetic", n=a.batch * (a.steps + 2))
        ds = Dataset.from_list(rows)
        cfg = GRPOConfig(**common, per_device_train_batch_size=a.batch * a.gens, num_generations=a.gens,
                         max_completion_length=a.gen_len, beta=a.beta, temperature=1.0, shuffle_dataset=False)
        trainer = GRPOTrainer(model=a.model, reward_funcs=[accuracy], args=cfg, train_dataset=ds,
                              peft_config=peft, callbacks=[Clock()])
        record_time(trainer, "_generate_and_score_completions", rollout)  # TRL's rollout + scoring
    else:
        from trl import DPOConfig, DPOTrainer

        rows = load_dataset_rows("arithmetic_pairs", n=a.batch * (a.steps + 2))
        cfg = DPOConfig(**common, per_device_train_batch_size=a.batch, beta=0.1, max_length=a.max_len)
        trainer = DPOTrainer(model=a.model, args=cfg, train_dataset=Dataset.from_list(rows), peft_config=peft,
                             callbacks=[Clock()])
    torch.set_num_threads(a.threads)
    touch(trainer.model)
    with PeakRSS() as mem:
        trainer.train()
    import trl

    return dict(step_s=med(times), cpu_s=med(cpus), rollout_s=med(rollout), peak_mb=mem.mb, max_rss_mb=max_rss_mb(),
                steps=len(times), all_step_s=times, trl=trl.__version__)


# ---------------------------------------------------------------------------- ours
def run_ours(a) -> dict:
    import torch

    from latentfast.train.rl.dpo import DPO, DPOConfig
    from latentfast.train.rl.grpo import GRPO, GRPOConfig

    rollout, cpus, mem = [], [], PeakRSS()

    def loaded(model):  # the sampler's base after the model is loaded and paged in, as on TRL's side
        touch(model)
        mem.base = mem.peak = mem.proc.memory_info().rss

    common = dict(model_name_or_path=a.model, use_peft=True, lora_r=a.lora_r, lora_alpha=a.lora_alpha,
                  lora_dropout=0.05, lora_target_modules=TARGETS, gradient_checkpointing=True, dtype="float32",
                  device="cpu", logging_steps=0, save_steps=0, max_steps=a.steps + 1, lr=a.lr,
                  lr_scheduler_type="constant", warmup_ratio=0.0, output_dir=a.out, seed=0)
    if a.algo == "grpo":
        class Bench(GRPO):
            def build_model(self):
                m = super().build_model()
                loaded(m)
                return m

            def batches(self, step):
                self.c0 = cpu_s()
                t0 = time.perf_counter()
                out = super().batches(step)
                rollout.append(time.perf_counter() - t0)
                return out

            def step_metrics(self, row):
                super().step_metrics(row)
                cpus.append(cpu_s() - self.c0)

        cfg = GRPOConfig(**common, dataset_name="arithmetic", per_device_train_batch_size=a.batch * a.gens,
                         num_generations=a.gens, max_completion_length=a.gen_len, beta=a.beta, temperature=1.0,
                         reward_funcs=["accuracy"])
    else:
        class Bench(DPO):
            def build_model(self):
                m = super().build_model()
                loaded(m)
                return m

            def batches(self, step):
                self.c0 = cpu_s()
                return super().batches(step)

            def step_metrics(self, row):
                super().step_metrics(row)
                cpus.append(cpu_s() - self.c0)

        cfg = DPOConfig(**common, dataset_name="arithmetic_pairs", per_device_train_batch_size=a.batch, beta=0.1,
                        max_length=a.max_len)
    torch.set_num_threads(a.threads)
    trainer = Bench(cfg)
    with mem:
        res = trainer.fit()
    times = [r["step_s"] for r in res["history"]]
    return dict(step_s=med(times), cpu_s=med(cpus), rollout_s=med(rollout), peak_mb=mem.mb, max_rss_mb=max_rss_mb(),
                steps=len(times), all_step_s=times)


# ---------------------------------------------------------------------------- driver
def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--side", choices=("ours", "trl"))
    p.add_argument("--algo", choices=("dpo", "grpo"), nargs="+", default=["grpo", "dpo"])
    p.add_argument("--model", default=None, help="gemma-3-270m folder (default: convert / reuse the cache)")
    p.add_argument("--batch", type=int, default=2, help="prompts (GRPO) / pairs (DPO) per step")
    p.add_argument("--gens", type=int, default=4)
    p.add_argument("--gen_len", type=int, default=32)
    p.add_argument("--max_len", type=int, default=256)
    p.add_argument("--beta", type=float, default=0.0)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--lora_r", type=int, default=8)
    p.add_argument("--lora_alpha", type=int, default=16)
    p.add_argument("--steps", type=int, default=2, help="timed steps (after one warm-up step)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="/tmp/latentfast_bench_rl_gemma")
    p.add_argument("--results", default=str(ROOT / "bench" / "results" / "rl_vs_trl_gemma_cpu.json"))
    a = p.parse_args()
    if a.model is None:
        from latentfast.models.gemma3_270m import gemma3_270m_path

        a.model = gemma3_270m_path()
    keys = ("model", "batch", "gens", "gen_len", "max_len", "beta", "lr", "lora_r", "lora_alpha", "steps", "threads")
    if a.side:
        a.algo = a.algo[0]
        res = run_ours(a) if a.side == "ours" else run_trl(a)
        print("RESULT " + json.dumps(res), flush=True)
        return
    env = {**os.environ, "LATENTFAST_COMPILE": "0", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT)}
    rows, loads = {}, {}
    for algo in a.algo:
        for side in ("trl", "ours"):
            args = [sys.executable, __file__, "--side", side, "--algo", algo] + [
                f"--{k}={getattr(a, k)}" for k in keys] + [f"--out={a.out}/{algo}_{side}"]
            load0 = os.getloadavg()[0]
            out = subprocess.run(args, capture_output=True, text=True, env=env)
            line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
            if out.returncode or not line:
                sys.exit(f"{side} {algo} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
            rows[(algo, side)] = json.loads(line[-1][7:])
            loads[(algo, side)] = (load0, os.getloadavg()[0])
            print(algo, side, rows[(algo, side)], "load", loads[(algo, side)], flush=True)
    import torch

    table = []
    for algo in a.algo:
        t, o = rows[(algo, "trl")], rows[(algo, "ours")]
        r = dict(algo=algo, trl_step_s=t["step_s"], ours_step_s=o["step_s"], speedup=t["step_s"] / o["step_s"],
                 trl_cpu_s=t["cpu_s"], ours_cpu_s=o["cpu_s"], cpu_speedup=t["cpu_s"] / o["cpu_s"],
                 trl_peak_mb=t["peak_mb"], ours_peak_mb=o["peak_mb"], peak_ratio=o["peak_mb"] / max(t["peak_mb"], 1e-9),
                 trl_max_rss_mb=t["max_rss_mb"], ours_max_rss_mb=o["max_rss_mb"],
                 max_rss_ratio=o["max_rss_mb"] / t["max_rss_mb"], load_trl=loads[(algo, "trl")],
                 load_ours=loads[(algo, "ours")], trl_steps_s=t["all_step_s"], ours_steps_s=o["all_step_s"])
        if algo == "grpo":
            r.update(trl_rollout_s=t["rollout_s"], ours_rollout_s=o["rollout_s"],
                     trl_train_s=t["step_s"] - t["rollout_s"], ours_train_s=o["step_s"] - o["rollout_s"])
        table.append(r)
    settings = {k: getattr(a, k) for k in keys}
    meta = dict(machine=f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs shared by several "
                        f"agents (load averages beside each row)", torch=torch.__version__,
                trl=rows[(a.algo[0], "trl")].get("trl"), dtype="float32", model="google/gemma-3-270m (GGUF Q4_K_M "
                "dequantised to fp32; 268M parameters, vocabulary 262,144)", settings=settings,
                notes="GRPO: batch prompts x gens completions per optimizer step, gen_len new tokens (the base model "
                      "never writes EOS, so every completion is gen_len long), loss dapo, beta 0, temperature 1. "
                      "DPO: batch pairs per step, sigmoid, beta 0.1; reference = the adapter disabled on both sides. "
                      "LoRA r/alpha on q/k/v/o, dropout 0.05, gradient checkpointing on both sides (TRL's default).")
    out = pathlib.Path(a.results)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(meta=meta, results=table), indent=2))
    lines = [f"# latentfast-grpo / -dpo vs TRL {meta['trl']} on gemma-3-270m, CPU fp32 ({meta['machine']}, "
             f"torch {meta['torch']})", "", f"settings: {json.dumps(settings)}", "",
             "| algo | TRL s/step | ours s/step | speed-up | TRL CPU s/step | ours CPU s/step | CPU speed-up | "
             "TRL peak RSS MB | ours peak RSS MB | ours/TRL | TRL peak above start MB | ours | ours/TRL | "
             "rollout TRL / ours s | load (1-min) TRL / ours |", "|" + "---|" * 15]
    for r in table:
        ro = (f"{r['trl_rollout_s']:.1f} / {r['ours_rollout_s']:.1f}" if "trl_rollout_s" in r else "-")
        lines.append(f"| {r['algo']} | {r['trl_step_s']:.1f} | {r['ours_step_s']:.1f} | {r['speedup']:.2f}x | "
                     f"{r['trl_cpu_s']:.1f} | {r['ours_cpu_s']:.1f} | {r['cpu_speedup']:.2f}x | "
                     f"{r['trl_max_rss_mb']:.0f} | {r['ours_max_rss_mb']:.0f} | {r['max_rss_ratio']:.2f} | "
                     f"{r['trl_peak_mb']:.0f} | {r['ours_peak_mb']:.0f} | {r['peak_ratio']:.2f} | {ro} | "
                     f"{r['load_trl'][0]:.1f}-{r['load_trl'][1]:.1f} / {r['load_ours'][0]:.1f}-{r['load_ours'][1]:.1f} |")
    lines += ["", meta["notes"]]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
