"""``latentfast-kv-distill``: teacher(s) -> student KV-cache distillation (seed note 004).

    latentfast-kv-distill                               # embedded demo: tiny teacher -> tinier student
    latentfast-kv-distill --compare                     # baseline / +attention / +attention+CKA, table + plot
    latentfast-kv-distill --teachers teachers.yaml --teacher_weighting confidence   # several teachers
    latentfast-kv-distill --multi_teacher_demo [--compare]   # two tiny teachers (eq / nl reasoning) -> one student
    python -m latentfast.train.kv_distill --model_name /models/Qwen2-1.5B --teacher_model /models/Qwen2-7B \\
        --dataset_name gsm8k_train.jsonl --subset_size 5000 --epochs 2 --batch_size 8 \\
        --use_attention_weighted_kv --use_teacher_attention --attention_weighted_kv_warmup 300 \\
        --cka_weight 0.05 --cka_layers middle --output_dir outputs/attn_weighted_teacher_cka
    torchrun --nproc_per_node 8 -m latentfast.train.kv_distill ...

    loss = CE(student, answer tokens) + kv_weight * sum_k w_k KV_k + cka_weight * CKA + codi_weight * CODI

``--teacher_model`` is a teachers list of one (weight 1: the recipe's loss);
``--teachers teachers.yaml`` lists several, weighted per sample by ``--teacher_weighting``
(``distiller.py``). Teachers are frozen (eval, no grad) and share the student's tokenizer.
"""
from __future__ import annotations

from ..entry import console_entry
from . import demo
from .config import KVDistillConfig


def build_parser():
    return KVDistillConfig.build_parser(__doc__)


def parse_args(argv=None) -> KVDistillConfig:
    cfg = KVDistillConfig.parse(argv, __doc__)
    if cfg.multi_teacher and "teacher_model" in cfg.explicit:
        build_parser().error("--teacher_model and --teachers / --multi_teacher_demo exclude each other")
    cfg = demo.preset(cfg)
    if cfg.eval_data is None:
        synthetic = cfg.dataset_name in ("synthetic", "synthetic_two_mode")
        cfg = cfg.replace(eval_data=cfg.dataset_name if synthetic else "gsm8k_test")
    return cfg


def main(argv=None):
    """``python -m latentfast.train.kv_distill`` (and torchrun): parse (torch-free), train."""
    cfg = parse_args(argv)
    from .run import run

    return run(cfg)


cli = console_entry(main)


if __name__ == "__main__":
    cli()
