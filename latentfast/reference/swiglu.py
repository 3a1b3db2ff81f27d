"""Plain PyTorch SwiGLU MLP: ``down(row_scale * silu(gate(x)) * up(x))``."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def swiglu_mlp(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
               row_scale: torch.Tensor | None = None) -> torch.Tensor:
    h = F.silu(F.linear(x, w_gate)) * F.linear(x, w_up)
    if row_scale is not None:
        h = h * row_scale.unsqueeze(-1).to(h.dtype)
    return F.linear(h, w_down)
