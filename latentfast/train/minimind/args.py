"""MiniMind's flags, torch-free: ``MiniMindArgs`` (every stage's shared set), each stage's own flag set
(``STAGE_ARGS``: MiniMind's ``trainer/train_<stage>.py`` defaults), the demos' presets. ``latentfast-minimind
<stage>`` parses with these (``--help``, argument errors) before the stage's trainer, and torch, load.
The meanings are ``common.py``'s.
"""
from __future__ import annotations

import dataclasses
import pathlib
from dataclasses import dataclass

from latentfast.choices import GRPO_LOSS_TYPES, MINIMIND_DEFAULT_TOKENIZER, MINIMIND_TOKENIZERS

from ..config import TrainConfig, check, option, path_error
from ..rl.objectives import DPOLoss, GRPOLoss  # (torch-free: a loss is built = validated at parsing)

DEMO = "demo"
# every stage's demo: a small MiniMind on the GSM8K sample, CPU-sized (stages add their own values)
DEMO_PRESET = dict(save_dir="out", hidden_size=64, num_hidden_layers=2, max_seq_len=256, batch_size=8,
                   accumulation_steps=1, log_interval=20, save_interval=0, max_steps=60, dtype="float32",
                   device="cpu", use_moe=0, data_path=DEMO)
# each stage's embedded demo over DEMO_PRESET: (the no-argument run, what --full changes); README: times and
# numbers. The stages hold only their algorithm.
STAGE_DEMOS = {
    "pretrain": (dict(lr=2e-3, max_steps=60), dict(max_steps=300)),
    "full_sft": (dict(lr=2e-3, max_steps=40), dict(max_steps=200)),
    "lora": (dict(save_dir="out/lora", lr=1e-2, max_steps=40), dict(max_steps=200)),
    "distill_reason": (dict(from_weight="full_sft", lr=2e-3, max_steps=40), dict(max_steps=200)),
    "distillation": (dict(hidden_size=32, num_hidden_layers=1, from_weight="none", teacher_hidden_size=64,
                          teacher_num_layers=2, from_teacher_weight="full_sft", lr=3e-3, max_steps=40),
                     dict(max_steps=200)),
    "dpo": (dict(per_device_train_batch_size=8, lr=5e-4, max_steps=40, logging_steps=5, max_seq_len=256, beta=0.1),
            dict(max_steps=120)),
    "ppo": (dict(per_device_train_batch_size=16, max_gen_len=64, max_seq_len=160, lr=2e-4, critic_learning_rate=1e-3,
                 max_steps=40, logging_steps=5, reasoning=1, rule_rewards="answer", ppo_mode="gae",
                 mini_batch_size=16, ppo_update_iters=1, value_head_init="mean_reward"),
            dict(max_steps=80, logging_steps=10)),
    "grpo": (dict(per_device_train_batch_size=2, num_generations=8, max_gen_len=64, max_seq_len=160, lr=1e-3,
                  max_steps=30, logging_steps=5, reasoning=1, rule_rewards="answer", beta=0.02),
             dict(max_steps=90, logging_steps=10)),
    "spo": (dict(per_device_train_batch_size=8, gradient_accumulation_steps=2, max_gen_len=64, max_seq_len=160,
                 lr=2e-4, max_steps=30, logging_steps=5, reasoning=1, rule_rewards="answer"),
            dict(max_steps=90, logging_steps=10)),
}


@dataclass
class MiniMindArgs(TrainConfig):
    """MiniMind's trainer flags (defaults: train_pretrain.py at a8455ca); stages override defaults."""

    save_dir: str = option("../out", "where the .pth weights go: {save_dir}/{save_weight}_{hidden_size}{_moe}.pth")
    save_weight: str = option("pretrain", "prefix of the saved weight file")
    num_train_epochs: float = option(1.0, "epochs over the data", aliases=("epochs",), min=0.0)
    per_device_train_batch_size: int = option(32, "examples per device per micro-batch", aliases=("batch_size",))
    lr: float = option(5e-4, "peak learning rate", aliases=("learning_rate",))
    device: str | None = option(None, "cuda:0 / cpu (default: cuda when available)")
    dtype: str = option("bfloat16", "autocast dtype on CUDA (CPU runs fp32, as MiniMind)",
                        choices=("bfloat16", "float16", "float32"))
    num_workers: int = option(8, "accepted for MiniMind's command lines (batches are tokenised in-process)", min=0)
    gradient_accumulation_steps: int = option(8, "micro-batches per optimizer step", aliases=("accumulation_steps",))
    max_grad_norm: float = option(1.0, "gradient clipping norm", aliases=("grad_clip",))
    logging_steps: int = option(100, "console line every N optimizer steps", aliases=("log_interval",))
    save_steps: int = option(1000, "weights + resumable checkpoint every N steps (0: at the end only)",
                             aliases=("save_interval",))
    hidden_size: int = option(512, "model width")
    num_hidden_layers: int = option(8, "decoder blocks")
    max_seq_len: int = option(340, "tokens per example (truncate / pad)")
    use_moe: int = option(0, "1: MoE blocks (4 routed experts, top-2, 1 shared)", choices=(0, 1))
    headwise_attn_output_gate: int = option(0, "1: sigmoid output gate per attention head", choices=(0, 1))
    elementwise_attn_output_gate: int = option(0, "1: sigmoid output gate per attention element", choices=(0, 1))
    data_path: str = option("../dataset/pretrain_hq.jsonl", "MiniMind JSONL ('demo': the GSM8K sample)")
    from_weight: str = option("none", "start from {save_dir}/{from_weight}_{hidden_size}{_moe}.pth ('none': random)")
    from_resume: int = option(0, "1: resume the latest checkpoint of this run exactly", choices=(0, 1))
    use_wandb: bool = option(False, "also log to wandb (offline without WANDB_API_KEY; skipped if not installed)")
    wandb_project: str | None = option("MiniMind-Pretrain", "wandb project (with --use_wandb)")
    tokenizer: str = option(MINIMIND_DEFAULT_TOKENIZER, "shipped MiniMind tokenizer", choices=tuple(MINIMIND_TOKENIZERS))
    output_dir: str | None = option(None, "resumable checkpoints + metrics.jsonl "
                                          "(default {save_dir}/../checkpoints/{save_weight}_{hidden_size}{_moe})")
    weight_decay: float = option(0.01, "AdamW weight decay on every parameter (torch's default, as MiniMind)")
    warmup_ratio: float = option(0.0, "linear warm-up share (MiniMind: none)")
    lr_scheduler_type: str = option("minimind", "schedule (MiniMind's: lr*(0.1+0.45*(1+cos(pi*t/T))))")

    def __post_init__(self):
        super().__post_init__()
        check(self.hidden_size > 0 and self.num_hidden_layers > 0, "hidden_size", "positive sizes",
              (self.hidden_size, self.num_hidden_layers))
        check(self.max_seq_len >= 2, "max_seq_len", "an integer >= 2", self.max_seq_len)
        check(not (self.headwise_attn_output_gate and self.elementwise_attn_output_gate),
              "headwise_attn_output_gate", "at most one of the two attention gates", "both set")

    def check_cli(self, parser):
        """A ``--data_path`` given (or MiniMind's default, when present) must be a file; the
        weight files are checked by ``stage_main`` (their names depend on the stage)."""
        super().check_cli(parser)
        if not is_demo(self):
            msg = path_error("--data_path", self.data_path, "file", (DEMO,), "a MiniMind JSONL file")
            if msg:
                parser.error(msg)

    @property
    def stem(self) -> str:
        from latentfast.models.minimind import checkpoint_name  # (loads transformers: after parsing)

        return checkpoint_name(self.save_weight, self.hidden_size, bool(self.use_moe)).stem


def script_defaults(**defaults):
    """Class decorator of a stage's flags: the base class's flags with the defaults of MiniMind's
    ``trainer/train_<stage>.py``, written as MiniMind spells them (``epochs``, ``batch_size``,
    ``learning_rate``, ``accumulation_steps``, ...); the class body adds the stage's own flags.
    Makes the class a dataclass (help and aliases stay the base field's)."""
    def wrap(cls):
        base = next(b for b in cls.__mro__[1:] if dataclasses.is_dataclass(b))
        types, alias = {f.name: f.type for f in dataclasses.fields(base)}, base.aliases()
        own = dict(cls.__dict__.get("__annotations__", {}))
        for flag, value in defaults.items():
            name = alias.get(flag, flag)
            if name not in types:
                raise TypeError(f"{cls.__name__}: {flag!r} is not a flag of {base.__name__}")
            own.setdefault(name, types[name])
            setattr(cls, name, value)
        cls.__annotations__ = own
        return dataclass(cls)
    return wrap


def is_demo(cfg: MiniMindArgs) -> bool:
    """No ``--data_path`` typed and MiniMind's default file absent, or ``--data_path demo``."""
    return cfg.data_path == DEMO or ("data_path" not in cfg.explicit and not pathlib.Path(cfg.data_path).is_file())


# ---------------------------------------------------------------------------- each stage's flags
@dataclass
class PretrainArgs(MiniMindArgs):
    """MiniMind pretraining (train_pretrain.py defaults)."""


@script_defaults(save_weight="full_sft", epochs=2.0, batch_size=16, learning_rate=1e-6, accumulation_steps=1,
                 data_path="../dataset/sft_mini_512.jsonl", from_weight="pretrain",
                 wandb_project="MiniMind-Full-SFT")
class FullSFTArgs(MiniMindArgs):
    """MiniMind full SFT (train_full_sft.py defaults)."""


@script_defaults(save_dir="../out/lora", epochs=50.0, batch_size=32, learning_rate=1e-4, accumulation_steps=1,
                 log_interval=10, save_interval=1, data_path="../dataset/lora_identity.jsonl",
                 from_weight="full_sft", wandb_project="MiniMind-LoRA")
class LoRAArgs(MiniMindArgs):
    """MiniMind LoRA (train_lora.py defaults)."""

    lora_name: str = option("lora_identity", "LoRA weights file {save_dir}/{lora_name}_{hidden_size}.pth")
    lora_rank: int = option(8, "LoRA rank (MiniMind: 8)")

    def __post_init__(self):
        super().__post_init__()
        check(self.lora_rank > 0, "lora_rank", "an integer > 0", self.lora_rank)

    @property
    def stem(self) -> str:
        return f"{self.lora_name}_{self.hidden_size}"


@script_defaults(save_weight="reason", batch_size=8, learning_rate=1e-6, accumulation_steps=1, save_interval=100,
                 max_seq_len=720, data_path="../dataset/r1_mix_1024.jsonl", from_weight="dpo",
                 wandb_project="MiniMind-Reasoning")
class DistillReasonArgs(MiniMindArgs):
    """MiniMind reasoning distillation (train_distill_reason.py defaults)."""

    tag_weight: float = option(10.0, "loss weight of the reasoning tags' tokens (MiniMind: 10)")


@script_defaults(save_weight="full_dist", epochs=6.0, batch_size=32, learning_rate=5e-6, accumulation_steps=1,
                 save_interval=100, data_path="../dataset/sft_mini_512.jsonl", wandb_project="MiniMind-Distillation")
class DistillationArgs(MiniMindArgs):
    """MiniMind distillation (train_distillation.py defaults)."""

    hidden_size: int = option(512, "student width", aliases=("student_hidden_size",))
    num_hidden_layers: int = option(8, "student blocks", aliases=("student_num_layers",))
    from_weight: str = option("full_sft", "student weights {save_dir}/{name}_{student_hidden_size}{_moe}.pth",
                              aliases=("from_student_weight",))
    teacher_hidden_size: int = option(768, "teacher width")
    teacher_num_layers: int = option(16, "teacher blocks")
    from_teacher_weight: str = option("full_sft", "teacher weights {save_dir}/{name}_{teacher_hidden_size}{_moe}.pth")
    alpha: float = option(0.5, "weight of the CE (1 - alpha: the T^2-scaled KL)")
    temperature: float = option(1.5, "softmax temperature of the KL")

    def __post_init__(self):
        super().__post_init__()
        check(0.0 <= self.alpha <= 1.0, "alpha", "a number in [0, 1]", self.alpha)
        check(self.temperature > 0, "temperature", "a temperature > 0", self.temperature)


# the RL stages (ppo / grpo / spo share RLArgs)
RULES = ("answer",)  # --rule_rewards


@script_defaults(save_weight="grpo", epochs=1.0, batch_size=2, learning_rate=8e-8, accumulation_steps=1,
                 log_interval=1, save_interval=10, data_path="../dataset/rlaif-mini.jsonl",
                 wandb_project="MiniMind-GRPO")
class RLArgs(MiniMindArgs):
    """Flags shared by MiniMind's ppo / grpo / spo (train_grpo.py defaults at a8455ca)."""

    max_seq_len: int = option(66, "prompt tokens kept (the last ones)")
    from_weight: str | None = option(None, "policy and reference weights (default: 'reason' with --reasoning 1, "
                                           "else 'full_sft')")
    max_gen_len: int = option(1536, "new tokens per rollout")
    reasoning: int = option(1, "1: format/tag rewards, the 0.4 full + 0.6 answer reward-model mix, "
                               "and --from_weight reason", choices=(0, 1))
    reward_model_path: str = option("../../internlm2-1_8b-reward", "local HF reward model ('none': rules only)")
    trust_remote_code: int = option(0, "1: run the reward model's own code (InternLM2's get_score)", choices=(0, 1))
    rule_rewards: str = option("none", f"extra rule rewards, comma-separated from {RULES} ('none')")
    temperature: float = option(0.8, "rollout sampling temperature (MiniMind: 0.8)")
    top_p: float = option(1.0, "rollout nucleus sampling (1: off, MiniMind's generate default)")
    lr_scheduler_type: str = option("minimind_rl", "MiniMind's RL schedule: cosine from lr to lr/10 "
                                                   "(CosineAnnealingLR, eta_min = lr / 10)")

    def __post_init__(self):
        if self.from_weight is None:
            self.from_weight = "reason" if self.reasoning else "full_sft"
        super().__post_init__()
        check(self.max_gen_len >= 1, "max_gen_len", "an integer >= 1", self.max_gen_len)
        check(self.temperature > 0, "temperature", "a positive number", self.temperature)
        check(0 < self.top_p <= 1, "top_p", "a number in (0, 1]", self.top_p)
        rules = [] if self.rule_rewards in ("", "none") else self.rule_rewards.split(",")
        check(all(r in RULES for r in rules), "rule_rewards", f"'none' or a comma list from {RULES}", self.rule_rewards)

    def check_cli(self, parser):
        super().check_cli(parser)
        if not is_demo(self):  # the demo falls back to rule rewards (or builds a tiny reward model)
            msg = path_error("--reward_model_path", self.reward_model_path, "dir", ("none",),
                             "a local Hugging Face reward model folder")
            if msg:
                parser.error(msg)

    @property
    def rules(self) -> list[str]:
        return [] if self.rule_rewards in ("", "none") else self.rule_rewards.split(",")


@script_defaults(save_weight="dpo", epochs=1.0, batch_size=4, learning_rate=4e-8, accumulation_steps=1,
                 log_interval=100, save_interval=100, max_seq_len=1024, data_path="../dataset/dpo.jsonl",
                 from_weight="full_sft", wandb_project="MiniMind-DPO")
class DPOArgs(MiniMindArgs):
    """MiniMind DPO (train_dpo.py defaults)."""

    beta: float = option(0.1, "DPO temperature")
    dpo_logp: str = option("mean", "sequence score: mean token log-prob (MiniMind) or sum (TRL)",
                           choices=("mean", "sum"))

    def __post_init__(self):
        super().__post_init__()
        self.objective()

    def objective(self) -> DPOLoss:
        return DPOLoss(beta=self.beta, average_log_prob=self.dpo_logp == "mean")


@script_defaults(save_weight="ppo_actor", wandb_project="MiniMind-PPO")
class PPOArgs(RLArgs):
    critic_learning_rate: float = option(8e-8, "critic learning rate")
    clip_epsilon: float = option(0.1, "ratio clip")
    vf_coef: float = option(0.5, "value-loss coefficient")
    kl_coef: float = option(0.02, "KL-to-reference coefficient")
    update_old_actor_freq: int = option(4, "steps between old-actor refreshes (--ppo_mode sequence)")
    ppo_mode: str = option("sequence", "sequence: MiniMind's note-era objective; gae: its newer token-level PPO",
                           choices=("sequence", "gae"))
    gamma: float = option(1.0, "GAE discount (--ppo_mode gae)")
    lam: float = option(0.95, "GAE lambda (--ppo_mode gae)")
    cliprange_value: float = option(0.2, "value clip around the rollout's values (--ppo_mode gae)")
    ppo_update_iters: int = option(2, "epochs over each rollout (--ppo_mode gae)")
    early_stop_kl: float = option(0.25, "skip a rollout's remaining updates above this approx KL (--ppo_mode gae)")
    mini_batch_size: int = option(2, "responses per update (--ppo_mode gae)")
    value_head_init: str = option("random", "random: nn.Linear's init (MiniMind); mean_reward: weight 0 and bias the "
                                            "first rollout's mean reward, so the first advantages are R - mean(R)",
                                  choices=("random", "mean_reward"))

    def __post_init__(self):
        super().__post_init__()
        check(self.update_old_actor_freq >= 1, "update_old_actor_freq", "an integer >= 1", self.update_old_actor_freq)
        check(self.ppo_update_iters >= 1, "ppo_update_iters", "an integer >= 1", self.ppo_update_iters)
        check(self.mini_batch_size >= 1, "mini_batch_size", "an integer >= 1", self.mini_batch_size)
        check(0 < self.clip_epsilon < 1, "clip_epsilon", "a number in (0, 1)", self.clip_epsilon)
        self.objective()

    def objective(self) -> GRPOLoss:
        """--ppo_mode gae's token-level clipped loss + k3 KL (bnpo: the token mean over the minibatch)."""
        return GRPOLoss(loss_type="bnpo", beta=self.kl_coef, epsilon=self.clip_epsilon, epsilon_high=self.clip_epsilon)


@script_defaults(save_weight="grpo", wandb_project="MiniMind-GRPO")
class GRPOArgs(RLArgs):
    num_generations: int = option(8, "samples per prompt (1: zero advantages, see spo)")
    beta: float = option(0.02, "k3 KL coefficient to the reference")
    loss_type: str = option("grpo", "policy term and normalisation", choices=GRPO_LOSS_TYPES)
    epsilon: float = option(0.2, "lower clip (the clipped loss types)")
    epsilon_high: float | None = option(None, "upper clip (default: --epsilon; cispo: its ratio cap, MiniMind 5.0)")

    def __post_init__(self):
        super().__post_init__()
        check(self.num_generations >= 1, "num_generations", "an integer >= 1", self.num_generations)
        if self.epsilon_high is None:
            self.epsilon_high = 5.0 if self.loss_type == "cispo" else self.epsilon
        self.objective()  # the loss type's options are checked here, by the objective

    def objective(self) -> GRPOLoss:
        return GRPOLoss(loss_type=self.loss_type, beta=self.beta, epsilon=self.epsilon, epsilon_high=self.epsilon_high,
                        max_completion_length=self.max_gen_len)


@script_defaults(save_weight="spo", learning_rate=1e-7, accumulation_steps=4, wandb_project="MiniMind-SPO")
class SPOArgs(RLArgs):
    beta: float = option(0.02, "k3 KL coefficient to the reference")
    rho_mode: str = option("kl", "value-tracker decay: 'kl' (adaptive) or 'constant'", choices=("kl", "constant"))
    rho_const: float = option(0.9, "decay with rho_mode constant, and on the first step")
    D_half: float = option(0.06, "the |mean log-prob change| that halves the decay")
    clip_lower: float = option(0.5, "lower bound of rho")
    clip_upper: float = option(0.96, "upper bound of rho")

    def __post_init__(self):
        super().__post_init__()
        self.objective()

    def objective(self) -> GRPOLoss:
        return GRPOLoss(loss_type="spo", beta=self.beta)


# stage -> its flag set
STAGE_ARGS = {"pretrain": PretrainArgs, "full_sft": FullSFTArgs, "lora": LoRAArgs, "distill_reason": DistillReasonArgs,
              "distillation": DistillationArgs, "dpo": DPOArgs, "ppo": PPOArgs, "grpo": GRPOArgs, "spo": SPOArgs}
