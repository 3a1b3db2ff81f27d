"""What a resumed run must share with the checkpoint's run, and where its data stream continues.

``RUN_DEFINING``: config fields that change what a run means (model shape, tokenizer, data,
batch size, accumulation, sequence length, seed). Resuming with any of them different
stops with every differing flag and both values, unless ``--allow_config_change`` names it.
When the batch size (or accumulation, or world size) is allowed to change, the data stream
continues at the example the checkpoint's run reached (``items_seen``), not at
``step * new batch``.
"""
from __future__ import annotations

import pathlib

MODEL_SHAPE = ("model_name", "model_name_or_path", "hidden_size", "num_hidden_layers", "use_moe",
               "headwise_attn_output_gate", "elementwise_attn_output_gate", "lora_rank", "lora_alpha", "projection",
               "thinking_state", "prj_dim", "num_latent", "use_prj", "teacher_model")
RUN_DEFINING = (
    "seed", "per_device_train_batch_size", "gradient_accumulation_steps",  # data position and order
    *MODEL_SHAPE,
    "tokenizer", "max_seq_len", "max_length", "model_max_length", "max_prompt_length", "max_completion_length",
    "data_path", "train_data", "data_name", "dataset_name", "hybrid_data_path", "task", "group_size",
    "num_generations",
)


class ResumeConfigError(ValueError):
    """The resumed run's flags differ from the checkpoint's in what the run means."""


def _same(a, b) -> bool:
    if a == b:
        return True
    if isinstance(a, str) and isinstance(b, str) and pathlib.Path(a).exists() and pathlib.Path(b).exists():
        return pathlib.Path(a).resolve() == pathlib.Path(b).resolve()  # one file, spelt two ways
    return isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and list(a) == list(b)


def flag_names(cfg, name: str) -> str:
    """``--name`` and its aliases as the trainer in use spells them (``--batch_size`` for MiniMind)."""
    aliases = type(cfg).meta(name)["aliases"]
    return " / ".join(f"--{n}" for n in (name, *aliases))


def allowed_names(cfg, allow) -> set:
    alias = type(cfg).aliases()
    return {alias.get(a.lstrip("-"), a.lstrip("-")) for a in allow or ()}


def check_config(saved: dict, cfg, path, fields=RUN_DEFINING, allow=()) -> list[str]:
    """Compare the checkpoint's saved config with ``cfg``; raise naming each differing flag
    not in ``allow``; return the allowed ones that differ."""
    now = cfg.to_dict()
    allow = allowed_names(cfg, allow)
    differ = [n for n in fields if n in saved and n in now and not _same(saved[n], now[n])]
    bad = [n for n in differ if n not in allow]
    if bad:
        lines = "; ".join(f"{flag_names(cfg, n)}: checkpoint {saved[n]!r}, now {now[n]!r}" for n in bad)
        raise ResumeConfigError(
            f"--resume_from_checkpoint {path}: the run's flags differ from the checkpoint's ({lines}). Resume with "
            f"the checkpoint's values, start a fresh --output_dir, or pass --allow_config_change "
            f"{' '.join(bad)} to continue anyway")
    return differ


def stream_offset(items_seen: int | None, start: int, items_per_step: int) -> int:
    """Offset added to every stream index so step ``start`` reads item ``items_seen`` next."""
    return 0 if items_seen is None else round(items_seen - start * items_per_step)  # 0 when nothing changed


__all__ = ["MODEL_SHAPE", "RUN_DEFINING", "ResumeConfigError", "allowed_names", "check_config", "flag_names", "stream_offset"]
