"""MiniMind's RL stages (``dpo``, ``ppo``, ``grpo``, ``spo``) as configurations of ``train.rl``'s
``RLTrainer``: the MiniMind model is a ``CausalLMPolicy`` (``MiniMindPolicyTrainer``); the
rollout stages share prompts, rollouts and rewards here (``MiniMindRL``).

Each optimizer step, per micro-batch (``batches`` -> ``RLTrainer.experience``), in MiniMind's order:

    prompts     RLAIF rows -> the chat turns before the placeholder answer, rendered with the
                generation prompt, the last ``--max_seq_len`` tokens kept, left-padded
    rollout     ``policy.rollout``: the decode engine (static cache, one fixed-shape step;
                ``--max_gen_len``, ``--temperature`` 0.8, ``--top_p``); the generator is seeded by
                (seed, step, rank), so a resumed run draws the same samples
    rewards     scored *first* (reward model and rules), before any policy/reference forward:
                the reward model's activations are gone before the policy's exist
    reference   the frozen ``--from_weight`` model: per-token log-probs through the fused
                lm_head (no (B, T, V) logits), under no_grad
    loss        the stage's objective through the fused engine on the policy's hidden states
                at the completion positions, + the MoE aux loss

The rewards (``minimind_rewards``): with ``--reasoning 1`` the format (0.5) and tag (4 x 0.25)
rewards; the reward model's score clipped to +-3 (with reasoning 0.4 full + 0.6 the
``<answer>`` span); plus any ``--rule_rewards`` (``answer``: 1 when the number in the
``<answer>`` span, else the last number, equals the row's gold ``answer``).
"""
from __future__ import annotations

import pathlib

import torch
from torch import nn

from latentfast.data import minimind_rl as rldata
from latentfast.data.minimind import write_jsonl
from latentfast.data.reward_model import RewardModel, answer_span, minimind_rewards
from latentfast.data.rewards import normalize_number

from ..rl.policy import CausalLMPolicy, Sampling, completion_hidden
from ..rl.trainer import RLTrainer
from .args import RLArgs
from .common import DEMO, MiniMindTrainer, run_stage, weight_path
from .distill_reason import DistillReason
from .full_sft import FullSFT

WARMUP_SFT_STEPS = 160  # the demo's SFT warm-up when its --from_weight file is absent


def answer_reward(responses: list[str], answers: list) -> list[float]:
    """1.0 when the response's answer (the ``<answer>`` span, else its last number) equals the gold."""
    out = []
    for r, a in zip(responses, answers):
        span = answer_span(r)
        nums = (span if span is not None else r).replace(",", "").split()
        pred = next((n for n in map(normalize_number, reversed(nums)) if n is not None), None)
        out.append(1.0 if a is not None and pred is not None and pred == normalize_number(str(a)) else 0.0)
    return out


class MiniMindPolicyTrainer(MiniMindTrainer, RLTrainer):
    """A MiniMind stage on ``train.rl``'s ``RLTrainer``: the policy is the ``--from_weight``
    MiniMind model as a ``CausalLMPolicy`` (the frozen copy of the start weights is the
    reference); MiniMind's flags, weight files, checkpoints and logging stay ``MiniMindTrainer``'s."""

    def make_policy(self) -> CausalLMPolicy:
        return CausalLMPolicy(self.init_lm(self.cfg.from_weight), self.tok, reference="copy")

    def build_model(self):
        self.policy = self.make_policy()
        self.lm, self.ref = self.policy.lm, self.policy.reference_lm
        return self.policy_module()

    def policy_module(self) -> nn.Module:
        return self.policy.module


class MiniMindRL(MiniMindPolicyTrainer):
    """Base of ppo / grpo / spo: each micro-batch is ``experience`` (``RLTrainer``'s hooks in
    order: ``rollout`` -> ``score`` -> reference log-probs -> ``advantages``); subclasses write
    ``advantages`` and ``loss``."""

    config_class = RLArgs
    data_kind = "rlaif"
    num_generations = 1  # samples per prompt (grpo: --num_generations)
    demo_reward_model = True

    # ---------------------------------------------------------------- data, reward model
    def load_rows(self):
        c = self.cfg
        if c.data_path == DEMO:
            return rldata.gsm8k_prompts("train")
        from latentfast.data.minimind import read_jsonl

        return [{"conversations": conv, "answer": None} for conv in read_jsonl(c.data_path, "conversations")]

    def setup(self):
        super().setup()
        c = self.cfg
        if self.demo:
            self.make_demo_weights()
        self.reward_model = None
        path = c.reward_model_path
        if self.demo and self.demo_reward_model and "reward_model_path" not in c.explicit:
            path = pathlib.Path(c.save_dir) / "tiny_reward_model"
            if self.rank == 0:
                tiny_reward_model(path, self.tok)
            if torch.distributed.is_initialized():
                torch.distributed.barrier()
            path = str(path)
            self.print(f"demo: a tiny reward model built from a config at {path} (untrained: it exercises "
                       f"--reward_model_path; the rule rewards carry the signal)")
        if path and path != "none":
            if not pathlib.Path(path).is_dir():
                if self.demo:
                    self.print(f"--reward_model_path {path}: not found, rule rewards only")
                    path = None
                else:
                    raise FileNotFoundError(f"--reward_model_path {path}: no such directory (a local Hugging Face "
                                            f"reward model; pass --reward_model_path none for rule rewards only)")
            if path:
                self.reward_model = RewardModel.load(path, self.device, trust_remote_code=bool(c.trust_remote_code))
        if self.reward_model is None and not c.rules and not c.reasoning:
            raise ValueError("no reward: give --reward_model_path, --reasoning 1 or --rule_rewards")

    def make_demo_weights(self):
        """Demo in an empty folder: make the ``--from_weight`` file with a short run of the stage
        that writes it (``reason`` -> distill_reason, else full_sft; each chains from a warm-up)."""
        c = self.cfg
        if c.from_weight == "none":
            return
        path = weight_path(c.from_weight, self.weight_dir_of(c), c.hidden_size, c.use_moe)
        if path.is_file():
            return
        stage = DistillReason if c.from_weight == "reason" else FullSFT
        self.print(f"demo: no {path}; making it first with a short `{stage.stage}` demo (the SFT warm-up this stage "
                   f"needs)")
        data, extra = DEMO, {}
        if stage is DistillReason:  # short <think> spans, so a rollout of --max_gen_len tokens can finish
            data = str(pathlib.Path(c.save_dir) / "demo_reason_short.jsonl")
            if self.rank == 0:
                pathlib.Path(c.save_dir).mkdir(parents=True, exist_ok=True)
                write_jsonl(rldata.gsm8k_short_reason("train"), data)
            if torch.distributed.is_initialized():
                torch.distributed.barrier()
            extra = dict(from_weight="none", learning_rate=2e-3, batch_size=16, accumulation_steps=1, log_interval=20,
                         epochs=100.0)
        run_stage(stage, stage.config_class.typed(
            save_dir=c.save_dir, hidden_size=c.hidden_size, num_hidden_layers=c.num_hidden_layers, use_moe=c.use_moe,
            save_weight=c.from_weight, max_steps=WARMUP_SFT_STEPS, data_path=data, max_seq_len=256,
            device=str(self.device), dtype=c.dtype, save_interval=0, **extra))

    # ---------------------------------------------------------------- RLTrainer's hooks
    def rollout(self, rows: list[dict], round_: int) -> dict:
        """Prompts -> ``num_generations`` sampled completions each (the decode engine through the
        policy); the generator is seeded by (seed, round, rank), so a resumed run draws the same."""
        c, G = self.cfg, self.num_generations
        msgs = [rldata.rlaif_messages(r["conversations"]) for r in rows]
        ids, mask = rldata.encode_prompts(self.tok, [rldata.rlaif_prompt(self.tok, x) for x in msgs], c.max_seq_len,
                                          self.device)
        ids, mask = ids.repeat_interleave(G, 0), mask.repeat_interleave(G, 0)
        gen = torch.Generator(device=self.device).manual_seed(c.seed * 1_000_003 + round_ * self.world + self.rank)
        ro = self.policy.rollout(ids, mask, Sampling(c.max_gen_len, c.temperature, c.top_p), generator=gen)
        cmask = ro.completion_mask
        return dict(prompt_ids=ids, prompt_mask=mask, completion_ids=ro.completion_ids, completion_mask=cmask,
                    response_len=cmask.sum(1).float(), messages=msgs, answers=[r.get("answer") for r in rows])

    def score(self, b: dict) -> torch.Tensor:
        """MiniMind's rewards (reward model, format/tag rules with --reasoning 1) + --rule_rewards."""
        c, G = self.cfg, self.num_generations
        cids = b["completion_ids"].masked_fill(b["completion_mask"] == 0, self.tok.pad_token_id)
        responses = self.tok.batch_decode(cids, skip_special_tokens=True)
        r = minimind_rewards(b["messages"], responses, self.reward_model, reasoning=bool(c.reasoning),
                             num_generations=G)
        if "answer" in c.rules:
            r = r + torch.tensor(answer_reward(responses, [a for a in b["answers"] for _ in range(G)]))
        return r.to(self.device)

    def experience(self, rows: list, round_: int) -> dict:
        b = super().experience(rows, round_)
        del b["messages"], b["answers"]  # the micro-batch holds tensors only
        return b

    def batches(self, step):
        B = self.cfg.per_device_train_batch_size
        return [self.experience(self.micro_items(self.stream, step, m, B), step * 64 + m)
                for m in range(self.cfg.gradient_accumulation_steps)]

    def advantages(self, b: dict):
        raise NotImplementedError

    def policy_hidden(self, b):
        return self.model(b)

    def reward_metrics(self, b) -> dict:
        return {"reward": b["rewards"].mean(), "response_len": b["response_len"].mean()}

    def log_line(self, row):
        return (f"step {row['step']}/{self.total} reward:{row.get('reward', 0):.4f} loss:{row['loss']:.4f} "
                f"kl:{row.get('kl', 0):.4f} len:{row.get('response_len', 0):.1f} lr:{row['lr']:.3e} "
                f"{row['step_s']:.2f}s/step")


def tiny_reward_model(path: pathlib.Path, tok) -> pathlib.Path:
    """A small Llama sequence-classification reward model built from a config (no download),
    saved once with the MiniMind tokenizer: the demo's ``--reward_model_path``."""
    if (path / "config.json").is_file():
        return path
    from transformers import LlamaConfig, LlamaForSequenceClassification

    with torch.random.fork_rng():
        torch.manual_seed(1234)
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, num_labels=1, pad_token_id=tok.pad_token_id)
        LlamaForSequenceClassification(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


__all__ = ["MiniMindPolicyTrainer", "MiniMindRL", "RLArgs", "answer_reward", "completion_hidden", "tiny_reward_model"]
