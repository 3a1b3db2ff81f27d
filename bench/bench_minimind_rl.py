"""MiniMind's DPO and GRPO stages against TRL's DPOTrainer / GRPOTrainer on the same model,
data, batch and settings (issue 18's benchmark).

    python bench/bench_minimind_rl.py --trl_python /path/to/venv-with-trl/bin/python
    python bench/bench_minimind_rl.py --vocab 151936 --steps 4          # the V=151936 head

Each side runs in its own subprocess (``--side ours|trl --algo dpo|grpo``) so peak memory is
its own: the peak RSS during training (a 5 ms sampler thread) minus the RSS just before the
first step. Time per optimizer step is the median after one warm-up step. For GRPO the
rollout (generation + reward scoring) is timed apart, so the table gives the step with and
without it. Both sides build the same MiniMind model from a config (seeded, tied embeddings,
``--vocab`` rows), take the same GSM8K prompts / preference pairs and the same reward
(MiniMind's format + tag rules), fp32 on the CPU. TRL runs with its defaults for everything
not listed in the results' ``settings``.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

from measure import PeakRSS, record_time  # (bench/ is the script's folder: first on sys.path)

ROOT = pathlib.Path(__file__).resolve().parent.parent


def model_config(a):
    from latentfast.models.minimind import MiniMindConfig

    return MiniMindConfig(hidden_size=a.hidden, num_hidden_layers=a.layers, vocab_size=a.vocab)


def new_model(a):
    import torch

    from latentfast.models.minimind import MiniMindForCausalLM

    torch.manual_seed(0)
    return MiniMindForCausalLM(model_config(a))


def format_tag_reward(completions, **_):
    from latentfast.data.reward_model import format_rewards, tag_rewards

    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [f + t for f, t in zip(format_rewards(texts), tag_rewards(texts))]


# ---------------------------------------------------------------------------- TRL
def run_trl(a) -> dict:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback

    from latentfast.data import minimind_rl as rldata
    from latentfast.models.minimind.tokenizer import load_tokenizer

    tok = load_tokenizer()
    model = str(pathlib.Path(a.out) / "model")  # TRL's usual input: a model path (it loads policy and reference)
    m = new_model(a)
    m.config.auto_map = {}  # TRL 1.16 reads config.auto_map for architectures outside transformers
    m.save_pretrained(model)
    tok.save_pretrained(model)
    times, rollout = [], []

    class Clock(TrainerCallback):
        def on_step_begin(self, *_, **__):
            self.t0 = time.perf_counter()

        def on_step_end(self, *_, **__):
            times.append(time.perf_counter() - self.t0)

    common = dict(output_dir=a.out, per_device_train_batch_size=a.batch, gradient_accumulation_steps=1,
                  max_steps=a.steps + 1, learning_rate=a.lr, lr_scheduler_type="constant", warmup_steps=0,
                  logging_steps=1000, save_strategy="no", report_to=[], use_cpu=True, bf16=False, seed=0,
                  dataloader_num_workers=0, disable_tqdm=True)
    if a.algo == "grpo":
        from trl import GRPOConfig, GRPOTrainer

        rows = rldata.gsm8k_prompts("train", a.batch * (a.steps + 2))
        ds = Dataset.from_list([{"prompt": rldata.rlaif_messages(r["conversations"])} for r in rows])
        cfg = GRPOConfig(**{**common, "per_device_train_batch_size": a.batch * a.gens}, num_generations=a.gens,
                         max_completion_length=a.gen_len, beta=a.beta, loss_type="grpo", temperature=0.8,
                         top_p=1.0, shuffle_dataset=False)
        trainer = GRPOTrainer(model=model, reward_funcs=[format_tag_reward], args=cfg, train_dataset=ds,
                              processing_class=tok, callbacks=[Clock()])
        record_time(trainer, "_generate_and_score_completions", rollout)  # TRL's rollout + scoring
    else:
        from trl import DPOConfig, DPOTrainer

        pairs = rldata.gsm8k_dpo_pairs("train", a.batch * (a.steps + 2))
        ds = Dataset.from_list([{"prompt": p["chosen"][:-1], "chosen": p["chosen"][-1:],
                                 "rejected": p["rejected"][-1:]} for p in pairs])
        cfg = DPOConfig(**common, beta=0.1, max_length=a.max_len)
        trainer = DPOTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok, callbacks=[Clock()])
    torch.set_num_threads(a.threads)
    with PeakRSS() as mem:
        trainer.train()
    import trl

    return dict(step_s=statistics.median(times[1:]), rollout_s=statistics.median(rollout[1:]) if rollout else None,
                peak_mb=mem.mb, steps=len(times), trl=trl.__version__)


# ---------------------------------------------------------------------------- ours
def run_ours(a) -> dict:
    import torch

    from latentfast.models.minimind import MiniMindForCausalLM

    rollout = []
    common = dict(data_path="demo", from_weight="none", hidden_size=a.hidden, num_hidden_layers=a.layers,
                  dtype="float32", device="cpu", logging_steps=0, save_steps=0, max_steps=a.steps + 1, lr=a.lr,
                  lr_scheduler_type="constant", gradient_accumulation_steps=1, save_dir=a.out + "/w",
                  output_dir=a.out + "/ckpt", weight_decay=0.0)
    if a.algo == "grpo":
        from latentfast.train.minimind.grpo import GRPO, GRPOArgs

        class Bench(GRPO):
            def new_lm(self, hidden_size=None, num_layers=None):
                return new_model(a)

            def rollout(self, *x, **k):
                t0 = time.perf_counter()
                out = super().rollout(*x, **k)
                rollout.append(time.perf_counter() - t0)
                return out

        cfg = GRPOArgs(**common, per_device_train_batch_size=a.batch, num_generations=a.gens, max_gen_len=a.gen_len,
                       max_seq_len=512, beta=a.beta, loss_type="grpo", reward_model_path="none", reasoning=1,
                       rule_rewards="none", temperature=0.8, top_p=1.0)
        trainer = Bench(cfg, save_weights=False)
    else:
        from latentfast.train.minimind.dpo import DPO, DPOArgs

        class Bench(DPO):
            def new_lm(self, hidden_size=None, num_layers=None):
                return new_model(a)

        cfg = DPOArgs(**common, per_device_train_batch_size=a.batch, max_seq_len=a.max_len, beta=0.1, dpo_logp="sum")
        trainer = Bench(cfg, save_weights=False)
    assert MiniMindForCausalLM  # the same class both sides build
    torch.set_num_threads(a.threads)
    with PeakRSS() as mem:
        res = trainer.fit()
    times = [r["step_s"] for r in res["history"]]
    return dict(step_s=statistics.median(times[1:]), rollout_s=statistics.median(rollout[1:]) if rollout else None,
                peak_mb=mem.mb, steps=len(times))


# ---------------------------------------------------------------------------- driver
def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--side", choices=("ours", "trl"))
    p.add_argument("--algo", choices=("dpo", "grpo"))
    p.add_argument("--trl_python", default=sys.executable, help="a Python with trl installed (and latentfast)")
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch", type=int, default=2, help="prompts (GRPO) / pairs (DPO) per step")
    p.add_argument("--gens", type=int, default=4)
    p.add_argument("--gen_len", type=int, default=32)
    p.add_argument("--max_len", type=int, default=256)
    p.add_argument("--beta", type=float, default=0.02)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="/tmp/latentfast_bench_rl")
    p.add_argument("--results", default=str(ROOT / "bench" / "results" / "minimind_rl_cpu.json"))
    a = p.parse_args()
    if a.side:
        res = run_ours(a) if a.side == "ours" else run_trl(a)
        print("RESULT " + json.dumps(res), flush=True)
        return
    env = {**os.environ, "LATENTFAST_COMPILE": "0", "TOKENIZERS_PARALLELISM": "false"}
    rows = {}
    for algo in ("dpo", "grpo"):
        for side in ("trl", "ours"):
            py = a.trl_python if side == "trl" else sys.executable
            args = [py, __file__, "--side", side, "--algo", algo] + [
                f"--{k}={getattr(a, k)}" for k in ("vocab", "hidden", "layers", "batch", "gens", "gen_len", "max_len",
                                                  "beta", "lr", "steps", "threads")] + [f"--out={a.out}/{algo}_{side}"]
            out = subprocess.run(args, capture_output=True, text=True, env=env)
            line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
            if out.returncode or not line:
                sys.exit(f"{side} {algo} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
            rows[(algo, side)] = json.loads(line[-1][7:])
            print(algo, side, rows[(algo, side)], flush=True)
    import platform

    import torch

    table = []
    for algo in ("dpo", "grpo"):
        t, o = rows[(algo, "trl")], rows[(algo, "ours")]
        r = dict(algo=algo, trl_step_s=t["step_s"], ours_step_s=o["step_s"], speedup=t["step_s"] / o["step_s"],
                 trl_peak_mb=t["peak_mb"], ours_peak_mb=o["peak_mb"], peak_ratio=o["peak_mb"] / max(t["peak_mb"], 1e-9))
        if algo == "grpo":
            tt, oo = t["step_s"] - t["rollout_s"], o["step_s"] - o["rollout_s"]
            r.update(trl_rollout_s=t["rollout_s"], ours_rollout_s=o["rollout_s"], trl_train_s=tt, ours_train_s=oo,
                     speedup_without_rollout=tt / oo)
        table.append(r)
    settings = {k: getattr(a, k) for k in ("vocab", "hidden", "layers", "batch", "gens", "gen_len", "max_len", "beta",
                                           "lr", "steps", "threads")}
    meta = dict(machine=f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs (shared)",
                torch=torch.__version__, trl=rows[("dpo", "trl")].get("trl"), dtype="float32", settings=settings,
                notes="TRL: DPOTrainer(loss_type sigmoid, beta 0.1, max_length) and GRPOTrainer(loss_type grpo, "
                      "num_generations, max_completion_length, beta, temperature 0.8), everything else TRL's "
                      "defaults (HF generate for rollouts, full logits). Ours: latentfast-minimind dpo (--dpo_logp "
                      "sum, TRL's form) and grpo (the fused lm_head engine, latentfast.generation rollouts). Same "
                      "MiniMind model from a config, seed 0, GSM8K prompts/pairs, MiniMind format+tag reward.")
    out = pathlib.Path(a.results)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(meta=meta, results=table), indent=2))
    lines = [f"# MiniMind DPO / GRPO vs TRL on CPU ({meta['machine']}, torch {meta['torch']}, trl {meta['trl']}, fp32)",
             "", f"settings: {json.dumps(settings)}", "",
             "| algo | TRL s/step | ours s/step | speed-up | TRL peak MB | ours peak MB | ours/TRL memory |"
             " rollout TRL / ours s | speed-up without rollout |", "|---|---|---|---|---|---|---|---|---|"]
    for r in table:
        ro = (f"{r['trl_rollout_s']:.3f} / {r['ours_rollout_s']:.3f}" if "trl_rollout_s" in r else "-")
        wo = f"{r['speedup_without_rollout']:.2f}x" if "speedup_without_rollout" in r else "-"
        lines.append(f"| {r['algo']} | {r['trl_step_s']:.3f} | {r['ours_step_s']:.3f} | {r['speedup']:.2f}x | "
                     f"{r['trl_peak_mb']:.0f} | {r['ours_peak_mb']:.0f} | {r['peak_ratio']:.2f} | {ro} | {wo} |")
    lines += ["", meta["notes"]]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
