"""The planner against a real step on this CPU, per trainer (``latentfast.plan.validate``).

    python bench/plan_validation.py          # writes bench/results/plan_validation.md

Each row runs the trainer's own step (``latentfast.plan.trainers``) twice: on real CPU tensors,
its peak taken from the CPU allocator's events (``torch.profiler``, second step), and on fake
tensors (the prediction). A 2-layer Qwen2 (hidden 64, vocab 2048) or MiniMind (hidden 64, MoE),
4 sequences x 48 tokens (RL: 32 + 48), accumulation 2, fp32 (MiniMind's rollout stages: a 1-layer
Llama reward model, hidden 32) -- the cases of tests/test_plan.py.

On a GPU (``bench/gpu_suite.sh`` runs it):

    python bench/plan_validation.py --device cuda --out DIR [--card h100] [--only sft,grpo] [--steps 3]

runs each case's trainer step on real CUDA tensors at GPU shapes (``GPU_MODEL`` / ``GPU_MM``,
``GPU_SHAPES``: bf16), one warm-up step, then ``--steps`` measured: peak =
``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``, step time = their wall
time between ``torch.cuda.synchronize()`` calls; against the planner's answer for the same
workload on the card (``--card``, else the one ``torch.cuda.get_device_name()`` names): its
allocator peak (tensors, before the 5 % reserve and the CUDA context it adds) and its roofline
step time. Writes DIR/plan_validation_cuda.md and .json after every case (a timeout keeps the
rows done).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile
import time

os.environ.setdefault("TRITON_INTERPRET", "0")  # the fused ops' native CPU path

from latentfast.plan.steps import Workload  # noqa: E402
from latentfast.plan.validate import measured_peak, predicted_peak  # noqa: E402
from latentfast.plan import validate as V  # noqa: E402

SMALL = dict(model_type="qwen2", hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=2048, tie_word_embeddings=True, max_position_embeddings=1024)
MM = dict(model_type="minimind", hidden_size=64, num_hidden_layers=2, use_moe=True)
RM = dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
          num_key_value_heads=1, vocab_size=1024, max_position_embeddings=512, dtype="float32")  # a reward model


def cases(small, MM=MM, RM=RM):  # noqa: N803 (the module's names, GPU shapes for --device cuda)
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


# GPU shapes: big enough that the step's tensors dwarf the allocator's small blocks, quick on
# an H100 (the whole run a few minutes, mostly the fake plans and the compiled decode steps)
GPU_MODEL = dict(model_type="qwen2", hidden_size=768, intermediate_size=2048, num_hidden_layers=4,
                 num_attention_heads=12, num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=True,
                 max_position_embeddings=2048)
GPU_MM = dict(model_type="minimind", hidden_size=512, num_hidden_layers=4, use_moe=True)
GPU_RM = dict(RM, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=6400, dtype="bfloat16")
GPU_SHAPES = dict(micro_batch=4, grad_accum=2, prompt_len=128, rl_completion_len=128, completion_len=256)
# on CUDA one case per distinct step (rloo = grpo's, full_sft / distill_reason = pretrain's, spo = grpo's)
# (in this order; CODI last: its fake step is the slowest to plan, a timeout then costs only it)
GPU_CASES = ("latentfast-sft", "latentfast-kv-distill", "latentfast-kv-distill, 2 teachers",
             "latentfast-grpo LoRA r4, beta 0.04", "latentfast-grpo, checkpointing", "latentfast-dpo",
             "latentfast-hrpo LoRA r4, beta 0.005", "minimind pretrain (MoE)", "minimind lora r4 (MoE)",
             "minimind distillation (MoE teacher)", "minimind dpo (MoE)", "minimind grpo (MoE), 1 x 4 gen, reward model",
             "minimind ppo (MoE), critic, reward model", "latentfast-codi LoRA r4")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="cpu: bench/results/plan_validation.md; cuda: the real step on the GPU")
    ap.add_argument("--out", default=None, help="folder for plan_validation_cuda.md/.json (cuda; default $OUT "
                                                "or bench/results)")
    ap.add_argument("--card", default=None, help="the planner's card for the prediction (default: the GPU's name)")
    ap.add_argument("--only", default=None, help="comma-separated substrings of case labels (cuda)")
    ap.add_argument("--steps", type=int, default=3, help="measured steps after the warm-up (cuda)")
    ap.add_argument("--gpu_shapes", action="store_true",
                    help="cpu: the --device cuda cases and shapes on this CPU (the CPU's own choices: fp32 where "
                         "--dtype auto), measured and planned for the CPU: bench/results/plan_validation_gpu_shapes.md")
    args = ap.parse_args(argv)
    if args.device == "cuda":
        return main_cuda(args)
    if args.gpu_shapes:
        return main_gpu_shapes_on_cpu(args)
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
    out.write_text(__doc__.split("\n\n", 2)[2].split("\n\n")[0].strip() + "\n\n" + text)
    print(f"written to {out}")
    return 0


def main_gpu_shapes_on_cpu(args) -> int:
    """``--device cuda``'s cases at its shapes, run and planned on this CPU (``validate.measured_peak`` /
    ``predicted_peak``): the planner at larger shapes where it can be measured here."""
    rows = ["| case | measured peak | predicted | ratio |", "|---|---|---|---|"]
    for label, w in gpu_cases(args.only):
        t0 = time.process_time()
        m, p = measured_peak(w), predicted_peak(w)
        rows.append(f"| {label} | {m / 2**20:.1f} MiB | {p / 2**20:.1f} MiB | {p / m:.3f} |")
        print(rows[-1], f"({time.process_time() - t0:.0f} CPU s)", flush=True)
    s = GPU_SHAPES
    head = (f"The cases of `--device cuda` at its shapes (Qwen2 {GPU_MODEL['hidden_size']}x{GPU_MODEL['num_hidden_layers']}, "
            f"vocab {GPU_MODEL['vocab_size']} / MiniMind {GPU_MM['hidden_size']}x{GPU_MM['num_hidden_layers']} MoE; "
            f"{s['micro_batch']} x {s['completion_len']} tokens, RL {s['micro_batch']} x ({s['prompt_len']} + "
            f"{s['rl_completion_len']}), accumulation {s['grad_accum']}), run and planned on this CPU "
            "(`python bench/plan_validation.py --gpu_shapes`): the trainers' CPU choices (fp32 weights where "
            "`--dtype auto`, bf16 autocast where the trainer has it), measured with the CPU allocator's events "
            "(`torch.profiler`, second step) against the fake step planned for the CPU. Ratio: predicted / measured.")
    out = pathlib.Path("bench/results/plan_validation_gpu_shapes.md")
    out.write_text(head + "\n\n" + "\n".join(rows) + "\n")
    print(f"written to {out}")
    return 0


def gpu_cases(only=None):
    """(label, workload) at GPU shapes: the CPU cases' trainers and switches, bf16."""
    tmp = pathlib.Path(tempfile.mkdtemp())
    (tmp / "config.json").write_text(json.dumps(GPU_MODEL))
    listed = cases(str(tmp / "config.json"), GPU_MM, GPU_RM)
    s = GPU_SHAPES
    out = []
    for label, w in sorted(((lb, w) for lb, w in listed if lb in GPU_CASES), key=lambda c: GPU_CASES.index(c[0])):
        if only and not any(o.strip() and o.strip() in label for o in only.split(",")):
            continue
        w = w.replace(micro_batch=s["micro_batch"], grad_accum=s["grad_accum"], prompt_len=s["prompt_len"] if w.rl else 0,
                      completion_len=s["rl_completion_len"] if w.rl else s["completion_len"], bf16=True)
        out.append((label, w))
    return out


def _ratio(a, b):
    return None if not a or b is None else b / a


def cuda_report(results: list, info: dict) -> str:
    """The markdown of ``main_cuda``: a header saying what ran and what is compared, one row per case."""
    mib = lambda b: f"{b / 2**20:.1f} MiB" if b is not None else "-"  # noqa: E731
    sec = lambda x: f"{x:.4f}" if x is not None else "-"  # noqa: E731
    rat = lambda x: f"{x:.3f}" if x is not None else "-"  # noqa: E731
    lines = [f"Planner vs a real step on {info['gpu']} (planned as {info['card']}); torch {info['torch']}, "
             f"CUDA {info['cuda']}; bf16; {info['shapes']}.",
             "Measured peak: `torch.cuda.max_memory_allocated()` over the measured steps after "
             "`reset_peak_memory_stats()` (one warm-up step first). Predicted: the planner's allocator peak "
             "(the fake step's tensors, the rollout pool included), before its assumed "
             f"{info['reserve']:.0%} rounding reserve and {info['context_gib']:.1f} GiB CUDA context. Step: wall "
             f"time of {info['steps']} steps between `torch.cuda.synchronize()` calls, per step, against the "
             "planner's roofline (a lower bound: launch and Python overhead not counted). Ratios: predicted / measured.",
             "",
             "| case | measured peak | predicted | ratio | measured step s | predicted step s | ratio |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        if r.get("error"):
            lines.append(f"| {r['case']} | failed: {r['error']} | | | | | |")
            continue
        lines.append(f"| {r['case']} | {mib(r['measured_peak_bytes'])} | {mib(r['predicted_peak_bytes'])} | "
                     f"{rat(r['peak_ratio'])} | {sec(r['measured_step_s'])} | {sec(r['predicted_step_s'])} | "
                     f"{rat(r['step_ratio'])} |")
    return "\n".join(lines) + "\n"


def main_cuda(args) -> int:
    import torch

    if not torch.cuda.is_available():
        print(f"--device cuda: no CUDA device here (torch {torch.__version__}, torch.cuda.is_available() is "
              f"False); run it on a GPU machine (bench/gpu_suite.sh), or use --device cpu", file=sys.stderr)
        return 2
    if args.steps < 1:
        print(f"--steps: expected >= 1, got {args.steps}", file=sys.stderr)
        return 2
    try:
        dev = V.card_for_current_gpu(args.card)
    except ValueError as e:
        print(e, file=sys.stderr)
        return 2
    listed = gpu_cases(args.only)
    if not listed:
        print(f"--only {args.only!r}: no case label contains it", file=sys.stderr)
        return 2
    from latentfast.plan import devices as D

    s = GPU_SHAPES
    info = dict(gpu=torch.cuda.get_device_name(), card=dev.name, torch=torch.__version__, cuda=torch.version.cuda,
                steps=args.steps, reserve=D.ALLOCATOR_OVERHEAD, context_gib=D.CUDA_CONTEXT_BYTES / 2**30,
                shapes=f"Qwen2 {GPU_MODEL['hidden_size']}x{GPU_MODEL['num_hidden_layers']} (vocab "
                       f"{GPU_MODEL['vocab_size']}) / MiniMind {GPU_MM['hidden_size']}x{GPU_MM['num_hidden_layers']} "
                       f"MoE, {s['micro_batch']} x {s['completion_len']} tokens (RL: {s['micro_batch']} x "
                       f"({s['prompt_len']} + {s['rl_completion_len']})), accumulation {s['grad_accum']}")
    out = pathlib.Path(args.out or os.environ.get("OUT") or "bench/results")
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for label, w in listed:
        t0 = time.perf_counter()
        row = {"case": label}
        try:
            m = V.run_trainer_step(w, "cuda", steps=args.steps)
            p = V.predicted_on_card(w, dev)
            row.update(measured_peak_bytes=m["peak_bytes"], predicted_peak_bytes=p["peak_bytes"],
                       predicted_needed_bytes=p["needed_bytes"], peak_ratio=_ratio(m["peak_bytes"], p["peak_bytes"]),
                       measured_step_s=m["step_s"], predicted_step_s=p["step_s"],
                       step_ratio=_ratio(m["step_s"], p["step_s"]))
        except Exception as e:  # one case failing is a row, not the end of the run
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        finally:
            torch.cuda.empty_cache()
        row["seconds"] = time.perf_counter() - t0
        results.append(row)
        (out / "plan_validation_cuda.md").write_text(cuda_report(results, info))
        (out / "plan_validation_cuda.json").write_text(json.dumps({"info": info, "results": results}, indent=1))
        print(cuda_report([row], info).splitlines()[-1], f"({row['seconds']:.0f} s)", flush=True)
    print(f"written to {out / 'plan_validation_cuda.md'}")
    return 1 if any(r.get("error") for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
