"""``--plan`` on every trainer: the parsed config -> the planner's workload, printed, exit 0.

The console scripts (``latentfast.scripts``) call :func:`plan_and_exit` when ``--plan`` is
given: nothing is loaded (no weights, no data, no tokenizer; ``Config.parse`` skips the file
checks of the command line), the step that these flags describe runs on fake tensors.
``--plan_device`` / ``--plan_device_memory`` pick the GPU.
"""
from __future__ import annotations

import pathlib
import sys

from latentfast.plan import devices as D
from latentfast.plan.steps import Workload

CODI_SEQ = 256  # CODI has no fixed length: GSM8K CoT sequences of the recipe's data run ~100-250 tokens


def _model(name: str):
    """A named / local config, or the demo's tiny model (its config, vocabulary of the built-in tokenizer)."""
    if name in ("tiny", "demo", None):
        from latentfast.models.tiny import tiny_config

        return dict(tiny_config(vocab_size=512).to_dict(), model_type="qwen2", _label="the demo's tiny Qwen2")
    return name


def _minimind(cfg, hidden=None, layers=None) -> dict:
    from latentfast.models.minimind import model_config

    return model_config(cfg, hidden, layers).to_dict()


def workload_from_config(cfg) -> tuple[Workload, list[str]]:
    """The workload a trainer's config describes, and notes on what was assumed."""
    kind = type(cfg).__name__
    notes = []
    g = lambda name, default=None: getattr(cfg, name, default)  # noqa: E731
    bf16 = g("bf16") is not False
    common = dict(micro_batch=g("per_device_train_batch_size", 1), grad_accum=g("gradient_accumulation_steps", 1),
                  bf16=bf16)
    if kind == "HRPOConfig":
        w = Workload(_model(cfg.model_name), "hrpo", prompt_len=cfg.max_prompt_length,
                     completion_len=cfg.max_completion_length, lora_rank=cfg.lora_rank,
                     grad_ckpt=cfg.gradient_checkpointing, beta=cfg.beta, trainer="hrpo", config=cfg, **common)
    elif kind == "GRPOConfig" and hasattr(cfg, "num_generations") and hasattr(cfg, "model_name_or_path"):
        w = Workload(_model(cfg.model_name_or_path), "grpo", prompt_len=cfg.max_prompt_length or 512,
                     completion_len=cfg.max_completion_length, lora_rank=cfg.lora_r if cfg.use_peft else 0,
                     grad_ckpt=cfg.gradient_checkpointing, beta=cfg.beta, trainer="grpo", config=cfg, **common)
    elif kind == "DPOConfig" and hasattr(cfg, "model_name_or_path"):
        w = Workload(_model(cfg.model_name_or_path), "dpo", completion_len=cfg.max_length or 1024,
                     lora_rank=cfg.lora_r if cfg.use_peft else 0, grad_ckpt=cfg.gradient_checkpointing,
                     trainer="dpo", config=cfg, **{**common, "micro_batch": 2 * common["micro_batch"]})
    elif kind == "RLOOConfig":
        w = Workload(_model(cfg.model_name_or_path), "grpo", prompt_len=g("max_prompt_length") or 512,
                     completion_len=g("max_completion_length", 256), lora_rank=cfg.lora_r if cfg.use_peft else 0,
                     grad_ckpt=cfg.gradient_checkpointing, beta=g("beta", 0.0), trainer="rloo", config=cfg, **common)
    elif kind == "CODIConfig":
        seq = min(CODI_SEQ, cfg.max_token_num)
        w = Workload(_model(cfg.model_name), "codi", completion_len=seq, lora_rank=cfg.lora_rank,
                     num_latent=cfg.num_latent, trainer="codi", config=cfg, **common)
        notes.append(f"CODI sequences (question + CoT + answer) assumed {seq} tokens (GSM8K CoT; at most "
                     f"--max_token_num); lora rank {cfg.lora_rank}")
    elif kind == "KVDistillConfig":
        teachers = [cfg.teacher_model]
        if cfg.teachers:
            try:
                from latentfast.train.kv_distill.spec import load_teachers

                teachers = [t.model for t in load_teachers(cfg.teachers).teachers]
            except Exception as e:  # noqa: BLE001 (the plan still answers for the single teacher)
                notes.append(f"--teachers {cfg.teachers} unreadable ({e}); planned with --teacher_model")
                cfg = cfg.replace(teachers=None)
        w = Workload(_model(cfg.model_name), "kv", completion_len=cfg.max_length,
                     teachers=[_model(t) for t in teachers], trainer="kv", config=cfg, **common)
    elif kind == "SFTConfig":
        w = Workload(_model(cfg.model_name), "sft", completion_len=cfg.max_length, trainer="sft", config=cfg, **common)
    elif hasattr(cfg, "hidden_size") and hasattr(cfg, "max_seq_len"):  # MiniMind stages
        w = _minimind_workload(cfg, kind, common, notes)
    else:
        raise ValueError(f"--plan: no planner mapping for {kind}")
    return w, notes


MINIMIND_STAGES = {"PretrainArgs": "pretrain", "MiniMindArgs": "pretrain", "FullSFTArgs": "full_sft",
                   "LoRAArgs": "lora", "DistillReasonArgs": "distill_reason", "DistillationArgs": "distillation",
                   "GRPOArgs": "minimind_grpo", "SPOArgs": "minimind_spo", "PPOArgs": "minimind_ppo"}


def _minimind_workload(cfg, kind, common, notes) -> Workload:
    model = _minimind(cfg)
    dtype_bf16 = getattr(cfg, "dtype", "bfloat16") == "bfloat16"
    common = {**common, "bf16": dtype_bf16}
    own = dict(trainer=MINIMIND_STAGES[kind], config=cfg) if kind in MINIMIND_STAGES else {}
    if kind == "LoRAArgs":
        return Workload(model, "sft", completion_len=cfg.max_seq_len, lora_rank=cfg.lora_rank, **own, **common)
    if kind == "DPOArgs":  # MiniMind's own DPO (on train/rl)
        return Workload(model, "dpo", completion_len=cfg.max_seq_len, trainer="minimind_dpo", config=cfg,
                        **{**common, "micro_batch": 2 * common["micro_batch"]})
    if kind == "DistillationArgs":
        teacher = _minimind(cfg, cfg.teacher_hidden_size, cfg.teacher_num_layers)
        return Workload(model, "distill", completion_len=cfg.max_seq_len, teachers=[teacher], **own, **common)
    if kind in ("GRPOArgs", "PPOArgs", "SPOArgs"):  # the rollout stages (on train/rl)
        n = getattr(cfg, "num_generations", 1)
        fam = "ppo" if kind == "PPOArgs" else "grpo"
        rm = cfg.reward_model_path
        if rm != "none":
            notes.append(f"reward model: {rm}'s config.json (its weights are not read)" if pathlib.Path(rm).is_dir()
                         else f"reward model: --reward_model_path {rm} is not here; planned with internlm2-1.8b-reward's "
                              f"shapes (bf16), MiniMind's default")
        return Workload(model, fam, prompt_len=cfg.max_seq_len, completion_len=cfg.max_gen_len,
                        beta=getattr(cfg, "beta", getattr(cfg, "kl_coef", 0.02)), reward_model=rm != "none",
                        **own, **{**common, "micro_batch": common["micro_batch"] * n})
    return Workload(model, "sft", completion_len=cfg.max_seq_len, **own, **common)  # pretrain / full_sft / distill_reason


def plan_and_exit(cfg, out=print):
    from latentfast.plan.planner import format_plan, plan

    try:
        w, notes = workload_from_config(cfg)
        dev = D.get_device(cfg.plan_device, cfg.plan_device_memory)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    out(format_plan(plan(w, dev, options=True)))
    for n in notes:
        out(f"  note: {n}")
    raise SystemExit(0)
