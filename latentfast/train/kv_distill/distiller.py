"""The trainable side of KV distillation: the student, the teachers' KV adapters, the router.

    loss = CE(student, answer tokens) + kv_weight * sum_k w_k KV_k + cka_weight * CKA + codi_weight * CODI

KV: per distilled layer pair (``--kv_layers``, student block -> teacher block at the same
relative depth, or the teacher's explicit ``layer_map``) an adapter maps the student's cache
to the teacher's heads/dims, then MSE on K and V; with ``--use_attention_weighted_kv`` each
token is weighted by the attention it receives (from the student, or the teacher with
``--use_teacher_attention``) once ``--attention_weighted_kv_warmup`` steps have passed. K/V/Q
come from hooks (``latentfast.hf.capture``) and the importance from the fused
``attention_token_importance`` -- no ``output_attentions``. Teachers' losses are weighted per
sample (``--teacher_weighting``), never their targets averaged.
"""
from __future__ import annotations

import sys
from typing import Sequence

import torch
from torch import nn

from latentfast.eval.answers import answer_ce
from latentfast.hf import adapter
from latentfast.hf.capture import KVCapture
from latentfast.nn import CKALoss, CODILoss
from latentfast.nn.kv_adapter import kv_adapters
from latentfast.nn.multi_teacher_kv import MultiTeacherKVLoss
from latentfast.nn.teacher_weighting import router_cost, weight_entropy

from .teachers import Teacher


class KVDistiller(nn.Module):
    """The trainable side: the student, every teacher's KV adapters (in ``MultiTeacherKVLoss``),
    the learned router and per-teacher CODI maps; ``forward(batch, targets, step)`` ->
    (loss, metrics), ``targets`` one dict per teacher (``Teacher.targets``); DDP wraps it:

        loss = CE + kv_weight * sum_k w_k L_KV(student, teacher_k) + router_reg_weight * reg
                  + cka_weight * sum_k wbar_k CKA_k + codi_weight * sum_k wbar_k CODI_k

    ``w`` (B, K) per sample from ``--teacher_weighting``; CKA / CODI are batch-level, so
    they take the batch mean ``wbar_k``. One teacher (``--teacher_model``) has weight 1: the
    recipe's ``CE + kv_weight * KV + cka_weight * CKA + codi_weight * CODI``."""

    def __init__(self, student, teachers: Sequence[Teacher], cfg, task_table: dict | None = None,
                 tags: Sequence[str] = ()):
        super().__init__()
        self.student = student
        s_cfg = student.config
        self.names = [t.name for t in teachers]
        self.kv_weight, self.cka_weight, self.codi_weight = cfg.kv_weight, cfg.cka_weight, cfg.codi_weight
        self.router_reg_weight = cfg.router_reg_weight
        self.weighted = cfg.use_attention_weighted_kv
        self.use_teacher_attention = cfg.use_teacher_attention
        self.s_imp = cfg.importance_layer % s_cfg.num_hidden_layers
        self.tags = sorted(set(tags))
        adapters = [kv_adapters(t.spec.kv_adapter, t.pairs, s_cfg, t.config) for t in teachers]
        warm = cfg.attention_weighted_kv_warmup if self.weighted else sys.maxsize
        self.mt = MultiTeacherKVLoss([t.pairs for t in teachers], adapters, self.names, cfg.teacher_weighting,
                                     [t.spec.weight for t in teachers], task_table,
                                     router_hidden_size=s_cfg.hidden_size, router_hidden=cfg.router_hidden,
                                     router_regularizer=cfg.router_regularizer, warmup_steps=warm,
                                     use_teacher_attention=cfg.use_teacher_attention,
                                     router_signal=cfg.router_signal)
        self.cka = CKALoss(cfg.cka_layers) if self.cka_weight else None
        self.codi = nn.ModuleList(CODILoss("blocks", student_dim=s_cfg.hidden_size, teacher_dim=t.config.hidden_size)
                                  for t in teachers) if self.codi_weight else None
        self.capture = KVCapture(student, self.mt.student_layers, [self.s_imp])

    @property
    def need_hidden(self) -> bool:
        return self.cka is not None or self.codi is not None

    def need_importance(self, step: int) -> bool:
        return self.use_teacher_attention and self.mt.weighting_active(step)

    def status(self, step: int) -> str:
        return self.mt.kv[0].status(step) if self.weighted else ""

    def forward(self, batch, targets: Sequence[dict], step: int):
        mask, tags = batch["attention_mask"], batch.get("tags")
        weighting = self.mt.weighting_active(step)
        with self.capture:
            out = adapter.decoder(self.student)(input_ids=batch["input_ids"], attention_mask=mask,
                                                output_hidden_states=self.need_hidden)
        ce = answer_ce(self.student, out.last_hidden_state, batch["targets"])
        loss, met = ce, {"ce": ce.detach()}
        stat = (lambda key: torch.stack([t[key] for t in targets], 1)) if self.mt.needs_stats else (lambda key: None)
        w = self.mt.weights(batch_size=mask.shape[0], nll=stat("nll"), entropy=stat("entropy"), tags=tags,
                            hidden=out.last_hidden_state, attention_mask=mask, device=mask.device)
        s_kv = {s: self.capture.kv(s) for s in self.mt.student_layers}
        if self.kv_weight:
            if weighting:  # the plain MSE too, so weighted and unweighted runs compare on one scale
                with torch.no_grad():
                    met["kv_mse"] = self.mt(s_kv, targets, w.detach(), step=-1, attention_mask=mask)[0]
            student_attention = self.capture.qk(self.s_imp) if weighting and not self.use_teacher_attention else None
            cost = None
            if self.mt.router is not None and self.mt.router_signal != "kv":
                cost = router_cost(self.mt.router_signal, nll=stat("nll"), tags=tags, table=self.mt.task_table,
                                   num_teachers=len(self.names), device=mask.device)
            kv, reg, m = self.mt(s_kv, targets, w, step=step, attention_mask=mask, student_attention=student_attention,
                                 router_cost=cost)
            loss = loss + self.kv_weight * kv
            if self.mt.router is not None:
                loss = loss + self.router_reg_weight * reg
            met.update(m, kv=kv.detach())
            met.setdefault("kv_mse", met["kv"])
        wbar = w.mean(0)
        if self.cka is not None:
            cka = [self.cka(out.hidden_states, t["hidden"], mask) for t in targets]
            loss = loss + self.cka_weight * sum(wbar[k] * c for k, c in enumerate(cka))
            met["cka"] = sum(wbar[k].detach() * c.detach() for k, c in enumerate(cka))
        if self.codi is not None:
            pos = batch["answer_pos"]
            codi = [f(out.hidden_states, t["hidden"], pos, pos) for f, t in zip(self.codi, targets)]
            loss = loss + self.codi_weight * sum(wbar[k] * c for k, c in enumerate(codi))
            met["codi"] = sum(wbar[k].detach() * c.detach() for k, c in enumerate(codi))
        wd = w.detach()
        met["w_entropy"] = weight_entropy(wd)
        for k, name in enumerate(self.names):
            met[f"w/{name}"] = wd[:, k].mean()
        if tags is not None:  # sums and counts (same keys on every rank); step_metrics turns them into means
            for tag in self.tags:
                sel = torch.tensor([t == tag for t in tags], device=wd.device)
                met[f"_n/{tag}"] = sel.sum().float()
                for k, name in enumerate(self.names):
                    met[f"_wsum/{tag}/{name}"] = wd[sel, k].sum()
        self.capture.clear()
        met["loss"] = loss.detach()
        return loss, met


def per_task_weight_means(row: dict) -> None:
    """``w/<tag>/<teacher>`` = the step's mean weight of that teacher on samples tagged
    ``tag``, from the ``_wsum``/``_n`` sums ``KVDistiller`` logs (dropped after)."""
    for key in [k for k in row if k.startswith("_wsum/")]:
        _, tag, name = key.split("/", 2)
        n = row.get(f"_n/{tag}", 0.0)
        if n > 0:
            row[f"w/{tag}/{name}"] = row[key] / n
        del row[key]
    for key in [k for k in row if k.startswith("_n/")]:
        del row[key]
