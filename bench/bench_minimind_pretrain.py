"""One MiniMind pretrain step (seed note 002's model): latentfast vs a MiniMind-style eager step.

Model: hidden 640, 12 layers, 8 heads / 2 KV heads, MoE (4 routed experts, top-2, 1 shared,
seq aux loss), headwise attention output gate, vocab 6400, seq 340 (MiniMind's
``train_pretrain.py`` defaults). Random weights, random tokens, every target in the loss.

impls (same weights, same batch; loss = masked mean CE + MoE aux loss, then backward):
  latentfast       what ``latentfast-minimind pretrain`` runs (``train.minimind.common.LMLoss``):
                   sorted MoE dispatch, SwiGLU keeping 2 of 4 intermediates with the routing
                   weight folded in (``ops.swiglu_mlp``), final hidden states into the fused
                   linear cross-entropy (``ops.fused_linear_cross_entropy``: no (N, V) logits)
  minimind_eager   MiniMind's training path: ``repeat_interleave`` + one boolean mask per
                   expert, plain autograd SwiGLU, full (N, V) logits, CE(reduction='none')
                   * mask / mask.sum() (baseline of the ratios)
Attention, norms and RoPE are the same module in both (HF SDPA; MiniMind also calls SDPA).
CPU: fp32 (MiniMind runs fp32 on CPU: its autocast is CUDA-only), batch 2.
GPU: bf16 autocast, batch 16.

``saved_activation_mb``: bytes autograd keeps for backward after the forward (exact);
``peak_extra_mb``: the step's peak over the weights, which includes the ~0.86 GB of fp32
parameter gradients (215M parameters) and so hides activation savings at small batch.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from measure import compare

from latentfast.models.minimind import MiniMindConfig, MiniMindForCausalLM
from latentfast.models.minimind.moe import sorted_dispatch
from latentfast.profiling import saved_activation_bytes
from latentfast.reference.minimind_moe import moe_loop
from latentfast.train.minimind.common import LMLoss

SHAPE = dict(hidden_size=640, num_hidden_layers=12, use_moe=True, headwise_attn_output_gate=True, vocab_size=6400)
SEQ = 340


def set_eager(model, eager: bool):
    """Switch the model between latentfast's paths and MiniMind's eager ones (same weights)."""
    for mod in model.modules():
        if hasattr(mod, "dispatch"):
            mod.dispatch = moe_loop if eager else sorted_dispatch
        if hasattr(mod, "lean"):
            mod.lean = not eager


def loss_latentfast(m, X, Y, mask):
    set_eager(m, False)
    return LMLoss(m)(X, Y, mask)[0]  # the trainers' loss module: decoder + fused lm_head CE + MoE aux


def loss_eager(m, X, Y, mask):
    set_eager(m, True)
    out = m(input_ids=X)
    ce = F.cross_entropy(out.logits.flatten(0, 1).float(), Y.flatten(), reduction="none")
    m_flat = mask.flatten().float()
    return (ce * m_flat).sum() / m_flat.sum() + out.aux_loss


def _step(loss_fn, m, batch, amp):
    with amp():
        loss = loss_fn(m, *batch)
    loss.backward()
    for p in m.parameters():
        p.grad = None


def run(device, quick):
    cuda = device.type == "cuda"
    B = 16 if cuda else 2
    amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else contextlib.nullcontext
    torch.manual_seed(0)
    m = MiniMindForCausalLM(MiniMindConfig(**SHAPE)).to(device).train()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 6400, (B, SEQ + 1), generator=g).to(device)
    batch = (ids[:, :-1], ids[:, 1:], torch.ones(B, SEQ, dtype=torch.long, device=device))
    fns = {"latentfast": loss_latentfast, "minimind_eager": loss_eager}
    impls = {name: (lambda fn=fn: _step(fn, m, batch, amp)) for name, fn in fns.items()}
    rows = compare(impls, device, baseline="minimind_eager", warmup=1, reps=2 if not cuda else 10)
    params = list(m.parameters())
    saved = {}
    for name, fn in fns.items():
        with amp():
            _, saved[name] = saved_activation_bytes(lambda fn=fn: fn(m, *batch), params)
    for name, r in rows.items():
        if "ms" in r:
            r["tokens_per_s"] = round(B * SEQ / (r["ms"] / 1e3), 1)
            r["saved_activation_mb"] = round(saved[name] / 2**20, 1)
            r["saved_activation_vs_eager"] = round(saved[name] / saved["minimind_eager"], 3)
    rows["latentfast"]["loss"] = "fused linear CE"
    set_eager(m, False)
    meta = dict(case="pretrain_step", B=B, seq=SEQ, dtype="bf16 autocast" if cuda else "fp32",
                params_m=round(sum(p.numel() for p in params) / 1e6, 1), **SHAPE)
    return [{**meta, "impls": rows}]
