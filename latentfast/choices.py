"""The values a command-line option offers, and the checks of their combinations, torch-free:
the trainers' configs read them here, so ``--help`` and argument errors never import torch.
Each is defined once, here; the modules that implement them import it from here.
"""
from __future__ import annotations

# weights dtype of a loaded model (the RL trainers' --dtype, teachers.yaml's dtype)
DTYPE_NAMES = ("auto", "float32", "bfloat16", "float16")

# GRPO family of the fused loss engine (``latentfast.ops.objectives.grpo``)
GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo", "spo")
TOKEN_NORMALISED = ("dapo", "cispo", "vespo")  # / the global token count

# DPO family (``latentfast.ops.objectives.preference``; TRL DPOConfig's names)
DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "apo_zero",
                  "apo_down", "discopop")

# CODI's distillation loss (``latentfast.nn.codi``) and the original CODI's datasets, read from local files
# (``latentfast.train.codi_data.from_original``)
CODI_DISTILL_LOSS_TYPES = ("smooth_l1", "l2", "l1")
CODI_DATA_NAMES = {
    "icot": "zen-E/GSM8k-Aug rows: question, cot ('<<a*b=c>> <<...>>'), answer",
    "icot-full": "zen-E/GSM8k-Aug-NL rows: question, cot (sentences), answer",
    "commonsense": "zen-E/CommonsenseQA-GPT4omini rows: question, cot, answer",
    "gsm8k": "GSM8K rows: question, answer ('... #### N')",
}

# multi-teacher KV distillation (``latentfast.nn.teacher_weighting``, ``latentfast.nn.kv_adapter``)
TEACHER_WEIGHTING_RULES = ("static", "per_task", "confidence", "entropy", "min_ce", "learned")
ROUTER_REGULARIZERS = ("load_balance", "entropy", "none")
ROUTER_SIGNALS = ("kv", "answer_nll", "tag")
KV_ADAPTERS = ("identity", "linear", "mlp")

# latentfast-plan --impl (``latentfast.plan.steps``): the fused lm_head losses, or the peers' full-logits step
PLAN_IMPLS = ("latentfast", "recipe")

# the MiniMind tokenizers shipped with the package (``latentfast.models.minimind.tokenizer``): version -> folder;
# "minimind-2510" is the note-era tokenizer (MiniMind a8455ca), the default
MINIMIND_TOKENIZERS = {"minimind-2510": "minimind-2510", "minimind-3": "minimind-3"}
MINIMIND_DEFAULT_TOKENIZER = "minimind-2510"


def check_grpo_options(loss_type: str, *, max_completion_length=None, delta=None, importance_sampling_level="token",
                       top_entropy_quantile: float = 1.0, sapo_temperature_pos: float = 1.0,
                       sapo_temperature_neg: float = 1.05):
    """The GRPO family's option checks, once: the fused op's objective, ``nn.FusedLinearGRPOLoss``
    and ``train.rl``'s ``GRPOLoss`` (which prefixes ``--``) call this. Each message starts with
    the offending option's name."""
    if loss_type not in GRPO_LOSS_TYPES:
        raise ValueError(f"loss_type {loss_type!r} is not supported; use one of {', '.join(GRPO_LOSS_TYPES)}")
    if loss_type == "dr_grpo" and not max_completion_length:
        raise ValueError("max_completion_length must be a positive length for loss_type 'dr_grpo'")
    if delta is not None and delta <= 0:
        raise ValueError(f"delta must be positive, got {delta}")
    if importance_sampling_level not in ("token", "sequence"):
        raise ValueError(f"importance_sampling_level must be 'token' or 'sequence', got {importance_sampling_level!r}")
    if not 0.0 < top_entropy_quantile <= 1.0:
        raise ValueError(f"top_entropy_quantile must be in (0, 1], got {top_entropy_quantile}")
    if loss_type == "sapo" and min(sapo_temperature_pos, sapo_temperature_neg) <= 0:
        raise ValueError("sapo_temperature_pos and sapo_temperature_neg must be positive")


def check_dpo_options(loss_type: str, beta: float, label_smoothing: float):
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {DPO_LOSS_TYPES}, got {loss_type!r}")
    if loss_type == "exo_pair" and label_smoothing <= 0.0:
        raise ValueError("label_smoothing must be > 0 for loss_type='exo_pair' (the EXO paper recommends 1e-3)")
    if loss_type == "robust" and not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must lie in [0.0, 0.5) for loss_type='robust', got {label_smoothing}")
    if loss_type in ("ipo", "sppo_hard") and beta == 0:
        raise ValueError(f"beta must be nonzero for loss_type={loss_type!r}")
