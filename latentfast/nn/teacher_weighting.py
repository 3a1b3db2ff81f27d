"""Per-sample teacher weights for multi-teacher distillation (notes/multi-teacher.md, section 2).

    w = teacher_weights("confidence", nll=nll)          # (B, K), rows sum to 1
    loss = (w * per_sample_losses).sum()                # sum_k w_k * L_KV(student, teacher_k)

Rules (every one returns (B, K) weights, each row summing to 1):

    static      fixed weights (one per teacher), the same for every sample
    per_task    a table tag -> weights; each sample's task/mode tag picks its row
    confidence  CA-MKD: w_k = (1 - softmax_k(CE_k)) / (K - 1), CE_k = teacher k's NLL of the
                gold answer; a teacher that predicts the answer better gets more weight
    entropy     EBKD: w_k = (1 - H_k / sum_j H_j) / (K - 1), H_k = teacher k's mean
                predictive entropy on the answer tokens (low entropy: confident teacher)
    min_ce      FuseLLM MinCE: weight 1 on the teacher with the lowest CE, 0 elsewhere
    learned     ``TeacherRouter``: softmax over a linear map of the student's pooled hidden
                state, trained with the student; ``router_regularizer`` keeps it from
                collapsing onto one teacher. What its gradient reads (``ROUTER_SIGNALS``):
                ``kv`` each teacher's per-sample KV loss over that teacher's running level,
                ``answer_nll`` each teacher's NLL of the gold answer (a learned MinCE),
                ``tag`` the sample's task/mode tag through the per_task table (cost 1 - row)

The teachers' losses are weighted, never their targets: averaging K teachers' KV caches
mixes unrelated representations (notes, "Weight the losses, not the targets").
With K = 1 every rule gives weight 1.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from latentfast.choices import ROUTER_REGULARIZERS as REGULARIZERS  # torch-free: the CLI's choices
from latentfast.choices import ROUTER_SIGNALS
from latentfast.choices import TEACHER_WEIGHTING_RULES as RULES


def _check_stat(name: str, x: torch.Tensor) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"{name} must be a (batch, num_teachers) tensor, got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} has non-finite entries: teacher weights would be NaN")
    return x.detach().float()


def normalize_static(weights: Sequence[float], num_teachers: int) -> torch.Tensor:
    """(K,) fp32 weights summing to 1 from non-negative ``weights`` (one per teacher)."""
    w = torch.as_tensor([float(x) for x in weights], dtype=torch.float32)
    if w.numel() != num_teachers:
        raise ValueError(f"static weights: expected {num_teachers} (one per teacher), got {w.numel()}")
    if not torch.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"static weights must be finite, >= 0 and not all 0, got {w.tolist()}")
    return w / w.sum()


def static_weights(weights: Sequence[float], batch_size: int, device=None) -> torch.Tensor:
    w = normalize_static(weights, len(weights)).to(device)
    return w.expand(batch_size, -1).clone()


def per_task_weights(tags: Sequence[str | None], table: Mapping[str, Sequence[float]], num_teachers: int,
                     device=None) -> torch.Tensor:
    """Row ``table[tag]`` for each sample's tag; ``table['default']`` (if given) for tags
    the table does not name (and for samples without a tag)."""
    rows = {k: normalize_static(v, num_teachers) for k, v in table.items()}
    out = []
    for i, tag in enumerate(tags):
        key = tag if tag in rows else "default"
        if key not in rows:
            raise ValueError(f"per_task weighting: sample {i} has task/mode tag {tag!r}, which no teacher's "
                             f"tasks/mode lists and the table has no 'default' (known: {sorted(rows)})")
        out.append(rows[key])
    return torch.stack(out).to(device)


def confidence_weights(nll: torch.Tensor) -> torch.Tensor:
    """CA-MKD (arXiv 2201.00007): ``(1 - softmax_k(CE_k)) / (K - 1)`` from (B, K) NLLs."""
    ce = _check_stat("nll", nll)
    K = ce.shape[1]
    if K == 1:
        return torch.ones_like(ce)
    return (1.0 - torch.softmax(ce, dim=1)) / (K - 1)


def entropy_weights(entropy: torch.Tensor) -> torch.Tensor:
    """EBKD (Kwon et al. 2020): ``1 - H_k / sum_j H_j``, which sums to K - 1, renormalised."""
    h = _check_stat("entropy", entropy)
    if (h < 0).any():
        raise ValueError("entropy must be >= 0")
    K = h.shape[1]
    if K == 1:
        return torch.ones_like(h)
    total = h.sum(1, keepdim=True)
    w = (1.0 - h / total.clamp_min(1e-30)) / (K - 1)
    return torch.where(total > 0, w, torch.full_like(w, 1.0 / K))  # all certain: no preference


def min_ce_weights(nll: torch.Tensor) -> torch.Tensor:
    """FuseLLM MinCE: one-hot on the lowest-CE teacher (the first one on ties)."""
    ce = _check_stat("nll", nll)
    return F.one_hot(ce.argmin(1), ce.shape[1]).float()


def masked_mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """(B, D) mean of ``hidden`` (B, T, D) over the valid tokens."""
    if attention_mask is None:
        return hidden.mean(1)
    m = (attention_mask != 0).to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1)


class TeacherRouter(nn.Module):
    """The ``learned`` rule: ``softmax(W pool(h_s) + b)`` over the teachers (AMTML-KD's
    ``softmax_k(W^T(pool(f_s) * theta_k))`` is this map written as a product). The student's
    hidden state is read detached: the router learns from the distillation loss, the student
    is not pushed to steer it. Zero-initialised, so training starts from uniform weights."""

    def __init__(self, hidden_size: int, num_teachers: int, hidden: int = 0, temperature: float = 1.0):
        super().__init__()
        if num_teachers < 1 or hidden_size < 1:
            raise ValueError(f"TeacherRouter needs hidden_size >= 1 and num_teachers >= 1, "
                             f"got {hidden_size}, {num_teachers}")
        if temperature <= 0:
            raise ValueError(f"router temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        self.norm = nn.LayerNorm(hidden_size, elementwise_affine=False)
        layers = [nn.Linear(hidden_size, hidden), nn.GELU(), nn.Linear(hidden, num_teachers)] if hidden else \
            [nn.Linear(hidden_size, num_teachers)]
        self.net = nn.Sequential(*layers)
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def logits(self, hidden: torch.Tensor, attention_mask=None) -> torch.Tensor:
        pooled = masked_mean_pool(hidden.detach().float(), attention_mask)
        return self.net(self.norm(pooled).to(self.net[-1].weight.dtype)).float() / self.temperature

    def forward(self, hidden: torch.Tensor, attention_mask=None) -> torch.Tensor:
        return torch.softmax(self.logits(hidden, attention_mask), dim=-1)


def router_regularizer(weights: torch.Tensor, kind: str = "load_balance") -> torch.Tensor:
    """>= 0, zero at uniform weights. ``load_balance``: KL(batch-mean weights || uniform),
    so the batch spreads over the teachers while each sample may still pick one;
    ``entropy``: mean over samples of KL(w_b || uniform) = log K - H(w_b), keeps each
    sample's weights soft; ``none``: 0."""
    if kind not in REGULARIZERS:
        raise ValueError(f"router regularizer must be one of {REGULARIZERS}, got {kind!r}")
    K = weights.shape[-1]
    if kind == "none" or K == 1:
        return weights.sum() * 0.0
    log_k = torch.log(torch.tensor(float(K), device=weights.device))

    def neg_entropy(p):
        return (p * torch.log(p.clamp_min(1e-12))).sum(-1)

    if kind == "load_balance":
        return log_k + neg_entropy(weights.mean(0))
    return (log_k + neg_entropy(weights)).mean()


def weight_entropy(weights: torch.Tensor) -> torch.Tensor:
    """Mean over samples of the weights' entropy (nats): 0 = hard choice, log K = uniform."""
    return -(weights * torch.log(weights.clamp_min(1e-12))).sum(-1).mean()


def teacher_weights(rule: str, *, batch_size: int | None = None, static=None, tags=None, table=None,
                    nll=None, entropy=None, router_probs=None, device=None) -> torch.Tensor:
    """(B, K) weights for ``rule`` from the statistics that rule reads (see module docstring)."""
    def need(name, value):
        if value is None:
            raise ValueError(f"teacher weighting {rule!r} needs {name}")
        return value

    if rule == "static":
        return static_weights(need("static", static), need("batch_size", batch_size), device)
    if rule == "per_task":
        return per_task_weights(need("tags", tags), need("table", table), len(need("static", static)), device)
    if rule == "confidence":
        return confidence_weights(need("nll", nll))
    if rule == "entropy":
        return entropy_weights(need("entropy", entropy))
    if rule == "min_ce":
        return min_ce_weights(need("nll", nll))
    if rule == "learned":
        return need("router_probs", router_probs)
    raise ValueError(f"teacher weighting must be one of {RULES}, got {rule!r}")


@torch.no_grad()
def router_cost(signal: str, *, nll=None, tags=None, table=None, num_teachers: int, device=None) -> torch.Tensor:
    """(B, K) the learned router's per-sample cost of each teacher for ``signal`` other than
    ``kv`` (the KV losses themselves, in ``MultiTeacherKVLoss``): the router's gradient is
    d/dw_bk = cost_bk, so it moves weight to the cheaper teacher. ``answer_nll``: the
    teacher's NLL of the gold answer; ``tag``: 1 - the per_task table's row for the sample's tag."""
    if signal == "answer_nll":
        if nll is None:
            raise ValueError("router_signal 'answer_nll' needs the teachers' answer NLL (stats)")
        return nll.detach().float()
    if signal == "tag":
        if tags is None or table is None or all(t is None for t in tags):
            raise ValueError("router_signal 'tag' needs task/mode tags on the rows and the teachers' per_task table")
        return 1.0 - per_task_weights(tags, table, num_teachers, device)
    raise ValueError(f"router_signal must be one of {ROUTER_SIGNALS[1:]} here (kv is the KV loss), got {signal!r}")


@torch.no_grad()
def answer_nll_entropy(lm_head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor):
    """Per sample, over its answer tokens (``targets != -100``): the mean NLL of the gold
    token and the mean predictive entropy, both (B,) fp32. A sample without answer
    tokens gets 0 for both (no evidence for or against any teacher)."""
    sel = targets != -100
    rows = sel.nonzero(as_tuple=True)[0]
    logp = torch.log_softmax(lm_head(hidden[sel]).float(), dim=-1)
    nll_tok = -logp.gather(1, targets[sel][:, None]).squeeze(1)
    ent_tok = -(logp.exp() * logp).sum(-1)
    B = targets.shape[0]
    n = torch.zeros(B, device=hidden.device).index_add_(0, rows, torch.ones_like(nll_tok))
    nll = torch.zeros(B, device=hidden.device).index_add_(0, rows, nll_tok) / n.clamp_min(1)
    ent = torch.zeros(B, device=hidden.device).index_add_(0, rows, ent_tok) / n.clamp_min(1)
    return nll, ent


def weighted_teacher_loss(weighted_losses: Sequence[torch.Tensor], shares: torch.Tensor,
                          weights: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """``sum_b sum_k w_bk * L_bk`` from the pieces the fused KV loss gives cheaply:
    ``weighted_losses[k]`` = teacher k's loss with ``sample_weight=w[:, k].detach()`` (the
    value and the student's gradients) and ``shares`` (B, K), the detached per-sample
    L_bk. When the weights carry a gradient (the learned router) the term
    ``(w - sg(w)) * L`` adds d/dw_bk = L_bk without changing the value; with ``scale``
    (K,) > 0 it adds d/dw_bk = L_bk / scale_k instead (``MultiTeacherKVLoss`` passes each
    teacher's running loss level, so the router compares teachers on one scale)."""
    total = torch.stack(list(weighted_losses)).sum()
    if weights.requires_grad:
        s = shares.detach().to(weights.dtype)
        if scale is not None:
            s = s / scale.detach().to(s.dtype).clamp_min(1e-12)
        total = total + ((weights - weights.detach()) * s).sum()
    return total
