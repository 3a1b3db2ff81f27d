"""HRPO's thinking residual as a drop-in module, backed by the fused op.

Parameter names match HRPO's checkpoints and PEFT ``modules_to_save`` lists:
``thinking_projection``, ``thinking_residual_gate_r``, ``thinking_residual_gate_i``,
``thinking_residual_Lambda`` (with parameter ``Lambda``).
"""
from __future__ import annotations

import torch
from torch import nn

from latentfast.ops.thinking_residual import thinking_residual
from latentfast.reference.thinking_residual import lambda_init, lambda_to_a


class ThinkingResidualLambda(nn.Module):
    """``a = exp(-c * softplus(-Lambda) * r)``, HRPO's gate-decay parameterisation."""

    def __init__(self, hidden_size: int, c: float = 8.0, r_min: float = 0.9, r_max: float = 0.999):
        super().__init__()
        self.c = c
        self.Lambda = nn.Parameter(torch.empty(hidden_size))
        self.reset_lambda_parameters(r_min, r_max)

    @torch.no_grad()
    def reset_lambda_parameters(self, r_min: float = 0.9, r_max: float = 0.999):
        """Initialise so that a(r=1) ~ U(r_min, r_max), HRPO's inverse mapping."""
        if not 0.0 < r_min <= r_max < 1.0:
            raise ValueError(f"need 0 < r_min <= r_max < 1, got r_min={r_min}, r_max={r_max}")
        self.Lambda.copy_(lambda_init(r_min, r_max, self.c, self.Lambda.numel()))

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        return lambda_to_a(self.Lambda, r, self.c)


class ThinkingResidual(nn.Module):
    """``forward(embeds, hidden) -> (out, a)`` over the N thinking positions.

    ``projection=True``: ``hidden`` is the raw last hidden state and the module applies
    ``normalize(thinking_projection(hidden))``; ``projection=False``: ``hidden`` is the
    already-normalised thinking state (HRPO's soft embedding) and there is no projection.
    Inputs may be (N, D) or any (..., D); outputs have the input's shape.
    """

    def __init__(self, hidden_size: int, c: float = 8.0, r_min: float = 0.9, r_max: float = 0.999,
                 projection: bool = True, eps: float = 1e-8, recompute_gates: bool = False):
        super().__init__()
        self.hidden_size, self.c, self.eps = hidden_size, c, eps
        self.recompute_gates = recompute_gates  # True: least memory, one more GEMM in backward
        self.thinking_projection = nn.Linear(hidden_size, hidden_size, bias=False) if projection else None
        self.thinking_residual_gate_r = nn.Linear(hidden_size, hidden_size)
        self.thinking_residual_gate_i = nn.Linear(hidden_size, hidden_size)
        self.thinking_residual_Lambda = ThinkingResidualLambda(hidden_size, c, r_min, r_max)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        if self.thinking_projection is not None:
            # std=0.001 as in the recipe: starts near the original model's behaviour
            nn.init.normal_(self.thinking_projection.weight, std=0.001)

    def forward(self, embeds: torch.Tensor, hidden: torch.Tensor):
        if embeds.shape != hidden.shape:
            raise ValueError(f"embeds and hidden must have the same shape, got {tuple(embeds.shape)} and {tuple(hidden.shape)}")
        if embeds.shape[-1] != self.hidden_size:
            raise ValueError(f"last dim of embeds must be hidden_size={self.hidden_size}, got {embeds.shape[-1]}")
        shape = embeds.shape
        # Attribute access (not submodule calls) so PEFT's ModulesToSaveWrapper resolves
        # .weight/.bias/.Lambda to the active adapter's copy.
        proj = self.thinking_projection
        out, a = thinking_residual(
            embeds.reshape(-1, shape[-1]),
            hidden.reshape(-1, shape[-1]),
            None if proj is None else proj.weight,
            self.thinking_residual_gate_r.weight, self.thinking_residual_gate_r.bias,
            self.thinking_residual_gate_i.weight, self.thinking_residual_gate_i.bias,
            self.thinking_residual_Lambda.Lambda,
            self.c, self.eps, self.recompute_gates,
        )
        return out.view(shape), a.view(shape)

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, c={self.c}, projection={self.thinking_projection is not None}"
