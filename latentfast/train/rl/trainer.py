"""The RL trainer on the loop (``latentfast.train.loop``), generic over a policy (``policy.py``).

Per optimizer step the loop asks ``batches(step)`` for ``gradient_accumulation_steps`` micro-batches
and calls ``loss`` on each. An RL algorithm fills in four hooks:

    rollout(rows, round) -> dict     prompts -> completions (the decode engine, ``policy.rollout``)
    score(batch) -> (N,) rewards     reward functions / reward models (before any training forward)
    advantages(batch) -> (N,) | (N, C)   one of ``advantages.py``'s estimators
    loss(micro) -> (loss, metrics)   the objective object (``objectives.py``) on ``policy.module``'s
                                     hidden states and ``policy.head()``: no logits

``ModelArgs`` are TRL ModelConfig's (``--model_name_or_path``, ``--use_peft``, ``--lora_r``, ...);
``RLConfig`` (``rl_config.py``, torch-free) sets HF TrainingArguments' defaults where they differ from the loop's. With LoRA the
reference is the base with the adapter disabled; ``beta = 0`` builds none.
See ``grpo.py`` (GRPO), ``rloo.py`` (RLOO in one small file) and ``dpo.py`` (DPO).
"""
from __future__ import annotations

import torch

from latentfast import files
from latentfast.choices import DTYPE_NAMES
from latentfast.hf import adapter
from latentfast.ops.lm_head_engine import lm_head_logps

from ..loop import Trainer
from .policy import CausalLMPolicy
from .rl_config import RLConfig

DTYPES = {n: None if n == "auto" else getattr(torch, n) for n in DTYPE_NAMES}  # (auto: by device)


def load_policy_model(cfg: RLConfig, device):
    """(tokenizer, causal LM, PEFT-wrapped when --use_peft)."""
    from latentfast.models.local import load_causal_lm

    dtype = DTYPES[cfg.dtype] or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    tok, lm = load_causal_lm(cfg.model_name_or_path, device, dtype=dtype, seed=cfg.seed)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if cfg.gradient_checkpointing:
        adapter.enable_activation_checkpointing(lm, use_reentrant=False)
        lm.config.use_cache = False
    if cfg.use_peft:
        from peft import LoraConfig

        lm = adapter.wrap_peft(lm, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                              target_modules=cfg.lora_target_modules, task_type="CAUSAL_LM"))
    return tok, lm


class RLTrainer(Trainer):
    """Builds the policy; subclasses write the hooks (see the module docstring)."""

    name = "rl"

    def needs_reference(self) -> bool:
        return True

    def make_policy(self):
        """The policy this run trains (a family with its own weights, e.g. MiniMind, overrides this)."""
        self.tok, lm = load_policy_model(self.cfg, self.device)
        ref = None
        if self.needs_reference():
            ref = "adapter" if self.cfg.use_peft else "copy"
        return CausalLMPolicy(lm, self.tok, reference=ref)

    def build_model(self):
        self.policy = self.make_policy()
        return self.policy.module

    def reference_hidden(self, batch: dict):
        """The reference's completion hidden states (no grad), or None without a reference."""
        ctx = self.policy.reference()
        if ctx is None:
            return None
        with ctx as ref, self.amp():
            return ref(batch)[0]

    def reference_logps(self, batch: dict, temperature: float = 1.0):
        """(B, C) per-token reference log-probs through the reference's own head (no grad), or None."""
        ctx = self.policy.reference()
        if ctx is None:
            return None
        with ctx as ref, self.amp():
            W, bias = self.policy.reference_head()
            return lm_head_logps(ref(batch)[0], W, batch["completion_ids"], bias, temperature,
                                 batch["completion_mask"])[0]

    def count_completion_tokens(self, micro: list[dict]) -> None:
        """``num_items`` of every micro-batch: the step's completion tokens over all ranks (TRL's
        ``num_items_in_batch``), for the token-normalised losses (``GRPOLoss.token_normalised``)."""
        t = torch.tensor(sum(int(m["completion_mask"].sum()) for m in micro), device=self.device)
        if self.world > 1:
            torch.distributed.all_reduce(t)
        for m in micro:
            m["num_items"] = int(t)

    def experience(self, rows: list, round_: int) -> dict:
        """One batch of experience in the hooks' order: ``rollout``, ``score`` (before any training
        forward, so a reward model's activations are gone first), the reference's per-token
        log-probs (``ref_logps``, when ``needs_reference``), then ``advantages`` (a tensor, or a
        dict of extra fields such as PPO's returns)."""
        b = self.rollout(rows, round_)
        b["rewards"] = self.score(b)
        if self.needs_reference():
            b["ref_logps"] = self.reference_logps(b)
        a = self.advantages(b)
        b.update(a if isinstance(a, dict) else {"advantages": a})
        return b

    def on_train_end(self, result):
        if self.rank == 0:  # the trained model (or adapter) as HF files, as TRL's save_model
            files.save_pretrained(self.out / "final", self.policy.lm, self.tok)
        return result


__all__ = ["RLConfig", "RLTrainer", "load_policy_model"]
