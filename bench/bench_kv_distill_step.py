"""End-to-end KV-distillation training step (fwd+bwd, attention-weighted KV loss + CE).

impls (same student, frozen teacher, batch, layer pairs and projections):
  recipe_eager   the recipe's path: the student runs eager attention with
                 ``output_attentions=True`` (a B x H x T x T matrix per layer, kept for
                 backward) and importance = attentions[-1].mean over heads and rows.
  latentfast     both models keep SDPA; q/k/v come from hooks and the importance from the
                 fused ``attention_token_importance`` (no T x T matrix); fused KV loss.
  latentfast_teacher_attn   the same, weighting by the (no-grad) teacher's attention.
K/V are the post-RoPE cache tensors in every impl. The teacher forward (no grad, SDPA)
is part of every step. CPU: tiny student (128 wide, 4 layers) / demo teacher (192, 6),
fp32. GPU: Qwen2.5-0.5B-shaped student / 1.5B-shaped teacher (random weights, vocab
151936), bf16.
"""
from __future__ import annotations

import contextlib

import torch

from measure import compare

from latentfast.data import build_tokenizer
from latentfast.eval.answers import answer_ce
from latentfast.models import build_tiny_causal_lm
from latentfast.ops import attention_token_importance
from latentfast.train import kv_distill
from latentfast.train.kv_distill.demo import DEMO_TEACHER
from latentfast.train.kv_distill.spec import TeacherSpec


def _models(device, dtype, student_size, teacher_size, teacher_overrides):
    tok = build_tokenizer()
    with torch.device(device):  # initialise on the device: a 1.5B random init on the CPU takes ~a minute
        student = build_tiny_causal_lm(tok, size=student_size, seed=0).to(dtype)
        teacher = build_tiny_causal_lm(tok, size=teacher_size, seed=1, **teacher_overrides).to(dtype)
    teacher.eval().requires_grad_(False)
    return student, teacher


def _batch(student, B, T, device):
    g = torch.Generator().manual_seed(0)
    V = student.config.vocab_size
    ids = torch.randint(10, min(V, 1000), (B, T), generator=g)
    lens = torch.randint(T * 3 // 4, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None] < lens[:, None]).long()
    tgt = ids.roll(-1, 1).masked_fill(mask.roll(-1, 1) == 0, -100)
    tgt[:, : T // 4] = -100  # loss on the "answer" part only
    tgt[:, -1] = -100
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "targets": tgt.to(device),
            "answer_pos": (lens - 2).to(device)}


def _zero(mods):
    for m in mods:
        for p in m.parameters():
            p.grad = None


def run(device, quick):
    cuda = device.type == "cuda"
    if cuda:
        dtype, s_size, t_size, t_over, shapes = torch.bfloat16, "0.5b", "1.5b", {}, [(4, 1024)]
    elif quick:
        dtype, s_size, t_size, t_over, shapes = torch.float32, "tiny", "tiny", DEMO_TEACHER, [(4, 256)]
    else:
        dtype, s_size, t_size, t_over, shapes = torch.float32, "0.5b", "1.5b", {}, [(1, 512)]
    student, teacher = _models(device, dtype, s_size, t_size, t_over)
    amp = contextlib.nullcontext  # weights already in the bench dtype
    cases = []
    for B, T in shapes:
        batch = _batch(student, B, T, device)
        mask = batch["attention_mask"]
        args = kv_distill.build_parser().parse_args(["--use_attention_weighted_kv", "--attention_weighted_kv_warmup",
                                                      "0"])
        t = kv_distill.online_teacher(TeacherSpec(model="teacher", name="teacher"), teacher, student.config)
        d = kv_distill.KVDistiller(student, [t], args).to(device, dtype)
        kv_loss = d.mt.kv[0]

        def targets():
            return t.targets(batch, need_importance=d.need_importance(10), stats=False, amp=amp)

        def fused(teacher_attention=False):
            d.use_teacher_attention = kv_loss.use_teacher_attention = teacher_attention
            student.config._attn_implementation = "sdpa"
            loss, _ = d(batch, [targets()], 10)
            loss.backward()
            _zero([d])

        def recipe():
            d.use_teacher_attention = kv_loss.use_teacher_attention = False
            t_out = targets()
            student.config._attn_implementation = "eager"
            try:
                with d.capture:
                    out = student.model(input_ids=batch["input_ids"], attention_mask=mask, output_attentions=True)
                ce = answer_ce(student, out.last_hidden_state, batch["targets"])
                imp = attention_token_importance(out.attentions[d.s_imp], attention_mask=mask)
                kv = kv_loss([d.capture.kv(s) for s, _ in t.pairs], t_out["kv"], step=10, attention_mask=mask,
                          student_importance=imp)
                (ce + kv).backward()
                d.capture.clear()
            finally:
                student.config._attn_implementation = "sdpa"
            _zero([d])

        impls = {"recipe_eager": recipe, "latentfast": fused,
                 "latentfast_teacher_attn": lambda: fused(True)}
        rows = compare(impls, device, baseline="recipe_eager", warmup=1, reps=5)
        for r in rows.values():
            if "ms" in r:
                r["tokens_per_s"] = round(B * T / (r["ms"] / 1e3), 1)
        cases.append({"case": "kv_distill_step", "student": s_size, "teacher": t_size if t_size != "tiny" else
                      "tiny-teacher", "B": B, "T": T, "dtype": str(dtype).replace("torch.", ""),
                      "layer_pairs": len(t.pairs), "impls": rows})
        t.remove()
        d.capture.remove()
    return cases
