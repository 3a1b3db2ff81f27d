"""Token cross-entropy (SFT / pretraining), written once: Liger's fused linear CE semantics.

Per non-ignored token i with target y (z = softcap(logits)):
    ce_i = (1 - s) * (lse - z_y) + s * (lse - mean_v z_v)      label smoothing s
    ce_i *= class_weight[y]                                      Liger's ``ce_weight`` (no smoothing)
    zl_i = lse_square_scale * lse^2                              z-loss (PaLM)
    both *= p_y.detach() (``use_token_scaling``) and *= loss_weights_i (per-token weights,
    e.g. MiniMind's x10 on reasoning tags)
``mean``: sum(ce) / D + sum(zl) / N, N = non-ignored tokens and D = N, or the sum of the
targets' class weights; with ``num_items_in_batch`` (HF's gradient-accumulation-correct
count) both divide by it instead. ``sum``: no division.
"""
from __future__ import annotations

import dataclasses

import torch

from latentfast.ops.lm_head_engine import Objective, Rows, register_objective

REDUCTIONS = ("mean", "sum")


@register_objective
@dataclasses.dataclass(frozen=True)
class CrossEntropyObjective(Objective):
    label_smoothing: float = 0.0
    lse_square_scale: float = 0.0
    reduction: str = "mean"
    use_token_scaling: bool = False
    has_num_items: bool = False  # normaliser = the batch input "num_items" for both terms

    inputs = (("loss_weights", "token"), ("class_weight", "token"), ("num_items", "batch"),
              ("class_weight_sum", "batch"))
    metric_names = ("z_loss",)

    def __post_init__(self):
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS} on the fused path, got {self.reduction!r}")
        if not 0.0 <= self.label_smoothing <= 1.0:
            raise ValueError(f"label_smoothing must be between 0.0 and 1.0, got {self.label_smoothing}")

    @property
    def stats(self):
        s = ("logp",)
        if self.label_smoothing > 0 or self.lse_square_scale != 0:
            s += ("lse",)
        if self.label_smoothing > 0:
            s += ("zsum",)
        return s

    def _terms(self, r: Rows):
        ce = -r.logp
        if self.label_smoothing > 0:
            ce = (1 - self.label_smoothing) * ce + self.label_smoothing * (r.lse - r.zsum / r.vocab_size)
        if "class_weight" in r.tok:
            ce = ce * r.tok["class_weight"]
        zl = self.lse_square_scale * r.lse ** 2 if self.lse_square_scale != 0 else None
        scale = None
        if self.use_token_scaling:
            scale = torch.exp(r.logp).detach()
        if "loss_weights" in r.tok:
            scale = r.tok["loss_weights"] if scale is None else scale * r.tok["loss_weights"]
        if scale is not None:
            ce = ce * scale
            zl = None if zl is None else zl * scale
        if self.reduction == "sum":
            d_ce = d_z = 1.0
        elif self.has_num_items:
            d_ce = d_z = r.batch["num_items"]
        else:
            d_z = r.n_tokens.clamp(min=1.0)
            d_ce = r.batch["class_weight_sum"] if "class_weight_sum" in r.batch else d_z
        return ce.sum() / d_ce, (zl.sum() / d_z if zl is not None else None)

    def loss(self, r: Rows) -> torch.Tensor:
        ce, zl = self._terms(r)
        return ce if zl is None else ce + zl

    def metrics(self, r: Rows) -> dict:
        _, zl = self._terms(r)
        return {"z_loss": zl if zl is not None else torch.zeros(())}


def ce_setup(target: torch.Tensor, vocab_size: int, *, ce_weight=None, ignore_index: int = -100,
             lse_square_scale: float = 0.0, label_smoothing: float = 0.0, reduction: str = "mean",
             use_token_scaling: bool = False, loss_weights=None, num_items_in_batch=None):
    """(objective, ids, mask, inputs) for one cross-entropy call; ``target`` (N,) or (B, T).
    Shared by the fused op and the reference."""
    if ce_weight is not None and label_smoothing > 0:
        raise NotImplementedError("ce_weight together with label_smoothing is not supported on the fused path")
    mask = target != ignore_index
    ids = torch.where(mask, target, torch.zeros_like(target)).long()
    if not torch.compiler.is_compiling() and ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise ValueError(f"target must lie in [0, {vocab_size}) or equal ignore_index={ignore_index}, got range "
                         f"[{int(target[mask].min())}, {int(target[mask].max())}]")
    objective = CrossEntropyObjective(label_smoothing=float(label_smoothing),
                                      lse_square_scale=float(lse_square_scale), reduction=reduction,
                                      use_token_scaling=bool(use_token_scaling),
                                      has_num_items=num_items_in_batch is not None)
    inputs = {"loss_weights": None if loss_weights is None else loss_weights.float()}
    if ce_weight is not None:
        cw = ce_weight.float()[ids]
        inputs["class_weight"] = cw
        inputs["class_weight_sum"] = (cw * mask).sum()
    if num_items_in_batch is not None:
        inputs["num_items"] = torch.as_tensor(num_items_in_batch, device=target.device, dtype=torch.float32)
    return objective, ids, mask, inputs
