"""MiniMind white-box distillation (``train_distillation.py``): a student learns from a frozen
teacher of another size, ``alpha * (CE + aux) + (1 - alpha) * T^2 * KL(teacher_T || student_T)``
over the assistant-span tokens, through the fused distillation objective (neither model's
(N, V) logits exist; ``ops.fused_linear_distill_loss``).

    latentfast-minimind distillation                   # demo: teacher out/full_sft_64.pth (2 layers) ->
                                                       # student hidden 32, 1 layer, from scratch
    torchrun --nproc_per_node 2 -m latentfast.train.minimind.distillation \\
        --student_hidden_size 640 --student_num_layers 12 --teacher_hidden_size 640 --teacher_num_layers 12 \\
        --use_moe 1 --headwise_attn_output_gate 1 --use_wandb

``--student_hidden_size`` / ``--student_num_layers`` / ``--from_student_weight`` are this
stage's spellings of ``--hidden_size`` / ``--num_hidden_layers`` / ``--from_weight`` (the
student is the trained model: ``{save_dir}/full_dist_{student_hidden_size}{_moe}.pth``).
``--use_moe`` and the gate flags apply to both models, as in MiniMind.
"""
from __future__ import annotations

import torch
from torch import nn

from latentfast.ops.distill import fused_linear_distill_loss

from .args import DistillationArgs
from .common import MiniMindTrainer, cli_of, stage_main, weight_path


class DistillLoss(nn.Module):
    """The module DDP wraps: the student's decoder, then the fused ``alpha CE + (1 - alpha) T^2 KL``
    against the teacher's final hidden states and head. Returns ``(loss, kd, ce, aux)``."""

    def __init__(self, lm, alpha: float, temperature: float):
        super().__init__()
        self.lm, self.alpha, self.temperature = lm, alpha, temperature

    def forward(self, X, Y, loss_mask, teacher_hidden, teacher_weight):
        out = self.lm.model(input_ids=X)
        labels = Y.masked_fill(loss_mask == 0, -100).flatten()
        loss, kd, ce = fused_linear_distill_loss(out.last_hidden_state.flatten(0, 1), self.lm.lm_head.weight,
                                                 teacher_hidden.flatten(0, 1), teacher_weight, labels,
                                                 alpha=self.alpha, temperature=self.temperature)
        aux = out.aux_loss  # MiniMind adds it to the CE term
        return loss + self.alpha * aux, kd, ce, aux.detach()


class Distillation(MiniMindTrainer):
    stage = "distillation"
    config_class = DistillationArgs
    data_kind = "sft"
    wandb_name = "Distillation"

    @classmethod
    def required_weights(cls, cfg):
        out = [] if cfg.from_weight == "none" else [
            ("--from_student_weight", cfg.from_weight,
             weight_path(cfg.from_weight, cls.weight_dir_of(cfg), cfg.hidden_size, cfg.use_moe))]
        if cfg.from_teacher_weight != "none":
            out.append(("--from_teacher_weight", cfg.from_teacher_weight,
                        weight_path(cfg.from_teacher_weight, cls.weight_dir_of(cfg), cfg.teacher_hidden_size,
                                    cfg.use_moe)))
        return out

    def build_model(self):
        c = self.cfg
        self.teacher = self.init_lm(c.from_teacher_weight, "--from_teacher_weight", c.teacher_hidden_size,
                                    c.teacher_num_layers).eval().requires_grad_(False)
        self.lm = self.init_lm(c.from_weight, "--from_student_weight")
        return DistillLoss(self.lm, c.alpha, c.temperature)

    def loss(self, b):
        with torch.no_grad():
            th = self.teacher.model(input_ids=b["X"]).last_hidden_state
        loss, kd, ce, aux = self.model(b["X"], b["Y"], b["loss_mask"], th, self.teacher.lm_head.weight)
        return loss, {"ce": ce, "kd": kd, "aux": aux}

    def log_line(self, row):
        return super().log_line(row) + f" kd:{row.get('kd', 0):.4f}"


main = stage_main(Distillation, __doc__)
cli = cli_of(main)

if __name__ == "__main__":
    cli()
