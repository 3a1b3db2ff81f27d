"""The GRPO family's objective, written once (TRL ``GRPOTrainer._compute_loss``), with PPO's
clipped term on per-token advantages and MiniMind's SPO as special cases.

Used by the fused op (``latentfast.ops.grpo_loss``, through the lm_head engine) and by the
reference on full logits (``latentfast.reference.grpo_loss``); both differentiate this code.

  * ``coef_1 = exp(logp - old)`` per token, or per sequence (GSPO,
    ``importance_sampling_level="sequence"``: mean log-ratio of the sequence).
  * ``coef_2 = clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)``; ``delta`` clamps
    ``coef_1`` from above; ``pg = -min(coef_1 * A, coef_2 * A)``.
  * ``pg *= pg_weight`` (entropy mask from ``top_entropy_quantile`` times ``vllm_is_ratio``).
  * ``+ beta * k3(ref, logp)`` (times ``exp(log_w)`` with ``use_bias_correction_kl``).
  * other policy terms: ``cispo`` ``-clamp(coef_1, max=epsilon_high).detach() A logp``;
    ``sapo`` ``-sigmoid(tau (coef_1 - 1)) 4 / tau A`` (tau = sapo_temperature_pos/neg by
    the sign of A); ``vespo`` ``-phi(w) A logp`` with TRL's gamma weight phi of the
    sequence ratio w (detached); ``spo`` (MiniMind) ``-logp A``.
  * ``off_policy_mask_threshold``: drop sequences with A < 0 whose mean
    ``sampling_logp - logp`` exceeds it (DeepSeek-V3.2's off-policy sequence mask).
  * normalisation by ``loss_type`` (grpo, sapo, spo: per-sequence token mean averaged over
    sequences; bnpo: token mean of the micro-batch; dr_grpo: / (B * max_completion_length);
    dapo, cispo, vespo: / ``normalizer``, the global token count per process; luspo (TRL 1.16):
    ``(per_token_loss * mask).sum(-1).mean()``, each sequence's summed loss averaged over
    sequences -- a (B, 1) sequence loss counts len_b times); no division by gradient-accumulation steps
    (the trainer's business, as in Liger).
  * ``entropy_coef``: ``- entropy_coef * H``, H the mean entropy of the (entropy-masked)
    tokens (/ ``normalizer`` for dapo, cispo, vespo), differentiated.
Without ``old`` the ratio is ``exp(logp - logp.detach())`` (1, gradient of logp); without
``ref`` the KL term is 0 with zero gradient.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch

from latentfast.choices import GRPO_LOSS_TYPES as LOSS_TYPES  # torch-free: the CLIs' choices
from latentfast.choices import TOKEN_NORMALISED, check_grpo_options
from latentfast.ops.lm_head_engine import Objective, Rows, register_objective

CLIPPED = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")  # the PPO-clipped policy term
METRICS = ("kl", "entropy", "ratio_mean", "clip_ratio_low", "clip_ratio_high", "clip_ratio_region")


def world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def dapo_normalizer(mask: torch.Tensor, num_items_in_batch) -> torch.Tensor:
    """Completion tokens of the global batch / world size (TRL: num_items_in_batch /
    num_processes), so per-rank losses summed by DDP and accumulated over micro-batches
    give one token-mean. Without num_items_in_batch: this micro-batch, all-reduced."""
    world = world_size()
    if num_items_in_batch is not None:
        n = torch.as_tensor(num_items_in_batch, device=mask.device, dtype=torch.float32)
    else:
        n = mask.ne(0).sum().float()
        if world > 1:
            n = n.clone()
            torch.distributed.all_reduce(n)
    return (n / world).clamp(min=1.0)


def _quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """torch.quantile's 'linear' rule by sorting: no 2^24-element input limit."""
    if values.numel() == 0:
        return values.new_tensor(float("nan"))
    v = values.sort().values
    pos = q * (v.numel() - 1)
    lo = int(pos)
    hi = min(lo + 1, v.numel() - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def entropy_mask(entropy: torch.Tensor, mask: torch.Tensor, top_entropy_quantile: float) -> torch.Tensor:
    """TRL ``get_high_entropy_mask``: keep tokens at or above the ``1 - top_entropy_quantile``
    quantile of the completion tokens' entropies, over every rank's tokens."""
    mask = mask.bool()
    values = torch.where(mask, entropy, torch.full_like(entropy, float("nan"))).reshape(-1)
    if world_size() > 1:  # pad with NaN to a common length, gather, drop the pads
        dist = torch.distributed
        n = torch.tensor([values.numel()], device=values.device)
        dist.all_reduce(n, op=dist.ReduceOp.MAX)
        padded = torch.full((int(n),), float("nan"), device=values.device)
        padded[: values.numel()] = values
        gathered = [torch.empty_like(padded) for _ in range(world_size())]
        dist.all_gather(gathered, padded)
        values = torch.cat(gathered)
    threshold = _quantile(values[~values.isnan()], 1.0 - top_entropy_quantile)
    # no completion token anywhere -> NaN threshold -> empty mask, as TRL
    return ((entropy * mask) >= threshold) & mask


@register_objective
@dataclasses.dataclass(frozen=True)
class GRPOObjective(Objective):
    beta: float = 0.04
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    loss_type: str = "dapo"
    max_completion_length: Optional[int] = None
    sequence_level: bool = False
    delta: Optional[float] = None
    use_bias_correction_kl: bool = False
    per_sequence_advantages: bool = False  # advantages were (B,): TRL's sequence metrics are then (B, 1)
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0
    off_policy_mask_threshold: Optional[float] = None
    entropy_coef: float = 0.0

    inputs = (("advantages", "token"), ("old", "token"), ("ref", "token"), ("entropy_mask", "token"),
              ("vllm_ratio", "token"), ("sampling", "token"), ("normalizer", "batch"),
              ("entropy_count", "batch"))
    metric_names = METRICS

    def __post_init__(self):
        check_grpo_options(self.loss_type, max_completion_length=self.max_completion_length, delta=self.delta,
                           sapo_temperature_pos=self.sapo_temperature_pos,
                           sapo_temperature_neg=self.sapo_temperature_neg)

    @property
    def stats(self):
        return ("logp", "entropy") if self.entropy_coef != 0.0 else ("logp",)

    @property
    def row_local(self):  # these couple the rows of a sequence: chunks then hold whole sequences
        return not (self.sequence_level or self.loss_type == "vespo" or self.off_policy_mask_threshold is not None)

    def _vespo_phi(self, r: Rows, log_ratio, adv):
        """TRL ``get_gamma_weights``: phi(w) = exp(lambda + k log w - lambda w), detached, per row."""
        with torch.no_grad():
            lower = math.log(1e-8)
            seq_lr = r.seq_sum(torch.clamp(log_ratio.detach(), -20.0, 20.0))
            if "vllm_ratio" in r.tok:
                seq_lr = seq_lr + r.seq_sum(torch.clamp(torch.log(r.tok["vllm_ratio"]), lower, 20.0))
            log_w = torch.clamp(seq_lr, lower, 20.0)[r.seq]
            pos = adv >= 0
            k = torch.where(pos, self.vespo_k_pos, self.vespo_k_neg)
            lam = torch.where(pos, self.vespo_lambda_pos, self.vespo_lambda_neg).clamp(min=1e-4)
            return torch.exp(lam + k * log_w - lam * torch.exp(log_w)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)

    def _terms(self, r: Rows):
        lp = r.logp
        adv = r.tok["advantages"]
        old = r.tok.get("old")
        old = old if old is not None else lp.detach()
        log_ratio = lp - old
        if self.sequence_level:
            log_w_seq = r.seq_mean(log_ratio)
            log_w = log_w_seq[r.seq]
        else:
            log_w_seq, log_w = None, log_ratio
        ratio = torch.exp(log_w)
        coef_1 = ratio
        lt = self.loss_type
        phi = None
        if lt == "cispo":
            per_token = -torch.clamp(ratio, max=self.epsilon_high).detach() * adv * lp
        elif lt in CLIPPED:
            coef_2 = torch.clamp(ratio, 1 - self.epsilon_low, 1 + self.epsilon_high)
            if self.delta is not None:
                coef_1 = torch.clamp(ratio, max=self.delta)
            per_token = -torch.minimum(coef_1 * adv, coef_2 * adv)
        elif lt == "sapo":
            tau = torch.where(adv > 0, self.sapo_temperature_pos, self.sapo_temperature_neg)
            per_token = -torch.sigmoid(tau * (ratio - 1)) * 4 / tau * adv
        elif lt == "vespo":
            phi = self._vespo_phi(r, log_ratio, adv)
            per_token = -phi * adv * lp
        else:  # spo
            per_token = -lp * adv
        if self.off_policy_mask_threshold is not None:
            sampling = r.tok.get("sampling", old)
            seq_kl = r.seq_mean(sampling - lp.detach())[r.seq]
            per_token = per_token * ((adv >= 0) | (seq_kl <= self.off_policy_mask_threshold)).float()
        if "entropy_mask" in r.tok:
            per_token = per_token * r.tok["entropy_mask"]
        if "vllm_ratio" in r.tok and lt != "vespo":
            per_token = per_token * r.tok["vllm_ratio"]
        kl = None
        if self.beta != 0.0:
            ref = r.tok.get("ref")
            ref = ref if ref is not None else lp.detach()
            kl = torch.exp(ref - lp) - (ref - lp) - 1
            if self.use_bias_correction_kl:
                kl = kl * ratio
            per_token = per_token + self.beta * kl
        return dict(per_token=per_token, ratio=ratio, coef_1=coef_1, kl=kl, log_w_seq=log_w_seq, adv=adv, phi=phi)

    def _weight(self, r: Rows):
        lt = self.loss_type
        if lt in ("grpo", "sapo", "spo"):
            return 1.0 / (r.seq_len.clamp(min=1.0)[r.seq] * r.n_seqs)
        if lt == "bnpo":
            return 1.0 / r.n_tokens.clamp(min=1.0)
        if lt == "dr_grpo":
            return 1.0 / (r.n_seqs * self.max_completion_length)
        if lt == "luspo":
            # (per_token_loss * mask).sum(-1).mean(): a (B, 1) sequence loss, repeated on its
            # len_b rows here, counts len_b times, as does a (B, T) one (KL, masks) summed
            return 1.0 / r.n_seqs
        return 1.0 / r.batch["normalizer"]

    def loss(self, r: Rows) -> torch.Tensor:
        loss = (self._terms(r)["per_token"] * self._weight(r)).sum()
        if self.entropy_coef != 0.0:
            ent = r.entropy * r.tok["entropy_mask"] if "entropy_mask" in r.tok else r.entropy
            if self.loss_type in TOKEN_NORMALISED:
                bonus = ent.sum() / r.batch["normalizer"]
            else:
                bonus = ent.sum() / r.batch["entropy_count"].clamp(min=1.0)
            loss = loss - self.entropy_coef * bonus
        return loss

    def metrics(self, r: Rows) -> dict:
        t = self._terms(r)
        count = r.n_tokens.clamp(min=1.0)
        tok_mean = lambda v: v.float().sum() / count  # noqa: E731
        per_seq = self.sequence_level and self.per_sequence_advantages

        def batch_mean(v):  # TRL's masked_batch_mean: (B, 1) values average over all B sequences
            return r.seq_mean(v.float()).sum() / r.n_seqs if per_seq else tok_mean(v)

        clip_c, adv = t["coef_1"], t["adv"]
        if self.loss_type in CLIPPED:
            low = (clip_c < 1 - self.epsilon_low) & (adv < 0)
            high = (clip_c > 1 + self.epsilon_high) & (adv > 0)
        elif self.loss_type == "cispo":  # TRL's cispo_clip_ratio
            low = torch.zeros_like(adv, dtype=torch.bool)
            high = (t["ratio"] > self.epsilon_high) & (adv > 0)
        else:
            low = high = torch.zeros_like(adv, dtype=torch.bool)
        if self.sequence_level:  # every sequence, empty ones too (ratio 1), as TRL's coef_1[:, 0]
            ratio_mean = torch.exp(t["log_w_seq"]).mean() if r.n_seqs else torch.ones(())
        else:
            ratio_mean = tok_mean(t["ratio"])
        return dict(kl=tok_mean(t["kl"]) if t["kl"] is not None else torch.zeros(()),
                    entropy=tok_mean(r.entropy), ratio_mean=ratio_mean, clip_ratio_low=batch_mean(low),
                    clip_ratio_high=batch_mean(high), clip_ratio_region=batch_mean(low | high))


GRPO_EXTRA_DEFAULTS = dict(sapo_temperature_pos=1.0, sapo_temperature_neg=1.05, vespo_k_pos=2.0, vespo_lambda_pos=3.0,
                           vespo_k_neg=3.0, vespo_lambda_neg=2.0, off_policy_mask_threshold=None, entropy_coef=0.0)


def grpo_setup(mask, advantages, ref_per_token_logps, old_per_token_logps, *, beta, epsilon_low, epsilon_high,
               loss_type, max_completion_length, importance_sampling_level, delta, use_bias_correction_kl,
               top_entropy_quantile, vllm_is_ratio, num_items_in_batch, entropy_fn, sampling_per_token_logps=None,
               **extra):
    """(objective, inputs) for one GRPO call; shared by the fused op and the reference.
    ``entropy_fn()`` returns the (B, T) token entropies (only called for the entropy mask).
    ``extra``: TRL's GRPOConfig names in ``GRPO_EXTRA_DEFAULTS``."""
    unknown = set(extra) - set(GRPO_EXTRA_DEFAULTS)
    if unknown:
        raise TypeError(f"unexpected GRPO options {sorted(unknown)}")
    check_grpo_options(loss_type, max_completion_length=max_completion_length, delta=delta,
                       importance_sampling_level=importance_sampling_level, top_entropy_quantile=top_entropy_quantile)
    opts = {**GRPO_EXTRA_DEFAULTS, **extra}
    objective = GRPOObjective(
        beta=float(beta), epsilon_low=float(epsilon_low), epsilon_high=float(epsilon_high), loss_type=loss_type,
        max_completion_length=max_completion_length, sequence_level=importance_sampling_level == "sequence",
        delta=None if delta is None else float(delta), use_bias_correction_kl=bool(use_bias_correction_kl),
        per_sequence_advantages=advantages.dim() == 1,
        **{k: (None if v is None else (float(v) if isinstance(v, (int, float)) else v)) for k, v in opts.items()})
    B, T = mask.shape
    m = mask.ne(0)
    adv = advantages.float()
    adv = (adv.unsqueeze(1) if adv.dim() == 1 else adv).expand(B, T)
    ent_mask = entropy_mask(entropy_fn(), m, top_entropy_quantile).float() if top_entropy_quantile < 1.0 else None
    vis = None
    if vllm_is_ratio is not None:
        vis = vllm_is_ratio.float()
        vis = (vis.unsqueeze(1) if vis.dim() == 1 else vis).expand(B, T)
    eff = m.float() if ent_mask is None else m.float() * ent_mask
    inputs = dict(advantages=adv, old=None if old_per_token_logps is None else old_per_token_logps.float(),
                  ref=None if ref_per_token_logps is None or beta == 0.0 else ref_per_token_logps.float(),
                  entropy_mask=ent_mask, vllm_ratio=vis,
                  sampling=None if sampling_per_token_logps is None else sampling_per_token_logps.float(),
                  normalizer=dapo_normalizer(mask, num_items_in_batch) if loss_type in TOKEN_NORMALISED else None,
                  entropy_count=eff.sum() if objective.entropy_coef != 0.0 else None)
    return objective, inputs
