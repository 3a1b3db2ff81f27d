"""HRPO: GRPO training of hybrid latent reasoning (seed notes 000/001): the trainer. Its command
line, flags and defaults (the recipe's) are ``hrpo_config.py`` (``latentfast-hrpo``; torch-free, so
``--help`` answers at once); ``python -m latentfast.train.hrpo`` runs the same ``main``.
The training loop is ``latentfast.train.loop``: rollouts, rewards, advantages and reference
log-probs are ``HRPO.batches``, the loss ``rl.objectives.GRPOLoss`` on ``HybridThinkingLM``'s hidden states.
"""
from __future__ import annotations

import pathlib
import time

import torch

from latentfast import files
from latentfast.data import get_reward_funcs, make_arithmetic
from latentfast.data import prompts as prompting
from latentfast.data.qa import encode_answers
from latentfast.data.tasks import get_task, load_task_rows
from latentfast.eval import hrpo as hrpo_eval
from latentfast.models import HybridConfig, HybridThinkingLM, eos_token_ids, generate
from latentfast.models.local import load_causal_lm
from latentfast.runtime import dist

from .common import SampleStream
from .hrpo_config import LOSS_TYPES, HRPOConfig, build_parser, cli, main, parse_args
from .loop import Trainer
from .rl.advantages import trl_group_zscore
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


# ----------------------------------------------------------------------------- training
class HRPO(Trainer):
    """HRPO on the loop. ``batches(step)``: rollouts of every micro-batch (no grad), rewards,
    group advantages and reference log-probs; ``loss``: the fused GRPO loss of the hybrid model."""

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
            warm_up(c, self.lm, self.tok, make_arithmetic(20000, seed=c.seed + 7), steps=c.sft_steps, lr=c.sft_lr,
                    output_dir=self.out / "sft_warmup", encode=warmup_encoder(c),
                    warmup_ratio=min(1.0, 20 / c.sft_steps), max_length=c.max_prompt_length + c.max_completion_length)
            if self.rank == 0 and c.demo:
                files.save_pretrained(self.out / "base_model", self.lm)  # resume needs the warmed-up base
        self.train_rows = load_task_rows(self.task, c.train_data, "train", None, c.seed, c.dataset_root)
        self.eval_rows = [] if not c.eval_size else \
            load_task_rows(self.task, c.eval_data, "test", c.eval_size, c.seed + 10_000, c.dataset_root)  # 0 = none
        self.stream = SampleStream(self.train_rows, c.seed)
        self.ppm = c.per_device_train_batch_size // c.group_size  # prompts per micro-batch
        self.hybrid = HybridConfig(thinking_state=c.thinking_state, projection=c.projection,
                                   r_min=c.residual_r_min, r_max=c.residual_r_max)
        self.marker_ids = self.tok.encode(self.hybrid.answer_marker, add_special_tokens=False)
        self.reward_fns = get_reward_funcs(c.reward_funcs, self.task)
        demo_base = c.demo and (warmed or c.sft_steps > 0)  # the demo's warmed-up base, saved in output_dir
        self.spec = hrpo_eval.hrpo_spec(c, str((self.out / "base_model").resolve()) if demo_base else c.model_name)
        self.gen = torch.Generator(device=dev)
        self.loss_fn = c.objective()
        self.evals = []

    def build_model(self):
        c = self.cfg
        model = HybridThinkingLM(self.lm, self.hybrid)
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
        self.eos_ids = eos_token_ids(self.tok, model.hf_model)
        w = projection_weight(model)
        self.w0 = None if w is None else w.detach().float().clone()  # (before FSDP2 shards it)
        return model

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

    def batches(self, step):
        c, model, dev = self.cfg, self.module, self.device
        self.gen.manual_seed(c.seed * 100003 + step * 1009 + self.rank)  # resumable sampling
        t0 = time.perf_counter()
        micro, stats = [], {"reward": [], "accuracy": [], "completion_length": [], "thinking_fraction": [],
                            "embeds_ratio": [], "reward_std": []}
        model.eval()
        for m in range(c.gradient_accumulation_steps):
            rows = [r for r in self.micro_items(self.stream, step, m, self.ppm) for _ in range(c.group_size)]
            ids, mask = encode_prompts(self.tok, rows, c.max_prompt_length, dev, c)
            with torch.no_grad(), self.amp(), dist.gathered(self.model):
                ro = generate(model, ids, mask, c.max_completion_length, eos_token_id=self.eos_ids,
                              pad_token_id=self.tok.pad_token_id, marker_ids=self.marker_ids,
                              temperature=c.temperature, top_p=c.top_p, generator=self.gen)
                batch = ro.as_batch()
                ref = None
                if c.beta != 0.0:
                    with model.reference():
                        ref = model.per_token_logps(batch)
            texts = decode_completions(self.tok, ro)
            answers = [r["answer"] for r in rows]
            rewards = torch.tensor([sum(v) for v in zip(*[fn(texts, answers) for fn in self.reward_fns])],
                                   device=dev, dtype=torch.float32)
            micro.append((batch, group_advantages(rewards, c.group_size), ref))
            lens = ro.completion_mask.sum(1).float()
            stats["reward"].append(rewards.mean().item())
            stats["accuracy"].append(sum(self.task.accuracy(texts, answers)) / len(texts))
            stats["completion_length"].append(lens.mean().item())
            stats["thinking_fraction"].append((ro.thinking_mask.sum() / lens.sum().clamp(min=1)).item())
            if ro.embeds_ratio.numel():
                stats["embeds_ratio"].append(ro.embeds_ratio.mean().item())
            stats["reward_std"].append(rewards.std().item())
        self.t_roll = time.perf_counter() - t0
        self.n_tokens = sum(int(b["prompt_mask"].sum() + b["completion_mask"].sum()) for b, _, _ in micro)
        num_items = None
        if self.loss_fn.token_normalised:  # dapo / cispo / vespo, the op's convention: completion tokens of the whole step, all ranks and
            # micro-batches (it divides by world itself; micro-batch losses then add up to one token-mean)
            t = torch.tensor(sum(int(b["completion_mask"].sum()) for b, _, _ in micro), device=dev, dtype=torch.int64)
            if self.world > 1:
                torch.distributed.all_reduce(t)
            num_items = int(t.item())
        step_stats = {k: sum(v) / len(v) for k, v in stats.items() if v}  # the step's rollout means
        self.t_train0 = time.perf_counter()
        return [(batch, adv, ref, num_items, step_stats) for batch, adv, ref in micro]

    def micro_weights(self, micro):  # dapo / cispo / vespo: the micro-batch losses are parts of one token-mean
        return [1.0] * len(micro) if self.loss_fn.token_normalised else [1.0 / len(micro)] * len(micro)

    def loss(self, mb):
        batch, adv, ref, num_items, step_stats = mb
        hidden, aux = self.model(batch, recompute=self.cfg.recompute)
        loss, met = self.loss_fn(hidden, self.module.lm_head_weight(), self.module.lm_head_bias(),
                                 batch["completion_ids"], batch["completion_mask"], adv, ref=ref,
                                 num_items_in_batch=num_items)
        return loss + aux, {**step_stats, **met}  # (every micro-batch carries the step's rollout means)

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


__all__ = ["HRPO", "HRPOConfig", "LOSS_TYPES", "build_parser", "cli", "decode_completions", "encode_prompts",
           "group_advantages", "load_model", "main", "make_optimizer", "optimizer_groups", "parse_args",
           "projection_weight", "warmup_encoder"]  # (the config and its command line: re-exported from hrpo_config)


if __name__ == "__main__":
    cli()
