"""Fused lm_head + token cross-entropy without the (N, V) logits (Liger's
``liger_fused_linear_cross_entropy``, plus per-token weights and ``num_items_in_batch``).

    loss = fused_linear_cross_entropy(hidden.view(-1, H), lm_head.weight, labels.view(-1))

The formula is ``latentfast.ops.objectives.cross_entropy`` (written once; the reference runs
the same code on full logits); the sweep is the lm_head engine's.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from latentfast.ops._dispatch import check_shape, check_tensor
from latentfast.ops.lm_head_engine import autocast_head, check_head, objective_loss
from latentfast.ops.objectives.cross_entropy import ce_setup


@dataclasses.dataclass
class CrossEntropyOutput:
    """Liger's return type when any ``return_*`` flag is set."""

    loss: torch.Tensor
    z_loss: Optional[torch.Tensor] = None
    token_accuracy: Optional[torch.Tensor] = None
    predicted_tokens: Optional[torch.Tensor] = None


def _check_ce_args(reduction, softcap, label_smoothing, return_token_accuracy, return_predicted_tokens):
    if reduction == "none":
        raise NotImplementedError("reduction='none' is not supported by the fused path (its gradients are "
                                  "finished in the forward); use 'mean' or 'sum'")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if softcap is not None and softcap <= 0:
        raise ValueError(f"softcap must be > 0 or None, got {softcap}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be between 0.0 and 1.0, got {label_smoothing}")
    if return_token_accuracy or return_predicted_tokens:
        raise NotImplementedError("return_token_accuracy / return_predicted_tokens are not supported")


def fused_linear_cross_entropy(
    input: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    ce_weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    lse_square_scale: float = 0.0,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    softcap: float | None = None,
    return_z_loss: bool = False,
    accum_dtype: torch.dtype | None = None,
    use_token_scaling: bool = False,
    return_token_accuracy: bool = False,
    return_predicted_tokens: bool = False,
    *,
    loss_weights: torch.Tensor | None = None,
    num_items_in_batch: float | torch.Tensor | None = None,
    chunk_size: int | None = None,
):
    """Cross-entropy of ``softcap(input @ weight.T + bias)`` against ``target``.

    Args (Liger's, in its order; ``accum_dtype`` is accepted and unused: the weight
    gradient accumulates in the weight's dtype as the GEMMs produce it):
        input: (N, H) or (B, T, H); weight: (V, H); target: (N,) or (B, T), ``ignore_index``
            where no loss is taken. ce_weight: optional (V,) class weights.
        lse_square_scale: z-loss coefficient. label_smoothing: in [0, 1]. reduction: mean | sum.
        softcap: ``z = softcap * tanh(logits / softcap)``. return_z_loss: also return the z-loss.
        use_token_scaling: scale each token's loss by its (detached) target probability.
        loss_weights: per-token weights shaped like ``target`` (multiply each token's loss;
            the mean still divides by the number of non-ignored tokens, as MiniMind's
            reasoning-tag up-weighting does).
        num_items_in_batch: HF's normaliser for gradient accumulation: the loss is the sum
            divided by it (reduction is then ignored).
        chunk_size: rows per chunk; None = the per-device default.
    Returns the loss, or a :class:`CrossEntropyOutput` when ``return_z_loss``.
    """
    _check_ce_args(reduction, softcap, label_smoothing, return_token_accuracy, return_predicted_tokens)
    x, W, b = autocast_head(input, weight, bias)
    check_tensor("input", x, float_=True)
    if x.dim() not in (2, 3):
        raise ValueError(f"input must be (N, H) or (B, T, H), got shape {tuple(x.shape)}")
    check_head(x, W, b, target, ids_name="target", check_range=False)
    if loss_weights is not None:
        check_tensor("loss_weights", loss_weights, float_=True)
        check_shape("loss_weights", loss_weights, tuple(target.shape), "same as target")
    if ce_weight is not None:
        check_tensor("ce_weight", ce_weight, float_=True)
        check_shape("ce_weight", ce_weight, (W.shape[0],), "(vocab_size,)")
    objective, ids, mask, inputs = ce_setup(
        target, W.shape[0], ce_weight=ce_weight, ignore_index=ignore_index, lse_square_scale=lse_square_scale,
        label_smoothing=label_smoothing, reduction=reduction, use_token_scaling=use_token_scaling,
        loss_weights=loss_weights, num_items_in_batch=num_items_in_batch)
    if x.dim() == 2:  # one "sequence" of N rows: cross-entropy is row-local
        x, ids, mask = x.unsqueeze(0), ids.unsqueeze(0), mask.unsqueeze(0)
        inputs = {k: (v.unsqueeze(0) if k in ("loss_weights", "class_weight") and v is not None else v)
                  for k, v in inputs.items()}
    loss, metrics = objective_loss(objective, x, W, b, ids, mask, inputs, softcap=softcap,
                                   chunk_rows=int(chunk_size or 0))
    if return_z_loss:
        return CrossEntropyOutput(loss=loss, z_loss=metrics["z_loss"])
    return loss
