"""The embedded demos of ``latentfast-kv-distill``: presets and tiny teachers warmed up in-process.

    latentfast-kv-distill                      # a tiny teacher (warmed up on synthetic arithmetic) -> a tinier student
    latentfast-kv-distill --multi_teacher_demo # two tiny teachers, each warmed up on one reasoning mode (eq / nl)

The presets are read at parsing (torch-free); the teachers' code loads with the demo's teachers.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

from latentfast.data.rows import load_rows

from .config import DEMO
from .spec import TeachersConfig, TeacherSpec

if TYPE_CHECKING:
    from .teachers import Teacher

# the demo teacher: wider/deeper than the tiny student, other KV-head count (exercises the KV adapter)
DEMO_TEACHER = dict(hidden_size=192, num_hidden_layers=6, num_attention_heads=6, num_key_value_heads=3,
                    intermediate_size=512)
DEMO_PRESET = dict(lr=2e-3, batch_size=32, max_steps=120, warmup_ratio=0.05, attention_weighted_kv_warmup=40,
                   dataset_name="synthetic", subset_size=4000, eval_size=64, max_length=128, logging_steps=20,
                   save_steps=0, teacher_sft_steps=200, max_new_tokens=32, use_attention_weighted_kv=True)
FULL_PRESET = dict(teacher_sft_steps=400, max_steps=300, eval_size=128)  # --full: the longer single-teacher run
# two tiny teachers of other shapes than the student (128 wide, 4 blocks, 4/2 heads) and than each other
DEMO_TEACHERS = {
    "eq": dict(hidden_size=192, num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=3,
               intermediate_size=512),
    "nl": dict(hidden_size=160, num_hidden_layers=4, num_attention_heads=5, num_key_value_heads=5,
               intermediate_size=448),
}
# sized so that --compare (two teacher warm-ups + eight students) stays within ~15 min at one CPU thread:
# one-step problems (~40 tokens), 300 teacher steps (~80% held-out on their own mode), 80 student steps
MT_DEMO_PRESET = dict(lr=2e-3, batch_size=32, max_steps=80, warmup_ratio=0.05, dataset_name="synthetic_two_mode",
                      eval_data="synthetic_two_mode", subset_size=4000, eval_size=160, max_length=64,
                      logging_steps=20, save_steps=0, teacher_sft_steps=300, teacher_sft_lr=3e-3, max_new_tokens=20,
                      teacher_weighting="learned", router_reg_weight=1.0)
MT_FULL_PRESET = dict(max_steps=200, eval_size=240)  # --full: long enough to ask whether the students separate


def preset(cfg):
    """The demo's values for the flags the command line did not set (the config itself when no demo)."""
    if cfg.multi_teacher_demo:
        return cfg.with_preset({**MT_DEMO_PRESET, **(MT_FULL_PRESET if cfg.full else {})})
    if cfg.demo:
        return cfg.with_preset({**DEMO_PRESET, **(FULL_PRESET if cfg.full else {})})
    return cfg


def banner(cfg) -> str | None:
    """The line a demo prints first: its presets."""
    if not (cfg.multi_teacher_demo or cfg.demo):
        return None
    which = {**MT_DEMO_PRESET, **MT_FULL_PRESET} if cfg.multi_teacher_demo else {**DEMO_PRESET, **FULL_PRESET}
    return (("multi-teacher demo" if cfg.multi_teacher_demo else "embedded demo") + "; presets: " +
            json.dumps({k: getattr(cfg, k) for k in which}))


def held_out(rows: list[dict], eval_rows: list[dict]) -> list[dict]:
    """``eval_rows`` minus the problems that occur in ``rows`` (synthetic data repeats)."""
    seen = {r["question"] for r in rows}
    return [r for r in eval_rows if r["question"] not in seen]


def demo_teacher(cfg, tok, student_config, device) -> tuple[list[Teacher], TeachersConfig]:
    """``--teacher_model tiny``: a small teacher, warmed up (SFT on the loop) on ``--dataset_name``."""
    from latentfast.models.local import load_causal_lm

    from ..sft import warm_up
    from .teachers import compression_of, online_teacher, single_teacher

    tcfg = single_teacher(DEMO)
    _, model = load_causal_lm(DEMO, device, seed=cfg.seed + 1, **DEMO_TEACHER)
    if cfg.teacher_sft_steps:  # it starts random: a short SFT run gives it something to teach
        warm_up(cfg, model, tok, load_rows(cfg.dataset_name, None, cfg.seed + 1), steps=cfg.teacher_sft_steps,
                lr=cfg.teacher_sft_lr, output_dir=Path(cfg.output_dir) / "teacher_sft", name="teacher warm-up",
                batch_size=32, max_length=cfg.max_length)
    return [online_teacher(tcfg.teachers[0], model, student_config, kv_layers=cfg.kv_layers,
                           importance_layer=cfg.importance_layer, compression=compression_of(cfg))], tcfg


def demo_teachers(cfg, tok, student_config, rows, device) -> tuple[list[Teacher], TeachersConfig]:
    """``--multi_teacher_demo``: two tiny teachers, each warmed up (SFT on the loop) on one
    reasoning mode of ``rows``."""
    from latentfast.models.local import load_causal_lm

    from ..sft import warm_up
    from .teachers import compression_of, online_teacher

    specs, teachers = [], []
    for i, (mode, shape) in enumerate(DEMO_TEACHERS.items()):
        spec = TeacherSpec(model=f"{DEMO}:{mode}", name=mode, mode=mode, kv_adapter="linear" if i == 0 else "mlp")
        _, model = load_causal_lm(DEMO, device, seed=cfg.seed + 1 + i, **shape)
        warm_s = None
        if cfg.teacher_sft_steps:
            t0 = time.time()
            warm_up(cfg.replace(seed=cfg.seed + i), model, tok, [r for r in rows if r.get("mode") == mode],
                    steps=cfg.teacher_sft_steps, lr=cfg.teacher_sft_lr,
                    output_dir=Path(cfg.output_dir) / f"teacher_{mode}", name=f"teacher {mode} warm-up",
                    batch_size=cfg.per_device_train_batch_size, max_length=cfg.max_length)
            warm_s = time.time() - t0
        specs.append(spec)
        teachers.append(online_teacher(spec, model, student_config, kv_layers=cfg.kv_layers,
                                       importance_layer=cfg.importance_layer, compression=compression_of(cfg)))
        teachers[-1].warm_s = warm_s
    return teachers, TeachersConfig(specs)
