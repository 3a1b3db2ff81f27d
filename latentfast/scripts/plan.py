"""``latentfast-plan``: will a training step fit a GPU, and how fast -- from a config, on any machine.

    latentfast-plan --model Qwen2.5-1.5B-Instruct --trainer hrpo --lora_rank 32 --micro_batch 8 \\
        --grad_accum 4 --prompt_len 512 --completion_len 512 --beta 0.005 --device 4090
    latentfast-plan --model path/to/config.json --trainer sft --micro_batch 16 --completion_len 2048 --device a100-40
    latentfast-plan --compare ...        # also the peers' way (full logits, two-pass HRPO) side by side
    latentfast-plan --tables             # the README's predicted tables (seed-note settings, 4090 and A100)

The step runs on fake tensors (no weights, no GPU, nothing downloaded): peak memory by
category, whether it fits, headroom, a roofline step time, and when it does not fit the
changes that would make it fit, each planned again.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

from latentfast.choices import PLAN_IMPLS
from latentfast.plan import devices as D

from latentfast.train.config import Config, check, option

# the planner and its steps (fake tensors: torch) load after parsing: --help and argument errors stay light
if TYPE_CHECKING:
    from latentfast.plan.steps import Workload

# trainer names users type -> planner family
TRAINERS = {"hrpo": "hrpo", "grpo": "grpo", "spo": "grpo", "ppo": "ppo", "dpo": "dpo", "codi": "codi",
            "kv_distill": "kv", "multi_teacher": "kv", "kv": "kv", "sft": "sft", "pretrain": "sft",
            "full_sft": "sft", "lora": "sft", "distill_reason": "sft", "distillation": "distill", "distill": "distill"}

# trainer names users type -> the trainer whose own step runs (``latentfast.plan.trainers``)
OWN_STEP = {"sft": "sft", "pretrain": "pretrain", "full_sft": "full_sft", "lora": "lora",
            "distill_reason": "distill_reason", "distillation": "distillation", "distill": "distillation",
            "spo": "minimind_spo", "ppo": "minimind_ppo"}  # (grpo: train/rl's; MiniMind's with --plan on its stage)


@dataclass
class PlanConfig(Config):
    """latentfast-plan: memory and step-time planner (fake tensors; no GPU needed)."""

    model: str = option("Qwen2.5-1.5B-Instruct", "named public config (Qwen2.5-0.5B/1.5B/7B, Llama-3.2-1B/3B, "
                        "gemma-3-270m/1b, minimind-640x12-moe, ...) or a config.json / model folder",
                        aliases=("model_name", "model_name_or_path"))
    trainer: str = option("hrpo", "trainer", choices=sorted(TRAINERS))
    impl: str = option("latentfast", "latentfast = fused lm_head losses; recipe = the peers' full-logits step",
                       choices=list(PLAN_IMPLS))
    micro_batch: int = option(8, "sequences per micro-batch (RL: completions; DPO: chosen + rejected)",
                              aliases=("per_device_train_batch_size", "batch_size"))
    grad_accum: int = option(1, "micro-batches per optimizer step", aliases=("gradient_accumulation_steps",))
    prompt_len: int = option(512, "RL: prompt tokens", aliases=("max_prompt_length",))
    completion_len: int = option(512, "RL: new tokens; other trainers: sequence length",
                                 aliases=("max_completion_length", "max_seq_len", "seq_len"))
    lora_rank: int = option(0, "LoRA rank (0 = full fine-tuning with fp32 master weights)")
    gradient_checkpointing: bool = option(False, "recompute decoder layers in backward")
    bf16: bool = option(True, "bf16 autocast (LoRA bases in bf16)")
    beta: float = option(0.0, "RL: KL coefficient (> 0 = reference log-probs)")
    teachers: list[str] = option([], "distillation / KV distillation teachers (named configs or config.json)")
    reward_model: bool = option(False, "a frozen reward model (internlm2-1.8b shapes) scores the rollouts")
    chunk_rows: int = option(0, "rows per fused lm_head chunk (0 = the op's default on the device)")
    device: str = option("4090", "4090, a100-40, a100-80, h100, h200", choices=sorted(D.DEVICES) + sorted(D.ALIASES))
    device_memory: float | None = option(None, "override the device memory (GiB)")
    options: bool = option(True, "when it does not fit, plan the changes that would make it fit")
    compare: bool = option(False, "also plan the peers' way (--impl recipe) side by side")
    tables: bool = option(False, "print the README's predicted tables (seed-note settings, 4090 and A100) and exit")

    def __post_init__(self):
        super().__post_init__()
        for name in ("micro_batch", "grad_accum", "completion_len"):
            check(getattr(self, name) >= 1, name, "an integer >= 1", getattr(self, name))
        check(self.prompt_len >= 0, "prompt_len", "an integer >= 0", self.prompt_len)
        check(self.lora_rank >= 0, "lora_rank", "an integer >= 0", self.lora_rank)
        check(self.device_memory is None or self.device_memory > 0, "device_memory", "GiB > 0", self.device_memory)
        if TRAINERS[self.trainer] in ("kv", "distill") and not self.tables:
            check(bool(self.teachers), "teachers", f"at least one teacher model for --trainer {self.trainer}",
                  self.teachers)

    def check_cli(self, parser):
        from latentfast.plan.models import config_dict

        for flag, name in [("--model", self.model), *(("--teachers", t) for t in self.teachers)]:
            try:
                config_dict(name)
            except (ValueError, OSError) as e:  # config_dict's message names --model: name the flag given
                msg = str(e)
                parser.error(flag + msg[len("--model"):] if msg.startswith("--model") else f"{flag}: {msg}")

    def workload(self) -> Workload:
        from latentfast.plan.steps import Workload

        fam = TRAINERS[self.trainer]
        return Workload(self.model, fam, self.impl, self.micro_batch, self.grad_accum,
                        self.prompt_len if fam in ("grpo", "hrpo", "ppo") else 0, self.completion_len,
                        self.lora_rank, self.gradient_checkpointing, self.bf16, self.beta, list(self.teachers),
                        self.reward_model, self.chunk_rows, trainer=OWN_STEP.get(self.trainer, ""))


def run_plan(w: Workload, device: D.Device, options: bool = True, compare: bool = False, out=print):
    from latentfast.plan.planner import format_plan, plan

    p = plan(w, device, options=options)
    out(format_plan(p))
    if compare:
        other = "recipe" if w.impl == "latentfast" else "latentfast"
        q = plan(w.replace(impl=other), device, options=False)
        out(format_plan(q))
        a, b = (p, q) if w.impl == "latentfast" else (q, p)
        out(f"side by side on {device.name} (predicted): recipe {_gb(b)} GiB ({_fit(b)}), latentfast {_gb(a)} GiB "
            f"({_fit(a)}), step ~ {a.step_s:.1f} s vs {b.step_s:.1f} s")
    return p


def _gb(p) -> str:
    return f"{(p.needed_bytes + D.CUDA_CONTEXT_BYTES) / (1 << 30):.1f}"


def _fit(p) -> str:
    return "fits" if p.fits else "does not fit"


def main(argv=None) -> int:
    cfg = PlanConfig.parse(argv, __doc__)
    if cfg.tables:
        from latentfast.plan.tables import main as tables

        return tables()
    try:
        dev = D.get_device(cfg.device, cfg.device_memory)
        w = cfg.workload()
    except ValueError as e:
        print(f"latentfast-plan: error: {e}", file=sys.stderr)
        return 2
    try:
        run_plan(w, dev, cfg.options, cfg.compare)
    except ValueError as e:  # what the trainer's own set-up refuses (a MiniMind stage on another model, ...)
        print(f"latentfast-plan: error: {e}", file=sys.stderr)
        return 2
    return 0


def cli():
    sys.exit(main())


if __name__ == "__main__":
    cli()
