"""The GRPO loss as the model layer calls it: final hidden states + lm_head weight
straight into ``latentfast.ops.fused_linear_grpo_loss`` (no B x T x V logits tensor)."""
from __future__ import annotations

import torch

from latentfast.ops.grpo_loss import fused_linear_grpo_loss, lm_head_logps

# The recipe's loss (TRL/Unsloth GRPOTrainer of its time): per-sequence token mean ("grpo").
LOSS_DEFAULTS = dict(beta=0.0, epsilon_low=0.2, epsilon_high=0.2, loss_type="grpo", temperature=1.0)


def grpo_loss(hidden, weight, ids, mask, advantages, bias=None, ref_per_token_logps=None,
              old_per_token_logps=None, **kw):
    """``(loss, metrics)`` for ``hidden`` (B x C x D) predicting ``ids`` (B x C); metrics
    is a dict of detached scalar tensors (kl, entropy, ratio_mean, clip ratios)."""
    opts = {**LOSS_DEFAULTS, **kw}
    if opts["loss_type"] == "dr_grpo":
        opts.setdefault("max_completion_length", ids.shape[1])
    loss, metrics = fused_linear_grpo_loss(hidden, weight, ids, mask, advantages, bias, ref_per_token_logps,
                                           old_per_token_logps, **opts)
    return loss, dict(metrics._asdict())


@torch.no_grad()
def per_token_logps(hidden, weight, ids, bias=None, temperature: float = 1.0, mask=None, chunk_size=None):
    """log softmax(hidden @ W^T / T)[ids] (B x C, fp32), chunked: for reference/old log-probs."""
    return lm_head_logps(hidden, weight, ids, bias, temperature, mask, chunk_size)[0]
