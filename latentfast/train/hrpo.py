"""HRPO: GRPO training of hybrid latent reasoning (seed notes 000/001): the trainer. Its command
line, flags and defaults (the recipe's) are ``hrpo_config.py`` (``latentfast-hrpo``; torch-free, so
``--help`` answers at once); ``python -m latentfast.train.hrpo`` runs the same ``main``.
HRPO is a configuration of the RL trainer (``latentfast.train.rl``): the thinking policy
(``rl.thinking.ThinkingLMPolicy``: hybrid-thinking rollouts, ``HybridThinkingLM``'s hidden states,
its lm_head, adapters disabled as the reference), TRL's group z-score and ``GRPOLoss``.
"""
from __future__ import annotations

import pathlib
import time

import torch

from latentfast import files
from latentfast.data import get_reward_funcs
from latentfast.data.synthetic import SETS as SYNTHETIC_SETS, synthetic_rows
from latentfast.data import prompts as prompting
from latentfast.data.qa import encode_answers
from latentfast.data.tasks import get_task, load_task_rows
from latentfast.eval import hrpo as hrpo_eval
from latentfast.models import HybridConfig, HybridThinkingLM
from latentfast.models.local import load_causal_lm
from latentfast.runtime import dist

from .common import SampleStream
from .hrpo_config import LOSS_TYPES, HRPOConfig, build_parser, parse_args
from .entry import console_entry
from .rl.advantages import trl_group_zscore
from .rl.policy import Sampling
from .rl.thinking import ThinkingLMPolicy
from .rl.trainer import RLTrainer
from .sft import warm_up


# ----------------------------------------------------------------------------- data
def encode_prompts(tok, rows, max_len, device, args):
    return prompting.encode_prompts(tok, [r["question"] for r in rows], max_len, device, args.system_prompt,
                                    False if args.no_chat_template else None)


def decode_completions(tok, rollout) -> list[str]:
    ids = rollout.completion_ids.masked_fill(rollout.completion_mask == 0, tok.pad_token_id)
    return tok.batch_decode(ids.tolist(), skip_special_tokens=True)


def group_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(r - mean_group) / (std_group + 1e-4), TRL's GRPO normalisation (``rl.advantages.trl_group_zscore``).
    A group of one has no spread (its sample std is NaN): its advantage is 0, never NaN."""
    return trl_group_zscore(rewards, group_size, "group")


# ----------------------------------------------------------------------------- model
def load_model(args, device):
    """(tokenizer, HF causal LM, warmed up?). The demo builds both in code."""
    base = pathlib.Path(args.output_dir) / "base_model"
    if args.demo and (base / "config.json").exists():  # resumed demo: reuse the warmed-up base
        from transformers import AutoModelForCausalLM

        from latentfast.data import build_tokenizer
        from latentfast.models.local import from_local

        tok = build_tokenizer()
        return tok, from_local(AutoModelForCausalLM, base).to(device), True
    # fp32 master weights under bf16 autocast (as codi.py and HF Trainer's --bf16): AdamW steps on
    # bf16 weights lose most updates; only a frozen LoRA base may stay bf16
    use_bf16 = args.bf16 if args.bf16 is not None else device.type == "cuda"
    dtype = torch.bfloat16 if (args.lora_rank > 0 and use_bf16 and not args.demo) else torch.float32
    tok, lm = load_causal_lm(args.model_name, device, dtype=dtype, seed=args.seed)
    return tok, lm, not args.demo


def warmup_encoder(cfg: HRPOConfig):
    """``SFT`` batches in HRPO's prompt format (chat template / system prompt as the rollouts)."""
    chat = False if cfg.no_chat_template else None

    def encode(tok, rows, max_length, device):
        return encode_answers(tok, rows, max_length, device,
                              prompt=lambda q: prompting.render_prompt(tok, q, cfg.system_prompt, chat))
    return encode


def optimizer_groups(model, args) -> list[dict]:
    """The recipe's groups (patch.py): decay / no-decay / gates / Lambda / projection."""
    def special(n):
        return "thinking_residual" in n or "thinking_projection" in n

    def decays(n, p):
        return p.dim() >= 2 and not n.endswith("bias") and "norm" not in n.lower()

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        dict(params=[p for n, p in named if not special(n) and decays(n, p)], lr=args.lr, weight_decay=args.weight_decay),
        dict(params=[p for n, p in named if not special(n) and not decays(n, p)], lr=args.lr, weight_decay=0.0),
        dict(params=[p for n, p in named if "thinking_residual_gate" in n], lr=args.lr_residual_gate,
             weight_decay=args.weight_decay),
        dict(params=[p for n, p in named if "thinking_residual_Lambda" in n], lr=args.lr_residual_Lambda,
             weight_decay=0.0),
        dict(params=[p for n, p in named if "thinking_projection" in n], lr=args.lr_thinking_projection,
             weight_decay=args.weight_decay),
    ]
    return [g for g in groups if g["params"]]


def make_optimizer(groups, args):
    if args.optimizer == "paged_adamw_8bit":
        try:
            import bitsandbytes as bnb

            return bnb.optim.PagedAdamW8bit(groups)
        except ImportError:
            print("[hrpo] bitsandbytes not installed: using torch AdamW", flush=True)
    return torch.optim.AdamW(groups, betas=(0.9, 0.99))


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def projection_weight(model):
    proj = model.thinking.projection
    if proj is None:
        return None
    if hasattr(proj, "weight"):  # (PEFT resolves .weight to the trainable copy)
        return proj.weight
    mats = [p for p in proj.parameters() if p.dim() == 2]  # LayerNorm/MLP variants: first matrix
    return next((p for p in mats if p.requires_grad), mats[0])


def rollout_stats(rolled: list[dict], task) -> dict:
    """The step's means (over micro-batches) of each micro-batch's rollout means."""
    stats = {k: [] for k in ("reward", "accuracy", "completion_length", "thinking_fraction", "embeds_ratio",
                             "reward_std")}
    for b in rolled:
        rewards, lens = b["rewards"], b["completion_mask"].sum(1).float()
        stats["reward"].append(rewards.mean().item())
        stats["accuracy"].append(sum(task.accuracy(b["texts"], [r["answer"] for r in b["rows"]])) / len(b["texts"]))
        stats["completion_length"].append(lens.mean().item())
        stats["thinking_fraction"].append((b["thinking_mask"].sum() / lens.sum().clamp(min=1)).item())
        if b["embeds_ratio"].numel():
            stats["embeds_ratio"].append(b["embeds_ratio"].mean().item())
        stats["reward_std"].append(rewards.std().item())
    return {k: sum(v) / len(v) for k, v in stats.items() if v}


# ----------------------------------------------------------------------------- training
BATCH_KEYS = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "thinking_mask", "thinking_hidden",
              "advantages", "ref_logps")


class HRPO(RLTrainer):
    """HRPO on the RL trainer: the thinking policy (``rl.thinking``) and ``RLTrainer``'s hooks, per
    micro-batch through ``experience``: ``rollout`` (hybrid thinking), ``score`` (the task's reward
    functions), the reference's log-probs (adapters disabled), ``advantages`` (``trl_group_zscore`` per
    group); ``loss``: ``GRPOLoss`` (``--loss_type``) on the model's completion hidden states."""

    name = "hrpo"
    eval_at_start = True

    def setup(self):
        c, dev = self.cfg, self.device
        if c.demo and dev.type == "cpu":
            torch.set_num_threads(1)  # tiny shapes: more intra-op threads only contend (much slower on a busy box)
        if c.demo and self.rank == 0:
            print("[hrpo] " + c.banner(), flush=True)
        self.tok, self.lm, warmed = load_model(c, dev)
        prompting.prepare_tokenizer(self.tok)
        self.task = get_task(c.task)
        if c.sft_steps > 0 and not warmed:  # the demo's tiny model starts random
            # on worked solutions of the training set's kind (its synthetic set; other seed), else 1-3 operations
            kind = c.train_data if c.train_data in SYNTHETIC_SETS else "synthetic"
            warm_up(c, self.lm, self.tok, synthetic_rows(kind, 20000, c.seed + 7), steps=c.sft_steps, lr=c.sft_lr,
                    output_dir=self.out / "sft_warmup", encode=warmup_encoder(c),
                    warmup_ratio=min(1.0, 20 / c.sft_steps), max_length=c.max_prompt_length + c.max_completion_length)
            if self.rank == 0 and c.demo:
                files.save_pretrained(self.out / "base_model", self.lm)  # resume needs the warmed-up base
        self.train_rows = load_task_rows(self.task, c.train_data, "train", None, c.seed, c.dataset_root)
        self.eval_rows = [] if not c.eval_size else \
            load_task_rows(self.task, c.eval_data, "test", c.eval_size, c.seed + 10_000, c.dataset_root)  # 0 = none
        self.stream = SampleStream(self.train_rows, c.seed)
        self.ppm = c.per_device_train_batch_size // c.group_size  # prompts per micro-batch
        self.reward_fns = get_reward_funcs(c.reward_funcs, self.task)
        demo_base = c.demo and (warmed or c.sft_steps > 0)  # the demo's warmed-up base, saved in output_dir
        self.spec = hrpo_eval.hrpo_spec(c, str((self.out / "base_model").resolve()) if demo_base else c.model_name)
        self.gen = torch.Generator(device=dev)
        self.sampling = Sampling(c.max_completion_length, c.temperature, c.top_p)
        self.loss_fn = c.objective()
        self.evals = []

    def needs_reference(self):
        return self.cfg.beta != 0.0

    def make_policy(self):
        c = self.cfg
        model = HybridThinkingLM(self.lm, HybridConfig(thinking_state=c.thinking_state, projection=c.projection,
                                                       r_min=c.residual_r_min, r_max=c.residual_r_max))
        if c.lora_rank > 0:
            model.add_lora(c.lora_rank)
        elif c.beta != 0.0:
            raise SystemExit("--beta > 0 needs a reference policy: use --lora_rank > 0 (adapters disabled = reference)")
        if c.gradient_checkpointing:
            model.enable_activation_checkpointing()
        if c.lr_thinking_projection == 0:  # stage 1 of the two-stage schedule: projection frozen
            for n, p in model.named_parameters():
                if "thinking_projection" in n:
                    p.requires_grad_(False)
        w = projection_weight(model)
        self.w0 = None if w is None else w.detach().float().clone()  # (before FSDP2 shards it)
        return ThinkingLMPolicy(model, self.tok)

    def fsdp_layers(self, module):
        return list(module.transformer.layers)

    def optimizer_groups(self, module):
        return optimizer_groups(module, self.cfg)

    def make_optimizer(self, groups):
        return make_optimizer(groups, self.cfg)

    def num_train_items(self):
        return len(self.train_rows)

    def items_per_step(self):
        return self.ppm * self.cfg.gradient_accumulation_steps * self.world

    # ---------------------------------------------------------------- hooks
    def rollout(self, rows: list[dict], step: int) -> dict:
        """``rows`` x ``group_size`` completions: ``Rollout.as_batch()`` + ``rows`` / ``texts`` / ``embeds_ratio``."""
        ids, mask = encode_prompts(self.tok, rows, self.cfg.max_prompt_length, self.device, self.cfg)
        ro = self.policy.rollout(ids, mask, self.sampling, generator=self.gen)
        return {**ro.as_batch(), "rows": rows, "texts": decode_completions(self.tok, ro), "embeds_ratio": ro.embeds_ratio}

    def score(self, b: dict) -> torch.Tensor:
        answers = [r["answer"] for r in b["rows"]]
        return torch.tensor([sum(v) for v in zip(*[fn(b["texts"], answers) for fn in self.reward_fns])],
                            device=self.device, dtype=torch.float32)

    def advantages(self, b: dict) -> torch.Tensor:
        return group_advantages(b["rewards"], self.cfg.group_size)

    def loss(self, mb):
        hidden, aux = self.model(mb, recompute=self.cfg.recompute)
        W, bias = self.policy.head()
        loss, met = self.loss_fn(hidden, W, bias, mb["completion_ids"], mb["completion_mask"], mb["advantages"],
                                 ref=mb.get("ref_logps"), num_items_in_batch=mb.get("num_items"))
        return loss + aux, {**mb["stats"], **met}  # (every micro-batch carries the step's rollout means)

    def micro_weights(self, micro):  # dapo / cispo / vespo: the micro-batch losses are parts of one token-mean
        return [1.0] * len(micro) if self.loss_fn.token_normalised else [1.0 / len(micro)] * len(micro)

    def batches(self, step):
        c = self.cfg
        self.gen.manual_seed(c.seed * 100003 + step * 1009 + self.rank)  # resumable sampling
        t0 = time.perf_counter()
        self.module.eval()
        rolled = []
        for m in range(c.gradient_accumulation_steps):
            rows = [r for r in self.micro_items(self.stream, step, m, self.ppm) for _ in range(c.group_size)]
            with torch.no_grad(), self.amp(), dist.gathered(self.model):
                rolled.append(self.experience(rows, step))
        self.t_roll = time.perf_counter() - t0
        self.n_tokens = sum(int(b["prompt_mask"].sum() + b["completion_mask"].sum()) for b in rolled)
        stats = rollout_stats(rolled, self.task)
        micro = [{**{k: b[k] for k in BATCH_KEYS if k in b}, "stats": stats} for b in rolled]
        if self.loss_fn.token_normalised:  # the op divides by world itself: micro-batch losses add up to one mean
            self.count_completion_tokens(micro)
        self.t_train0 = time.perf_counter()
        return micro

    def proj_weight(self):
        return projection_weight(self.module)  # after wrapping: FSDP2 replaces parameters

    def before_optimizer_step(self):  # the projection gradient, before clipping
        w = self.proj_weight()
        self.proj_grad = _full(w.grad).float().norm().item() if (w is not None and w.grad is not None) else None

    def step_metrics(self, row):
        t_train = time.perf_counter() - self.t_train0
        w = self.proj_weight()
        if w is not None:
            row["thinking_projection/weight_change"] = (_full(w).detach().float() - self.w0).abs().mean().item()
            row["thinking_projection/grad_norm"] = self.proj_grad if self.proj_grad is not None else 0.0
        row["tokens_per_s"] = self.n_tokens * self.world / (self.t_roll + t_train)
        row["train_tokens_per_s"] = self.n_tokens * self.world / t_train
        row["rollout_s"], row["train_s"] = self.t_roll, t_train

    def progress(self, row):
        return dict(reward=f"{row['reward']:.2f}", acc=f"{row['accuracy']:.2f}", kl=f"{row.get('kl', 0):.4f}")

    def log_line(self, row):
        return (f"Step {row['step']}: loss={row['loss']:.4f} reward={row['reward']:.3f} "
                f"accuracy={row['accuracy']:.3f} kl={row.get('kl', 0):.4f} lr={row['lr']:.2e}")

    def evaluate(self, step):
        """Greedy hybrid decoding of the held-out rows, split across ranks: ``latentfast.eval.hrpo``'s
        metrics (accuracy, reward, format, ...), as ``latentfast-hrpo-eval`` computes them."""
        c = self.cfg
        if not self.eval_rows:  # --eval_size 0
            return {}
        m, _ = hrpo_eval.evaluate(self.module, self.tok, c.task, self.eval_rows, max_prompt_length=c.max_prompt_length,
                                  max_new_tokens=c.max_completion_length, batch_size=64, greedy=True,
                                  temperature=c.temperature, system_prompt=c.system_prompt,
                                  chat_template=False if c.no_chat_template else None, amp=self.amp,
                                  gathered=lambda: dist.gathered(self.model))
        ev = {f"eval_{k}": v for k, v in m.items() if isinstance(v, (int, float))}
        if not self.evals:
            self.print(f"step {step}: held-out accuracy {ev['eval_accuracy']:.3f} (reward {ev['eval_reward']:.3f}, "
                       f"format {ev['eval_format']:.3f})")
        self.evals.append(ev)
        return ev

    def checkpoint_extra(self):
        return {"hrpo": self.spec}  # latentfast-hrpo-eval rebuilds the model from it

    def on_train_end(self, result):
        # one number per rank over the trainable weights: DDP/FSDP ranks must agree
        checksum = sum(_full(p.detach()).double().abs().sum().item()
                       for g in self.optimizer.param_groups for p in g["params"])
        if not self.eval_rows:
            self.print(f"no evaluation (--eval_size 0); checkpoint {result['checkpoint']}; "
                       f"metrics {self.out / 'metrics.jsonl'}")
            return {"trainable_checksum": checksum}
        ev0, ev1 = self.evals[0], result["final"]
        self.print(f"held-out accuracy {ev0['eval_accuracy']:.3f} -> {ev1['eval_accuracy']:.3f} (recipe reward "
                   f"{ev0['eval_reward']:.3f} -> {ev1['eval_reward']:.3f}, format {ev0['eval_format']:.3f} -> "
                   f"{ev1['eval_format']:.3f}); checkpoint {result['checkpoint']}; "
                   f"metrics {self.out / 'metrics.jsonl'}")
        return {"eval_accuracy_before": ev0["eval_accuracy"], "eval_accuracy_after": ev1["eval_accuracy"],
                "eval_reward_before": ev0["eval_reward"], "eval_reward_after": ev1["eval_reward"],
                "trainable_checksum": checksum}


def run(cfg: HRPOConfig) -> dict:
    """Train a parsed config (``latentfast-hrpo``: ``latentfast.scripts.train``)."""
    return HRPO(cfg).fit()


def main(argv=None) -> dict:
    """``python -m latentfast.train.hrpo`` (and torchrun): parse, train."""
    return run(parse_args(argv))


cli = console_entry(main)


__all__ = ["HRPO", "HRPOConfig", "LOSS_TYPES", "build_parser", "cli", "decode_completions", "encode_prompts",
           "group_advantages", "load_model", "main", "run", "make_optimizer", "optimizer_groups", "parse_args",
           "projection_weight", "warmup_encoder"]


if __name__ == "__main__":
    cli()
