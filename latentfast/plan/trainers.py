"""Which trainer runs a workload's step, and its config for planning.

``trainer_for(w, workdir)`` returns the trainer object (``latentfast.train``'s own class) whose
step the planner runs (``harness``). Its config is the one the user typed (``w.config``, from
``--plan``) or one made from the workload's fields (``latentfast-plan``); either way the planner
changes only what a plan cannot read or needs at its maximum:

- data: a file written here whose rows fill the configured lengths (answers / texts / prompts of
  ``max_length`` tokens or more), so every sequence of the step is as long as the flags allow;
- weights: none are read (``load_causal_lm`` is substituted, MiniMind's ``--from_weight none``);
- the device's choices: weights in bf16 where the trainer picks bf16 on CUDA (``--dtype auto``);
- output: a temporary folder; evaluation off (it is not part of a training step).
"""
from __future__ import annotations

import json
import pathlib

from .harness import model_key

WORD = "7"  # two project-tokenizer tokens per " 7": rows of n words encode to ~2n tokens


def _long(n_tokens: int) -> str:
    return " ".join([WORD] * (n_tokens // 2 + 8))


def _write(workdir, name: str, rows: list[dict]) -> str:
    path = pathlib.Path(workdir) / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _rows_needed(w) -> int:
    return max(8, 4 * w.micro_batch * w.grad_accum)


class Unsupported(ValueError):
    """The workload asks for a switch the trainer does not have (a fit option that does not apply)."""


def _require(w, trainer: str, lora=False, ckpt=False):
    if w.lora_rank and not lora:
        raise Unsupported(f"--lora_rank: the {trainer} trainer has no LoRA")
    if w.grad_ckpt and not ckpt:
        raise Unsupported(f"--gradient_checkpointing: the {trainer} trainer has no such switch")
    if w.chunk_rows:
        raise Unsupported(f"--chunk_rows: the {trainer} trainer uses the fused ops' default chunk")


# ----------------------------------------------------------------------------- SFT
def sft(w, workdir, device_type):
    from latentfast.train.sft import SFT, SFTConfig

    _require(w, "sft")
    cfg = (w.config or SFTConfig(model_name=model_key(w.model))).replace(
        per_device_train_batch_size=w.micro_batch, gradient_accumulation_steps=w.grad_accum,
        max_length=w.completion_len, bf16=w.bf16)
    rows = [{"question": "q", "answer": _long(cfg.max_length) + " #### 7"} for _ in range(_rows_needed(w))]
    cfg = cfg.replace(train_data=_write(workdir, "sft.jsonl", rows), eval_data="none", eval_size=0,
                      output_dir=str(workdir), save_model=False)
    return SFT(cfg), cfg.bf16 is not False


# ----------------------------------------------------------------------------- MiniMind's stages
MINIMIND_STAGES = {"pretrain": ("pretrain", "Pretrain"), "full_sft": ("full_sft", "FullSFT"),
                   "lora": ("lora", "LoRA"), "distill_reason": ("distill_reason", "DistillReason"),
                   "distillation": ("distillation", "Distillation"), "minimind_dpo": ("dpo", "DPO"),
                   "minimind_grpo": ("grpo", "GRPO"), "minimind_spo": ("spo", "SPO"), "minimind_ppo": ("ppo", "PPO")}


def _minimind_shape(model) -> dict:
    """MiniMind's flags for a model config (a named ``minimind-*`` config, a config.json, a dict)."""
    from .models import config_dict

    d = config_dict(model) if isinstance(model, str) else dict(model)
    if d.get("model_type") != "minimind":
        raise ValueError(f"--model: the MiniMind stages train MiniMind models (minimind-640x12-moe, "
                         f"minimind-512x8, minimind-768x16 or a MiniMind config.json); got {model!r}")
    return dict(hidden_size=d["hidden_size"], num_hidden_layers=d["num_hidden_layers"],
                use_moe=int(bool(d.get("use_moe"))),
                headwise_attn_output_gate=int(bool(d.get("headwise_attn_output_gate"))),
                elementwise_attn_output_gate=int(bool(d.get("elementwise_attn_output_gate"))))


def _minimind_config(w, cls):
    lora = cls.__name__ == "LoRAArgs"
    _require(w, "MiniMind " + cls.__name__[:-4], lora=lora)
    pairs = cls.__name__ == "DPOArgs"  # a workload's sequences: chosen + rejected
    kw = dict(per_device_train_batch_size=max(1, w.micro_batch // 2) if pairs else w.micro_batch,
              gradient_accumulation_steps=w.grad_accum, max_seq_len=w.completion_len)
    if lora:
        kw["lora_rank"] = w.lora_rank or 8
    if hasattr(cls, "max_gen_len"):  # the rollout stages: prompts per micro-batch, prompt / new tokens
        G = getattr(w.config, "num_generations", None) or (_group(w.micro_batch, cls.num_generations)
                                                           if hasattr(cls, "num_generations") else 1)
        kw.update(per_device_train_batch_size=max(1, w.micro_batch // G), max_seq_len=w.prompt_len,
                  max_gen_len=w.completion_len)
        if w.config is None:
            kw["kl_coef" if hasattr(cls, "kl_coef") else "beta"] = w.beta
            if hasattr(cls, "num_generations"):
                kw["num_generations"] = G
    if w.config is not None:  # the flags typed (``--plan``): the shape and the rest are theirs
        return w.config.replace(**kw)
    kw.update(_minimind_shape(w.model), dtype="bfloat16" if w.bf16 else "float32")
    if cls.__name__ == "DistillationArgs":
        t = _minimind_shape(w.teachers[0])
        kw.update(teacher_hidden_size=t["hidden_size"], teacher_num_layers=t["num_hidden_layers"])
    return cls(**kw)


def minimind(stage):
    def build(w, workdir, device_type):
        import importlib

        mod_name, cls_name = MINIMIND_STAGES[stage]
        mod = importlib.import_module(f"latentfast.train.minimind.{mod_name}")
        trainer_cls = getattr(mod, cls_name)
        cfg = _minimind_config(w, trainer_cls.config_class)
        n = cfg.max_seq_len + 8
        if trainer_cls.data_kind == "pretrain":
            rows = [{"text": _long(2 * n)} for _ in range(_rows_needed(w))]
        elif trainer_cls.data_kind == "rlaif":  # prompts of --max_seq_len tokens or more (the last ones kept)
            conv = [{"role": "user", "content": _long(2 * n)}, {"role": "assistant", "content": "7"}]
            rows = [{"conversations": conv} for _ in range(_rows_needed(w))]
        elif trainer_cls.data_kind == "dpo":
            conv = [{"role": "user", "content": "q"}, {"role": "assistant", "content": _long(2 * n)}]
            rows = [{"chosen": conv, "rejected": conv} for _ in range(_rows_needed(w))]
        else:
            rows = [{"conversations": [{"role": "user", "content": "q"},
                                       {"role": "assistant", "content": _long(2 * n)}]} for _ in range(_rows_needed(w))]
        changes = dict(data_path=_write(workdir, "minimind.jsonl", rows), from_weight="none", save_dir=str(workdir),
                       output_dir=str(workdir), use_wandb=False, from_resume=0, resume_from_checkpoint=None)
        if hasattr(cfg, "from_teacher_weight"):
            changes["from_teacher_weight"] = "none"
        if hasattr(cfg, "reward_model_path"):
            changes["reward_model_path"] = _reward_model_folder(w, cfg.reward_model_path, workdir)
        cfg = cfg.replace(**changes)
        trainer = trainer_cls(cfg, demo=False, save_weights=False)
        return trainer, trainer.cfg.bf16 is not False

    return build


def _reward_model_folder(w, path, workdir) -> str:
    """``--reward_model_path`` for the plan: the flag's folder when it exists (its config.json is
    read, its weights are not: ``harness.PlanLoader.reward_model``), 'none' as typed, else a
    folder written here with only a config: ``w.reward_model``'s (a config dict / path), or
    internlm2-1.8b-reward's shapes -- the reward model MiniMind's flags default to."""
    from .models import config_dict
    from .steps import REWARD_MODEL

    if w.config is not None and (path == "none" or pathlib.Path(path).is_dir()):
        return path
    if w.config is None and not w.reward_model:
        return "none"
    cfg = REWARD_MODEL if w.reward_model is True or w.config is not None else (
        config_dict(w.reward_model) if isinstance(w.reward_model, str) else w.reward_model)
    folder = pathlib.Path(workdir) / "reward_model"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    return str(folder)


# ----------------------------------------------------------------------------- KV distillation
def kv(w, workdir, device_type):
    """``latentfast-kv-distill``: the student, rows and teachers as its run (``kv_distill/run.py``)
    builds them -- ``--teacher_model`` (one) or ``--teachers`` (a teachers.yaml; several)."""
    import torch

    from latentfast.data.rows import load_rows
    from latentfast.models.local import load_causal_lm
    from latentfast.train.kv_distill.config import KVDistillConfig
    from latentfast.train.kv_distill.spec import load_teachers
    from latentfast.train.kv_distill.teachers import compression_of, load_teachers_from_config, single_teacher
    from latentfast.train.kv_distill.trainer import KVDistill

    _require(w, "kv_distill")
    cfg = w.config
    if cfg is None:
        cfg = KVDistillConfig(model_name=model_key(w.model))
        if len(w.teachers) == 1:
            cfg = cfg.replace(teacher_model=model_key(w.teachers[0]))
        else:
            yaml = "".join(f"  - {{name: t{i}, model: {json.dumps(model_key(t))}}}\n" for i, t in enumerate(w.teachers))
            path = pathlib.Path(workdir) / "teachers.yaml"
            path.write_text("teachers:\n" + yaml)
            cfg = cfg.replace(teachers=str(path))
    if cfg.multi_teacher_demo:
        raise ValueError("--multi_teacher_demo: plan the demo's teachers with --teachers teachers.yaml")
    rows = [{"question": "q", "answer": _long(w.completion_len) + " #### 7"} for _ in range(_rows_needed(w))]
    cfg = cfg.replace(per_device_train_batch_size=w.micro_batch, gradient_accumulation_steps=w.grad_accum,
                      max_length=w.completion_len, bf16=w.bf16, dataset_name=_write(workdir, "kv.jsonl", rows),
                      subset_size=None, eval_size=0, output_dir=str(workdir), compare=False)
    dev = torch.device(device_type)  # the planned device's choices (teachers' dtype "auto": bf16 on CUDA)
    tok, student = load_causal_lm(cfg.model_name, dev, dtype=torch.float32, seed=cfg.seed)  # as run.py
    rows = load_rows(cfg.dataset_name, cfg.subset_size, cfg.seed)
    tcfg = load_teachers(cfg.teachers) if cfg.teachers is not None else single_teacher(cfg.teacher_model)
    teachers = load_teachers_from_config(
        tcfg, student.config, tok, kv_layers=cfg.kv_layers, device=dev, importance_layer=cfg.importance_layer,
        compression=compression_of(cfg), need_importance=cfg.use_attention_weighted_kv and cfg.use_teacher_attention,
        need_stats=cfg.teacher_weighting in ("confidence", "entropy", "min_ce") or (
            cfg.teacher_weighting == "learned" and cfg.router_signal == "answer_nll"))
    return KVDistill(cfg, student, teachers, tok, rows, [], tcfg.task_table()), cfg.bf16 is not False


# ----------------------------------------------------------------------------- CODI
def codi(w, workdir, device_type):
    """``latentfast-codi``: its setup loads the model (LoRA base in bf16 when bf16 is on), the
    samples (question + CoT steps + answer, at most --max_token_num tokens) and the projection."""
    from latentfast.train.codi import CODI, CODIConfig

    _require(w, "codi", lora=True)
    base = w.config or CODIConfig(model_name=model_key(w.model), num_latent=w.num_latent)
    T = min(w.completion_len, base.max_token_num) - 8  # the teacher's sequence: question + CoT + answer
    steps = "\n".join(_long(T // 8) for _ in range(4))
    rows = [{"question": _long(T // 2), "answer": f"{steps}\n#### 7"} for _ in range(_rows_needed(w))]
    cfg = base.replace(per_device_train_batch_size=w.micro_batch, gradient_accumulation_steps=w.grad_accum,
                       lora_rank=w.lora_rank, use_lora=None, bf16=w.bf16, train_data=_write(workdir, "codi.jsonl", rows),
                       hybrid_data_path=None, data_name=None, eval_data="none", eval_size=0, output_dir=str(workdir),
                       sft_steps=0, hybrid_samples=0, restore_from=None, resume_from_checkpoint=None)
    return CODI(cfg), cfg.bf16 is not False


# ----------------------------------------------------------------------------- RL on train/rl
RL = {"grpo": ("grpo", "GRPO", "grpo_config", "GRPOConfig"), "rloo": ("rloo", "RLOO", "rloo_config", "RLOOConfig"),
      "dpo": ("dpo", "DPO", "dpo_config", "DPOConfig")}


def _group(n_completions: int, want: int) -> int:
    """The largest group size <= ``want`` (>= 2) dividing the generation batch."""
    for g in range(min(want, n_completions), 1, -1):
        if n_completions % g == 0:
            return g
    raise ValueError(f"--micro_batch: a generation batch of {n_completions} completions has no group of >= 2")


def rl(kind):
    """``latentfast-grpo`` / ``-rloo`` / ``-dpo``: the policy (``load_policy_model``: LoRA, gradient
    checkpointing), the reference, the rollout through the decode engine, the rewards (``--reward_funcs``:
    functions of the sampled text; a reward-model folder is not planned), the objective."""
    def build(w, workdir, device_type):
        import importlib
        import pathlib as _p

        mod, cls_name, cmod, ccls = RL[kind]
        trainer_cls = getattr(importlib.import_module(f"latentfast.train.rl.{mod}"), cls_name)
        cfg_cls = getattr(importlib.import_module(f"latentfast.train.rl.{cmod}"), ccls)
        _require(w, kind, lora=True, ckpt=True)
        base = w.config or cfg_cls(model_name_or_path=model_key(w.model))
        kw = dict(per_device_train_batch_size=w.micro_batch, gradient_accumulation_steps=w.grad_accum,
                  use_peft=bool(w.lora_rank), lora_r=w.lora_rank or base.lora_r, gradient_checkpointing=w.grad_ckpt,
                  bf16=w.bf16, output_dir=str(workdir))
        if base.dtype == "auto" and device_type == "cuda":
            kw["dtype"] = "bfloat16"  # --dtype auto on CUDA
        if kind == "dpo":
            pairs = w.micro_batch // 2  # a workload's sequences: chosen + rejected
            P = min(base.max_prompt_length or w.completion_len, w.completion_len // 2)  # responses fill the rest
            kw.update(per_device_train_batch_size=max(1, pairs), max_length=w.completion_len,
                      precompute_ref_log_probs=False)
            rows = [{"prompt": _long(P), "chosen": _long(w.completion_len), "rejected": _long(w.completion_len)}
                    for _ in range(_rows_needed(w))]
        else:
            folders = [f for f in getattr(base, "reward_funcs", []) if _p.Path(f).is_dir()]
            if folders:
                raise ValueError(f"--reward_funcs {folders}: reward-model folders are not planned (their weights "
                                 f"would be read); plan with reward functions")
            kw.update(max_prompt_length=w.prompt_len, max_completion_length=w.completion_len, beta=w.beta)
            if w.config is None:
                kw["num_generations"] = _group(w.micro_batch * w.grad_accum, base.num_generations)
            rows = [{"prompt": _long(w.prompt_len), "answer": "7"} for _ in range(_rows_needed(w))]
        kw["dataset_name"] = _write(workdir, f"{kind}.jsonl", rows)
        cfg = base.replace(**kw)
        return trainer_cls(cfg), cfg.bf16 is not False

    return build


# ----------------------------------------------------------------------------- HRPO (on train/rl)
def hrpo(w, workdir, device_type):
    """``latentfast-hrpo``: its setup (the model: LoRA base in bf16 when bf16 is on; the task's rows),
    the hybrid thinking policy, rollouts, the task's rewards, the reference (adapters off), GRPOLoss."""
    from latentfast.train.hrpo import HRPO, HRPOConfig

    _require(w, "hrpo", lora=True, ckpt=True)
    base = w.config or HRPOConfig(model_name=model_key(w.model))
    kw = dict(per_device_train_batch_size=w.micro_batch, gradient_accumulation_steps=w.grad_accum,
              max_prompt_length=w.prompt_len, max_completion_length=w.completion_len, lora_rank=w.lora_rank,
              beta=w.beta, gradient_checkpointing=w.grad_ckpt, bf16=w.bf16, eval_size=0, sft_steps=0,
              output_dir=str(workdir), dataset_root=None, eval_data=None, resume_from_checkpoint=None)
    if w.config is None:
        kw["group_size"] = _group(w.micro_batch, base.group_size)
    rows = [{"question": _long(w.prompt_len), "answer": "7 #### 7"} for _ in range(_rows_needed(w))]
    kw["train_data"] = _write(workdir, "hrpo.jsonl", rows)
    cfg = base.replace(**kw)
    return HRPO(cfg), cfg.bf16 is not False


# trainer name -> builder(w, workdir, planned device type) -> (trainer, autocast bf16); called with
# load_causal_lm substituted (``harness.PlanLoader``)
BUILDERS = {"sft": sft, **{k: minimind(k) for k in MINIMIND_STAGES}, "distill": minimind("distillation"), "kv": kv,
            "codi": codi, **{k: rl(k) for k in RL}, "hrpo": hrpo}


def has_trainer(w) -> bool:
    return w.impl == "latentfast" and w.trainer in BUILDERS


def trainer_for(w, workdir, device_type: str = "cuda"):
    return BUILDERS[w.trainer](w, workdir, device_type)
