"""Rewards of MiniMind's RL stages: a local Hugging Face reward model and the reasoning-format rules.

    rm = RewardModel.load("/models/internlm2-1_8b-reward", device, trust_remote_code=True)
    r = minimind_rewards(prompt_messages, responses, rm, reasoning=True)      # MiniMind calculate_rewards

A reward model is either a sequence-classification head (``AutoModelForSequenceClassification``,
score = logit 0 of the chat rendered by its tokenizer's chat template) or a model that exposes
``get_score(tokenizer, chat)`` as InternLM2's reward model does (its code ships with the
checkpoint: loaded only with ``trust_remote_code=True``, which the user passes). Scores are
clipped to +-3 (MiniMind's ``scale``). Scoring runs under ``no_grad`` one small batch
at a time and the trainers call it before the policy/reference forwards, so its activations
are gone before theirs exist (MiniMind users hit OOM there).
"""
from __future__ import annotations

import os
import re

import torch

from latentfast.seam import Seam

from .rewards import REWARD_SCALE

_FORMAT = (re.compile(r"^<think>\n.*?\n</think>\n<answer>\n.*?\n</answer>$", re.S),
           re.compile(r"^<think>\n.*?\n</think>\n\n<answer>\n.*?\n</answer>$", re.S))
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.S)
TAGS = ("<think>", "</think>", "<answer>", "</answer>")
_SEAM = Seam()
# ``with substitute(loader):`` makes ``RewardModel.load(path, device, ...)`` return ``loader(path, device,
# ...)`` (a ``RewardModel``): the planner scores rollouts with a reward model built from its config alone
substitute = _SEAM.substitute


def format_rewards(responses: list[str]) -> list[float]:
    """0.5 when the response is exactly ``<think>\\n...\\n</think>\\n(\\n)<answer>\\n...\\n</answer>``."""
    return [0.5 if any(p.match(r) for p in _FORMAT) else 0.0 for r in responses]


def tag_rewards(responses: list[str]) -> list[float]:
    """0.25 for each of the four tags that occurs exactly once."""
    return [sum(0.25 for t in TAGS if r.count(t) == 1) for r in responses]


def answer_span(response: str) -> str | None:
    m = _ANSWER.search(response)
    return m.group(1).strip() if m else None


class RewardModel:
    """A frozen local reward model: ``score(chats) -> (N,)`` fp32 scores clipped to +-``scale``."""

    def __init__(self, model, tokenizer, scale: float = REWARD_SCALE, max_length: int = 2048):
        self.model, self.tokenizer, self.scale, self.max_length = model.eval(), tokenizer, float(scale), max_length
        self.has_get_score = callable(getattr(model, "get_score", None))
        for p in model.parameters():
            p.requires_grad_(False)

    @classmethod
    def load(cls, path: str, device, dtype=None, trust_remote_code: bool = False, scale: float = REWARD_SCALE):
        if _SEAM.current is not None:
            return _SEAM.current(path, device, dtype=dtype, trust_remote_code=trust_remote_code, scale=scale)
        from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, AutoTokenizer

        if not os.path.isdir(path):
            raise FileNotFoundError(f"--reward_model_path {path!r} is not a local directory (nothing is downloaded)")
        try:
            config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=True)
        except ValueError as e:
            if not trust_remote_code and "trust_remote_code" in str(e):
                raise ValueError(f"--reward_model_path {path!r} ships its own model code; pass --trust_remote_code 1 "
                                 "if you trust it") from e
            raise
        archs = getattr(config, "architectures", None) or []
        kw = dict(trust_remote_code=trust_remote_code, local_files_only=True)
        if dtype is not None:
            kw["dtype"] = dtype
        if any(a.endswith("ForSequenceClassification") for a in archs):
            model = AutoModelForSequenceClassification.from_pretrained(path, **kw)
        else:
            model = AutoModel.from_pretrained(path, **kw)
            if not callable(getattr(model, "get_score", None)):
                raise ValueError(f"--reward_model_path {path!r}: expected a *ForSequenceClassification model or one "
                                 f"with get_score(tokenizer, chat), got architectures {archs}")
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=True)
        return cls(model.to(device), tok, scale=scale)

    @torch.no_grad()  # not inference_mode: callers mix the scores into tensors in place
    def score(self, chats: list[list[dict]], batch_size: int = 8) -> torch.Tensor:
        if self.has_get_score:
            raw = [float(self.model.get_score(self.tokenizer, chat)) for chat in chats]
        else:
            raw = []
            dev = next(self.model.parameters()).device
            pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
            for i in range(0, len(chats), batch_size):
                texts = [self.tokenizer.apply_chat_template(c, tokenize=False) for c in chats[i:i + batch_size]]
                enc = self.tokenizer(texts, return_tensors="pt", padding=True, truncation=True,
                                     max_length=self.max_length, add_special_tokens=False)
                if self.model.config.pad_token_id is None:
                    self.model.config.pad_token_id = pad
                out = self.model(input_ids=enc["input_ids"].to(dev), attention_mask=enc["attention_mask"].to(dev))
                raw.extend(out.logits[:, 0].float().tolist())
        return torch.tensor(raw, dtype=torch.float32).clamp(-self.scale, self.scale)


def minimind_rewards(prompts: list[list[dict]], responses: list[str], reward_model: RewardModel | None = None, *,
                     reasoning: bool = False, num_generations: int = 1) -> torch.Tensor:
    """MiniMind's ``calculate_rewards``: with ``reasoning`` the format (0.5) and tag (4 x 0.25)
    rewards; plus the reward model's clipped score of the whole response, or with
    ``reasoning`` and an ``<answer>`` span ``0.4 full + 0.6 answer-only``. ``prompts`` are the
    chat messages before the response, one per prompt (``num_generations`` responses each)."""
    if len(responses) != len(prompts) * num_generations:
        raise ValueError(f"{len(responses)} responses for {len(prompts)} prompts x {num_generations} generations")
    rewards = torch.zeros(len(responses))
    if reasoning:
        rewards += torch.tensor(format_rewards(responses)) + torch.tensor(tag_rewards(responses))
    if reward_model is None:
        return rewards
    msgs = [prompts[i // num_generations] for i in range(len(responses))]
    full = reward_model.score([m + [{"role": "assistant", "content": r}] for m, r in zip(msgs, responses)])
    if reasoning:
        spans = [answer_span(r) for r in responses]
        idx = [i for i, s in enumerate(spans) if s is not None]
        if idx:
            ans = reward_model.score([msgs[i] + [{"role": "assistant", "content": spans[i]}] for i in idx])
            full[idx] = 0.4 * full[idx] + 0.6 * ans
    return rewards + full
