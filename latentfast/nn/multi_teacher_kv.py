"""Multi-teacher KV distillation loss: ``sum_k w_k * L_KV(student, teacher_k)`` per sample.

    mt = MultiTeacherKVLoss(pairs=[[(0, 1), (3, 5)], [(0, 2), (3, 11)]],
                            adapters=[kv_adapters("linear", ...), kv_adapters("mlp", ...)],
                            names=["eq", "nl"], weighting="confidence")
    w = mt.weights(batch_size=B, nll=nll, tags=tags, hidden=h_s, attention_mask=mask)   # (B, K)
    kv, reg, metrics = mt(student_kv, targets, w, step=step, attention_mask=mask)
    loss = ce + kv_weight * kv + router_reg_weight * reg

Each teacher has its own layer map and adapters and one ``AttentionWeightedKVLoss`` (the
single-teacher loss, warm-up and attention weighting included), or the KaVa compressed
loss when its targets carry ``'rkv'``. The teachers' losses are weighted per sample; their
targets are never averaged. With one teacher and weight 1 this is exactly the single-
teacher loss. The learned router's gradient reads each teacher's per-sample loss divided
by that teacher's running loss level (``router_scale``), so a teacher that is merely easier
to match (a smaller loss scale) does not win every sample. Metrics: each teacher's unweighted loss, mean weight and, per task/mode tag,
mean weights; the weights' entropy.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from latentfast.nn.kv_loss import AttentionWeightedKVLoss
from latentfast.nn.teacher_weighting import (ROUTER_SIGNALS, RULES, TeacherRouter, router_regularizer,
                                             teacher_weights, weight_entropy, weighted_teacher_loss)
from latentfast.ops.kv_compression import compressed_kv_loss


class MultiTeacherKVLoss(nn.Module):
    def __init__(self, pairs: Sequence[Sequence[tuple[int, int]]], adapters: Sequence[Sequence[nn.Module]],
                 names: Sequence[str], weighting: str = "static", static_weights: Sequence[float] | None = None,
                 task_table: dict | None = None, router_hidden_size: int | None = None, router_hidden: int = 0,
                 router_regularizer: str = "load_balance", warmup_steps: int = 1000,
                 use_teacher_attention: bool = False, router_signal: str = "kv"):
        super().__init__()
        K = len(names)
        if not (len(pairs) == len(adapters) == K) or K < 1:
            raise ValueError(f"need one layer map and one adapter list per teacher: {K} names, {len(pairs)} maps, "
                             f"{len(adapters)} adapter lists")
        if weighting not in RULES:
            raise ValueError(f"teacher_weighting must be one of {RULES}, got {weighting!r}")
        self.names, self.weighting = list(names), weighting
        self.pairs = [list(p) for p in pairs]
        self.static_weights = list(static_weights) if static_weights is not None else [1.0] * K
        self.task_table = task_table
        if weighting == "per_task" and not task_table:
            raise ValueError("teacher_weighting 'per_task' needs a task table (teachers' mode/tasks tags)")
        self.kv = nn.ModuleList(AttentionWeightedKVLoss(warmup_steps, use_teacher_attention, list(a))
                                for a in adapters)
        self.router_kind = router_regularizer
        if router_signal not in ROUTER_SIGNALS:
            raise ValueError(f"router_signal must be one of {ROUTER_SIGNALS}, got {router_signal!r}")
        self.router_signal = router_signal
        self.router = None
        if weighting == "learned":
            if router_hidden_size is None:
                raise ValueError("teacher_weighting 'learned' needs router_hidden_size (the student's hidden size)")
            self.router = TeacherRouter(router_hidden_size, K, hidden=router_hidden)
            # the router's view of each teacher's loss level (``router_scale``); the trainer's
            # state_dict carries it into checkpoints (they keep trainable weights only)
            self.register_buffer("router_loss_scale", torch.zeros(K))

    @property
    def student_layers(self) -> list[int]:
        return sorted({s for p in self.pairs for s, _ in p})

    @property
    def needs_stats(self) -> bool:
        """Whether the teachers must report their answer NLL / entropy."""
        return self.weighting in ("confidence", "entropy", "min_ce") or (
            self.weighting == "learned" and self.router_signal == "answer_nll")

    def weighting_active(self, step: int) -> bool:
        return self.kv[0].weighting_active(step)

    @property
    def last_weighted(self) -> bool:
        return self.kv[0].last_weighted

    ROUTER_SCALE_DECAY = 0.9

    @torch.no_grad()
    def router_scale(self, shares: torch.Tensor) -> torch.Tensor:
        """(K,) running mean (EMA, decay 0.9, detached) of each teacher's unweighted batch KV
        loss, updated with ``shares`` (B, K). The router's gradient is d/dw_bk = L_bk / scale_k:
        teachers whose KV losses differ by a constant factor (other widths, head counts, value
        ranges) look alike to it, so it does not drift to the teacher that is easiest to match
        whatever the sample; it moves weight only where a teacher is relatively better on a
        sample. The loss value and the student's gradients are unchanged."""
        batch = shares.detach().float().sum(0)
        s = self.router_loss_scale
        if bool((s <= 0).all()):
            s.copy_(batch)
        else:
            s.mul_(self.ROUTER_SCALE_DECAY).add_(batch, alpha=1 - self.ROUTER_SCALE_DECAY)
        return s.clamp_min(1e-12)

    def weights(self, *, batch_size: int, nll=None, entropy=None, tags=None, hidden=None, attention_mask=None,
                device=None) -> torch.Tensor:
        probs = self.router(hidden, attention_mask) if self.router is not None else None
        return teacher_weights(self.weighting, batch_size=batch_size, static=self.static_weights, tags=tags,
                               table=self.task_table, nll=nll, entropy=entropy, router_probs=probs,
                               device=device).to(device)

    def forward(self, student_kv: dict, targets: Sequence[dict], weights: torch.Tensor, *, step: int,
                attention_mask=None, student_attention=None, tags=None, router_cost=None):
        """``student_kv``: {student layer: (K, V)}; ``targets[k]``: teacher k's
        ``{'kv': [(K, V) per pair], 'importance': (B, T) or None}`` or ``{'rkv': [compressed
        target per pair]}``. ``router_cost`` (B, K): what the learned router's gradient reads
        instead of the KV losses (``teacher_weighting.router_cost``). Returns (weighted KV loss,
        router regulariser, metrics)."""
        if len(targets) != len(self.names):
            raise ValueError(f"got targets for {len(targets)} teachers, expected {len(self.names)}")
        pieces, shares, met = [], [], {}
        for k, (name, kv, pairs, tgt) in enumerate(zip(self.names, self.kv, self.pairs, targets)):
            s_kv = [student_kv[s] for s, _ in pairs]
            sw = weights[:, k].detach()
            if tgt.get("rkv") is not None:
                ls, ss = zip(*(compressed_kv_loss(*kv._project(i, sk, sv), t, sample_weight=sw,
                                                  return_per_sample=True)
                               for i, ((sk, sv), t) in enumerate(zip(s_kv, tgt["rkv"]))))
                lk, sk_ = torch.stack(ls).mean(), torch.stack(ss).mean(0)
            else:
                lk, sk_ = kv(s_kv, tgt["kv"], step=step, attention_mask=attention_mask,
                             student_attention=student_attention if kv.weighting_active(step) else None,
                             teacher_importance=tgt.get("importance"), sample_weight=sw, return_per_sample=True)
            pieces.append(lk)
            shares.append(sk_)
            met[f"kv/{name}"] = sk_.sum()
            met[f"w/{name}"] = weights[:, k].detach().mean()
        shares = torch.stack(shares, 1)
        if router_cost is not None:  # the value and the student's gradients are the same; the router reads the cost
            loss = weighted_teacher_loss(pieces, router_cost.to(shares.device), weights)
        else:
            scale = self.router_scale(shares) if weights.requires_grad and self.router is not None else None
            loss = weighted_teacher_loss(pieces, shares, weights, scale)
        reg = router_regularizer(weights, self.router_kind) if self.router is not None else loss.new_zeros(())
        met["w_entropy"] = weight_entropy(weights.detach())
        if self.router is not None:
            met["router_reg"] = reg.detach()
        if tags is not None:
            for tag in sorted({t for t in tags if t is not None}):
                sel = torch.tensor([t == tag for t in tags], device=weights.device)
                for k, name in enumerate(self.names):
                    met[f"w/{tag}/{name}"] = weights[sel, k].detach().mean()
        return loss, reg, met
