"""The flags of ``latentfast-kv-distill``: the loss, the teachers, the run (typed configs -> CLI)."""
from __future__ import annotations

from dataclasses import dataclass

from latentfast.choices import ROUTER_REGULARIZERS as REGULARIZERS
from latentfast.choices import ROUTER_SIGNALS
from latentfast.choices import TEACHER_WEIGHTING_RULES as RULES

from ..checks import check_data_arg
from ..config import Config, TrainConfig, check, option
from .spec import COMPRESSIONS, TeachersConfigError, load_teachers, teacher_paths_error

DEMO = "tiny"  # --model_name / --teacher_model: the embedded demo's models (latentfast.train.kv_distill.demo)


@dataclass
class KVLossConfig(Config):
    """What ``KVDistiller`` needs: the loss terms and their weights."""

    kv_weight: float = option(1.0, "weight of the KV-cache MSE", min=0.0)
    use_attention_weighted_kv: bool = option(False, "weight the KV loss by attention after the warm-up (demo: on)")
    attention_weighted_kv_warmup: int = option(1000, "steps of plain MSE before the attention weighting", min=0)
    use_teacher_attention: bool = option(False, "weight by the teacher's attention (steadier)")
    cka_weight: float = option(0.0, "recipe: 0.05", min=0.0)
    cka_layers: str = option("middle", "'middle' | 'last' | 'all' | 'i,j,...'")
    codi_weight: float = option(0.0, "CODI hidden-state loss at the token before the answer", min=0.0)
    kv_layers: str = option("all", "student blocks whose KV cache is distilled")
    importance_layer: int = option(-1, "block whose attention gives token importance")


@dataclass
class MultiTeacherConfig(Config):
    """The teachers' options (``--teachers teachers.yaml``; ``--teacher_model`` is a list of one)."""

    teachers: str | None = option(None, "teachers.yaml: distil from several teachers (instead of --teacher_model)",
                                  path="file")
    teacher_weighting: str = option("static", "per-sample teacher weights", choices=RULES)
    router_reg_weight: float = option(0.01, "learned router: coefficient of its regulariser")
    router_regularizer: str = option("load_balance", "learned router: regulariser", choices=REGULARIZERS)
    router_hidden: int = option(0, "learned router: hidden width (0 = one linear map)")
    router_signal: str = option("kv", "learned router: what its gradient reads: kv (each teacher's KV loss over its "
                                      "running level), answer_nll (each teacher's NLL of the gold answer), tag (the "
                                      "sample's task/mode tag via the per_task table)", choices=ROUTER_SIGNALS)
    kv_compression: str = option("none", "KV targets: full cache or KaVa R-KV compressed", choices=COMPRESSIONS)
    kv_slots: int = option(24, "--kv_compression rkv: kept entries per (layer, KV head)")
    kv_lambda: float = option(0.1, "--kv_compression rkv: lambda * importance + (1 - lambda) * redundancy")
    multi_teacher_demo: bool = option(False, "embedded demo: two tiny teachers (eq / nl reasoning) -> one student")

    @property
    def multi_teacher(self) -> bool:
        return self.teachers is not None or self.multi_teacher_demo

    def __post_init__(self):
        super().__post_init__()
        check(self.teacher_weighting in RULES, "teacher_weighting", f"one of {RULES}", self.teacher_weighting)
        check(self.router_regularizer in REGULARIZERS, "router_regularizer", f"one of {REGULARIZERS}",
              self.router_regularizer)
        check(self.kv_compression in COMPRESSIONS, "kv_compression", f"one of {COMPRESSIONS}", self.kv_compression)
        check(self.kv_slots >= 1, "kv_slots", "an integer >= 1", self.kv_slots)
        check(0.0 <= self.kv_lambda <= 1.0, "kv_lambda", "a number in [0, 1]", self.kv_lambda)
        check(self.router_reg_weight >= 0, "router_reg_weight", "a number >= 0", self.router_reg_weight)
        check(self.router_hidden >= 0, "router_hidden", "an integer >= 0", self.router_hidden)
        check(self.router_signal in ROUTER_SIGNALS, "router_signal", f"one of {ROUTER_SIGNALS}", self.router_signal)

    def check_cli(self, parser):
        super().check_cli(parser)
        if self.teachers is not None:
            try:
                cfg = load_teachers(self.teachers)
            except TeachersConfigError as e:
                parser.error(str(e))
            msg = teacher_paths_error(cfg)
            if msg:
                parser.error(msg)


@dataclass
class KVDistillConfig(TrainConfig, KVLossConfig, MultiTeacherConfig):
    """Teacher -> student KV-cache distillation (the recipe's experiments/train_with_kv.py flags)."""

    model_name: str = option(DEMO, "student: local HF path; 'tiny' = embedded demo", aliases=("model_name_or_path",),
                             path="model", names=(DEMO,))
    teacher_model: str = option(DEMO, "teacher: local HF path; 'tiny' = demo teacher (warmed up in-process)",
                                path="model", names=(DEMO,))
    dataset_name: str = option("gsm8k", "JSONL path, 'gsm8k' (shipped sample) or 'synthetic'")
    subset_size: int | None = option(None, "first N training rows", min=1)
    num_train_epochs: float = 2
    lr: float = 5e-5
    output_dir: str = "runs/kv_distill"
    max_length: int = option(512, "prompt + answer tokens kept", min=2)
    eval_data: str | None = option(None, "default: 'synthetic' for synthetic training, else the GSM8K test sample")
    eval_size: int = option(100, "held-out rows (answer CE and greedy accuracy)", min=0)
    max_new_tokens: int = option(256, "greedy decoding length at evaluation", min=1)
    compare: bool = option(False, "run baseline, +attention, +attention+CKA (with --teachers / --multi_teacher_demo: "
                                  "each teacher alone, static, per_task, confidence, learned); write table + plot")
    teacher_sft_steps: int = option(0, "demo: CE warm-up of the tiny teacher", min=0)
    teacher_sft_lr: float = option(3e-3, "learning rate of the teacher warm-up")
    full: bool = option(False, "demo: the longer run (2.5x the student steps; --multi_teacher_demo: 240 held-out "
                               "rows, bench/results/multi_teacher_cpu.md)")

    @property
    def demo(self) -> bool:
        return self.model_name == DEMO

    def check_cli(self, parser):
        super().check_cli(parser)
        check_data_arg(parser, "--dataset_name", self.dataset_name)
        check_data_arg(parser, "--eval_data", self.eval_data)
