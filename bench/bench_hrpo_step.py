"""End-to-end HRPO training step: this design vs the recipe's two-pass design.

impls (same model, LoRA, batch and fused GRPO loss unless named):
  stored            latentfast: thinking residual recomputed from the hidden states the
                    rollout stored (N_think x D), one forward+backward.
  two_pass          the recipe's design: an extra no-grad forward builds a B x T x D
                    hidden cache, then the forward+backward (baseline of the ratios).
  recipe_logits     two_pass as the recipe writes it (unmixed first pass) + a full
                    logits tensor and the eager GRPO loss: the recipe's whole step.
  stored_checkpointed  stored with activation checkpointing of the decoder layers
                    (``--gradient_checkpointing``): the memory/compute trade-off.
Case "train" excludes the rollout; case "rollout+train" includes KV-cache generation.
CPU: the tiny Qwen2 (fp32). GPU: a Qwen2.5-0.5B-shaped model (random weights, bf16
weights + bf16 autocast, vocab 151936).
"""
from __future__ import annotations

import contextlib
import functools

import torch

from measure import compare

from latentfast.data import build_tokenizer
from latentfast.generation import generate
from latentfast.models import HybridConfig, HybridThinkingLM, build_tiny_causal_lm
from latentfast.reference.grpo_loss import grpo_loss as eager_grpo_loss
from latentfast.train.rl.objectives import GRPOLoss

LOSS = dict(beta=0.005, loss_type="grpo")
FUSED = GRPOLoss(**LOSS)  # HRPO's objective (latentfast-hrpo's defaults)


def _model(device, size, lora_rank, dtype):
    tok = build_tokenizer()
    torch.manual_seed(0)
    lm = build_tiny_causal_lm(tok, size=size).to(device, dtype)
    m = HybridThinkingLM(lm, HybridConfig()).add_lora(lora_rank)
    return tok, m.to(device)


def _synthetic_rollout(m, B, P, C, think_frac, device, dtype):
    """A rollout-shaped batch: left-padded prompts, completions of varied length, a
    thinking prefix of ~think_frac of each completion, stored hidden states."""
    g = torch.Generator().manual_seed(0)
    V, D = m.config.vocab_size, m.config.hidden_size
    prompt_ids = torch.randint(10, min(V, 1000), (B, P), generator=g)
    plen = torch.randint(P // 2, P + 1, (B,), generator=g)
    prompt_mask = (torch.arange(P)[None] >= (P - plen)[:, None]).long()
    clen = torch.randint(C // 2, C + 1, (B,), generator=g)
    completion_mask = (torch.arange(C)[None] < clen[:, None]).long()
    think = torch.arange(C)[None] < (clen * think_frac).long()[:, None]
    think[:, 0] = True
    think &= completion_mask.bool()
    completion_ids = torch.randint(10, min(V, 1000), (B, C), generator=g)
    hidden = torch.randn(int(think.sum()), D, generator=g)
    b = dict(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
             completion_mask=completion_mask, thinking_mask=think, thinking_hidden=hidden.to(dtype))
    return {k: v.to(device) for k, v in b.items()}


def _train_step(m, batch, adv, ref, mode, amp):
    with amp():
        if mode == "recipe_logits":
            hidden, _ = m.completion_hidden(batch, "two_pass_clean")
            loss, _ = eager_grpo_loss(hidden, m.lm_head_weight(), batch["completion_ids"], batch["completion_mask"],
                                      adv, ref_per_token_logps=ref, **LOSS)
        else:
            hidden, _ = m(batch, recompute=mode)
            loss, _ = FUSED(hidden, m.lm_head_weight(), m.lm_head_bias(), batch["completion_ids"],
                            batch["completion_mask"], adv, ref=ref)
    loss.backward()
    for p in m.parameters():
        p.grad = None
    return None


def run(device, quick):
    cuda = device.type == "cuda"
    if cuda:
        size, dtype, lora, B, P, C, gen_C = "0.5b", torch.bfloat16, 32, 8, 256, 512, 64
    elif quick:
        size, dtype, lora, B, P, C, gen_C = "tiny", torch.float32, 16, 16, 48, 64, 32
    else:
        size, dtype, lora, B, P, C, gen_C = "0.5b", torch.float32, 32, 2, 64, 128, 16
    amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else contextlib.nullcontext
    tok, m = _model(device, size, lora, dtype)
    m.train()
    cases = []

    batch = _synthetic_rollout(m, B, P, C, 0.7, device, dtype)
    adv = torch.randn(B, device=device)
    ref = torch.full((B, C), -7.0, device=device)
    impls = {mode: (lambda mode=mode: _train_step(m, batch, adv, ref, mode, amp))
             for mode in ("stored", "two_pass", "recipe_logits")}
    _, m_ckpt = _model(device, size, lora, dtype)  # same weights (same seed), decoder layers checkpointed
    m_ckpt.enable_activation_checkpointing().train()
    impls["stored_checkpointed"] = functools.partial(_train_step, m_ckpt, batch, adv, ref, "stored", amp)
    cases.append(_case("train", impls, device, B, P, C, size, batch))
    del impls, m_ckpt  # free the second model before the rollout case

    def with_rollout(mode):
        prompts = batch["prompt_ids"][:, -P // 2:]
        pmask = batch["prompt_mask"][:, -P // 2:]
        gen = torch.Generator(device).manual_seed(0)  # every impl and rep decodes the same rollout
        with torch.no_grad(), amp():
            ro = generate(m, prompts, pmask, gen_C, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                          marker_ids=[tok.answer_marker_id], do_sample=True, temperature=1.0, generator=gen)
        return _train_step(m, ro.as_batch(), adv, ref[:, :ro.completion_ids.shape[1]], mode, amp)

    impls = {mode: (lambda mode=mode: with_rollout(mode)) for mode in ("stored", "two_pass", "recipe_logits")}
    cases.append(_case("rollout+train", impls, device, B, P // 2, gen_C, size, None, reps=2))
    return cases


def _case(name, impls, device, B, P, C, size, batch, reps=5):
    rows = compare(impls, device, baseline="two_pass", warmup=1, reps=reps)
    tokens = B * (P + C)
    for r in rows.values():
        if "ms" in r:
            r["tokens_per_s"] = round(tokens / (r["ms"] / 1e3), 1)
    rec = rows.get("recipe_logits", {})
    if "ms" in rec and "ms" in rows.get("stored", {}):
        rows["stored"]["speedup_vs_recipe_logits"] = round(rec["ms"] / rows["stored"]["ms"], 3)
    meta = dict(case=name, model=size, B=B, prompt=P, completion=C)
    if batch is not None:
        meta["n_think"] = int(batch["thinking_mask"].sum())
    return {**meta, "impls": rows}
