"""The KV-distillation run on the one training loop (``KVDistill``) and its per-tag evaluation."""
from __future__ import annotations

from typing import Sequence

import torch

from latentfast.eval.answers import answer_metrics
from latentfast import files
from latentfast.hf import adapter

from ..common import SampleStream
from ..loop import Trainer
from .data import encode, row_tag
from .distiller import KVDistiller, per_task_weight_means
from .teachers import Teacher


class KVDistill(Trainer):
    """The distillation run on the loop: every teacher's targets are computed per micro-batch
    in ``batches`` (lazily: one teacher's activations alive at a time, only targets kept),
    the distiller's loss in ``loss``. The eval rows are scored per task/mode tag."""

    name = "kv_distill"

    def __init__(self, cfg, student, teachers: Sequence[Teacher], tok, rows, eval_rows, task_table=None):
        super().__init__(cfg)
        self.student, self.teachers, self.tok, self.rows, self.eval_rows = student, list(teachers), tok, rows, eval_rows
        self.task_table = task_table

    def setup(self):
        self.stream = SampleStream(list(range(len(self.rows))), self.cfg.seed)  # row ids: the offline cache's keys
        self.row_tags = [row_tag(r) for r in self.rows]

    def build_model(self):
        self.distiller = KVDistiller(self.student, self.teachers, self.cfg, self.task_table,
                                               [t for t in self.row_tags if t is not None]).to(self.device)
        return self.distiller

    def fsdp_layers(self, module):
        return list(adapter.decoder_layers(self.student))

    def num_train_items(self):
        return len(self.rows)

    def batches(self, step):  # lazy: one micro-batch's teacher targets alive at a time
        c, d = self.cfg, self.distiller
        for m in range(c.gradient_accumulation_steps):
            ids = self.micro_items(self.stream, step, m, c.per_device_train_batch_size)
            batch = encode(self.tok, [self.rows[i] for i in ids], c.max_length, self.device)
            batch["row_ids"], batch["tags"] = ids, [self.row_tags[i] for i in ids]
            yield batch, [t.targets(batch, need_importance=d.need_importance(step), stats=d.mt.needs_stats,
                                    hidden=d.need_hidden, amp=self.amp) for t in self.teachers]

    def loss(self, mb):
        batch, targets = mb
        return self.model(batch, targets, self.step)

    def state_dict(self):  # the router's running loss levels (a buffer; checkpoints keep trainable weights)
        scale = getattr(self.distiller.mt, "router_loss_scale", None)
        return {} if scale is None else {"router_loss_scale": scale.tolist()}

    def load_state_dict(self, state):
        if "router_loss_scale" in state and getattr(self.distiller.mt, "router_loss_scale", None) is not None:
            self.distiller.mt.router_loss_scale.copy_(torch.tensor(state["router_loss_scale"]))

    def step_metrics(self, row):
        per_task_weight_means(row)
        row["attn_weighted"] = bool(self.distiller.mt.last_weighted)

    def log_line(self, row):
        parts = [f"loss={row['loss']:.4f}", f"ce={row['ce']:.4f}"] + [
            f"{k}={row[k]:.4f}" for k in ("kv", "cka", "codi") if k in row] + [
            f"w/{n}={row[f'w/{n}']:.2f}" for n in self.distiller.names if len(self.distiller.names) > 1]
        return f"Step {row['step']}: {' '.join(parts)} {self.distiller.status(row['step'])}".rstrip()

    def progress(self, row):
        return dict(loss=f"{row['loss']:.3f}", ce=f"{row['ce']:.3f}", kv=f"{row.get('kv', 0):.4f}")

    def evaluate(self, step):
        if step < self.total or not self.eval_rows:  # the final student only
            return {}
        return eval_by_tag(self.student, self.tok, self.eval_rows, self.cfg, self.device, self.amp, self.rank,
                           self.world)

    def on_train_end(self, result):
        if self.rank == 0:
            files.save_pretrained(self.out / "student", self.student, self.tok)
        self.distiller.capture.remove()
        return result


def eval_by_tag(lm, tok, rows, cfg, device, amp, rank=0, world=1) -> dict:
    """``answer_metrics`` per task/mode tag (``eval_ce/<tag>``, ``eval_accuracy/<tag>``)
    and over all rows: ``eval_accuracy`` exactly, ``eval_ce`` as the row-weighted mean of
    the tags' (token-weighted) CEs. Rows without tags: plain ``answer_metrics``."""
    groups: dict = {}
    for r in rows:
        groups.setdefault(row_tag(r), []).append(r)
    if len(groups) < 2:
        return answer_metrics(lm, tok, rows, cfg.max_length, cfg.max_new_tokens, device, amp, rank, world)
    res, n = {}, len(rows)
    for tag in sorted(groups, key=str):
        sub = answer_metrics(lm, tok, groups[tag], cfg.max_length, cfg.max_new_tokens, device, amp, rank, world)
        res.update({f"{k}/{tag}": v for k, v in sub.items()})
        for k, v in sub.items():
            res[k] = res.get(k, 0.0) + v * len(groups[tag]) / n
    return res
