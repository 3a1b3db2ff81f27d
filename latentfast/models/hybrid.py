"""Hybrid latent reasoning (HRPO) on top of any Hugging Face causal LM.

The wrapped model is not forked: we attach HRPO's modules to its base transformer
(``lm.base_model.thinking``) under the recipe's names so PEFT
``modules_to_save=HRPO_MODULES`` works unchanged, and drive it through
``get_input_embeddings()`` / ``inputs_embeds``.

Training forward (``recompute="stored"``, the default)::

    embeds = embed(ids)
    embeds[thinking] = thinking_residual(embeds[thinking], stored_hidden)   # fused, with grad
    hidden = transformer(inputs_embeds=embeds)                              # final hidden states

``forward`` stops there: the loss is the RL trainer's objective
(``latentfast.train.rl.objectives.GRPOLoss``) on ``hidden`` and the lm_head, no logits tensor.
Rollouts are the decode engine's: ``latentfast.generation.generate(model, ..., marker_ids=...)``.

``stored_hidden`` (N_think x D) is the last hidden state the rollout already computed
at each thinking position, so the projection, normalisation and gates are recomputed
with gradient without the recipe's extra no-grad forward and its B x T x D cache
(``recompute="two_pass"`` runs that design for comparison: ``models/two_pass.py``).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM

from latentfast.hf import adapter
from latentfast.nn import ThinkingResidual
from latentfast.ops import thinking_residual
from latentfast.reference.thinking_residual import normalize_thinking_state

from latentfast.ops.lm_head_engine import lm_head_logps

from .local import from_local

# PEFT modules_to_save, exactly as in the recipe (hrpo_gsm8k.py).
HRPO_MODULES = ["thinking_residual_gate_r", "thinking_residual_gate_i", "thinking_residual_Lambda",
                "thinking_projection"]
THINKING_STATES = ("projection", "soft_embedding")
PROJECTIONS = ("linear", "layernorm", "mlp")
RECOMPUTE = ("stored", "two_pass", "two_pass_clean")


@dataclass
class HybridConfig:
    """``thinking_state``: ``"projection"`` = normalize(thinking_projection(last_hidden));
    ``"soft_embedding"`` = the original HRPO state probs @ E / ||probs||_2.
    ``projection``: ``"linear"`` (fused), or ``"layernorm"`` / ``"mlp"`` variants."""

    thinking_state: str = "projection"
    projection: str = "linear"
    c: float = 8.0
    r_min: float = 0.99
    r_max: float = 0.999
    answer_marker: str = "####"

    def __post_init__(self):
        if self.thinking_state not in THINKING_STATES:
            raise ValueError(f"thinking_state must be one of {THINKING_STATES}, got {self.thinking_state!r}")
        if self.projection not in PROJECTIONS:
            raise ValueError(f"projection must be one of {PROJECTIONS}, got {self.projection!r}")


class ThinkingModules(nn.Module):
    """HRPO's modules: the fused residual (holding ``thinking_projection`` in the linear
    case) plus, for the LayerNorm/MLP variants, a separate ``thinking_projection``."""

    def __init__(self, hidden_size: int, cfg: HybridConfig):
        super().__init__()
        fused_proj = cfg.thinking_state == "projection" and cfg.projection == "linear"
        self.residual = ThinkingResidual(hidden_size, cfg.c, cfg.r_min, cfg.r_max, projection=fused_proj)
        self.uses_projection = cfg.thinking_state == "projection"
        if self.uses_projection and cfg.projection != "linear":
            lin = nn.Linear(hidden_size, hidden_size, bias=False)
            nn.init.normal_(lin.weight, std=0.001)  # recipe: start near the original model
            if cfg.projection == "layernorm":
                self.thinking_projection = nn.Sequential(lin, nn.LayerNorm(hidden_size))
            else:
                self.thinking_projection = nn.Sequential(lin, nn.GELU(), nn.Linear(hidden_size, hidden_size))

    @property
    def projection(self) -> nn.Module | None:
        """The trainable projection, wherever it lives (None in soft-embedding mode)."""
        if "thinking_projection" in self._modules:
            return self._modules["thinking_projection"]
        return self.residual.thinking_projection

    def state(self, hidden: torch.Tensor) -> torch.Tensor:
        """Normalised thinking state from raw last hidden states (no fusion; rollout/two-pass use)."""
        if "thinking_projection" in self._modules:  # LayerNorm / MLP variant (maybe PEFT-wrapped)
            return normalize_thinking_state(self._modules["thinking_projection"](hidden))
        return normalize_thinking_state(F.linear(hidden, self.residual.thinking_projection.weight))

    def mix_state(self, embeds: torch.Tensor, state: torch.Tensor):
        """The fused residual from an already-normalised state (bypasses the projection)."""
        r = self.residual
        if r.thinking_projection is None:
            return r(embeds, state.to(embeds.dtype))
        return thinking_residual(embeds, state.to(embeds.dtype), None, r.thinking_residual_gate_r.weight,
                                 r.thinking_residual_gate_r.bias, r.thinking_residual_gate_i.weight,
                                 r.thinking_residual_gate_i.bias, r.thinking_residual_Lambda.Lambda, r.c, r.eps)

    def forward(self, embeds: torch.Tensor, hidden: torch.Tensor):
        """(out, a) at N thinking positions. ``hidden`` is the raw last hidden state in
        projection mode, the already-normalised soft embedding otherwise."""
        if self.uses_projection and "thinking_projection" in self._modules:
            hidden = self.state(hidden)  # variants: PyTorch projection, then the fused residual
        return self.residual(embeds, hidden.to(embeds.dtype))


class HybridThinkingLM(nn.Module):
    """A causal LM plus HRPO's thinking modules; ``forward`` gives the hidden states that
    predict the completion tokens (the RL trainer's policy protocol, ``train/rl/policy.py``).

    ``lm`` may be a plain ``PreTrainedModel`` or a ``PeftModel`` around one (LoRA layers
    are injected in place, so the same base transformer object is used either way).
    """

    def __init__(self, lm: nn.Module, cfg: HybridConfig | None = None, attach: bool = True):
        super().__init__()
        self.cfg = cfg or HybridConfig()
        self.lm = lm
        if attach:
            hf = self.hf_model
            hidden = hf.config.hidden_size
            thinking = ThinkingModules(hidden, self.cfg)
            param = next(hf.parameters())
            hf.base_model.add_module("thinking", thinking.to(param.device))

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, path: str, cfg: HybridConfig | None = None, **hf_kwargs) -> "HybridThinkingLM":
        return cls(from_local(AutoModelForCausalLM, path, **hf_kwargs), cfg)  # local files only

    @classmethod
    def from_config(cls, config, cfg: HybridConfig | None = None) -> "HybridThinkingLM":
        return cls(AutoModelForCausalLM.from_config(config), cfg)

    def add_lora(self, rank: int = 32, alpha: int | None = None, target_modules=None, dropout: float = 0.0):
        """Wrap with PEFT LoRA (alpha = 2*rank, q/k/v/o/gate/up/down, as the recipe);
        HRPO's modules are trained in full through ``modules_to_save``."""
        self.lm = adapter.add_lora(self.lm, rank, alpha, dropout, target_modules, modules_to_save=HRPO_MODULES)
        return self

    def enable_activation_checkpointing(self) -> "HybridThinkingLM":
        """Recompute each decoder layer's activations in backward instead of keeping them
        (Hugging Face's checkpointing, non-reentrant so it composes with DDP/FSDP2 and
        inputs_embeds that carry gradient). Training forwards only; generation is unaffected."""
        adapter.enable_activation_checkpointing(self.hf_model, use_reentrant=False)
        return self

    # ------------------------------------------------------------------ accessors
    @property
    def hf_model(self) -> nn.Module:
        """The underlying ``PreTrainedModel`` (LoRA layers injected when PEFT is used)."""
        return adapter.unwrap(self.lm)

    @property
    def transformer(self) -> nn.Module:
        return self.hf_model.base_model

    @property
    def thinking(self) -> ThinkingModules:
        return self.transformer.thinking

    @property
    def config(self):
        return self.hf_model.config

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.hf_model.get_input_embeddings()(ids)

    def lm_head_weight(self) -> torch.Tensor:
        return adapter.lm_head_weight(self.lm)

    def lm_head_bias(self):
        return adapter.lm_head_bias(self.lm)

    @contextmanager
    def reference(self):
        """The reference policy: the same weights with adapters (LoRA and HRPO's
        modules_to_save copies) disabled; no second copy of the model."""
        if not hasattr(self.lm, "disable_adapter"):
            raise RuntimeError("a reference policy needs LoRA adapters (lora_rank > 0) or beta=0")
        with self.lm.disable_adapter():
            yield self

    def hybrid_config(self) -> dict:
        return asdict(self.cfg)

    # ------------------------------------------------------------------ training forward
    def mixed_embeds(self, ids: torch.Tensor, think: torch.Tensor, thinking_hidden: torch.Tensor):
        """Input embeddings with the thinking residual applied at ``think`` (B x T bool)
        from the per-position states ``thinking_hidden`` (N x D, row-major order)."""
        embeds = self.embed(ids)
        if thinking_hidden is None or thinking_hidden.numel() == 0:
            return embeds, None
        idx = think.nonzero(as_tuple=True)
        out, a = self.thinking(embeds[idx], thinking_hidden)
        return embeds.index_put(idx, out.to(embeds.dtype)), a

    def final_hidden(self, embeds, attention_mask):
        return adapter.run_decoder(self.lm, embeds, attention_mask, transformer=self.transformer).last_hidden_state

    def completion_hidden(self, batch: dict, recompute: str = "stored"):
        """Final hidden states that predict each completion token (B x C x D), and the
        thinking gate ``a`` at thinking positions."""
        if recompute not in RECOMPUTE:
            raise ValueError(f"recompute must be one of {RECOMPUTE}, got {recompute!r}")
        ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
        mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
        P = batch["prompt_ids"].shape[1]
        think = F.pad(batch["thinking_mask"], (P, 0), value=False)
        states = batch["thinking_hidden"]
        if recompute != "stored" and self.thinking.uses_projection:
            from .two_pass import two_pass_states  # comparison only: the recipe's extra forward

            states = two_pass_states(self, ids, mask, think, states, clean=recompute == "two_pass_clean")
        embeds, a = self.mixed_embeds(ids, think, states)
        hidden = self.final_hidden(embeds, mask)
        return hidden[:, P - 1:-1], a

    def forward(self, batch: dict, recompute: str = "stored"):
        """``(hidden, aux)`` for a rollout batch (``generation.Rollout.as_batch``): the final
        hidden states predicting each completion token (B x C x D) and a 0-dim term to add to
        the loss. ``aux`` is 0; when no position was mixed it is 0 x the thinking modules'
        parameters, so they still get a (zero) gradient, as DDP expects of every one."""
        hidden, a = self.completion_hidden(batch, recompute)
        aux = hidden.new_zeros((), dtype=torch.float32)
        if a is None:
            aux = adapter.keep_in_graph(aux, self.thinking.parameters())
        return hidden, aux

    @torch.no_grad()
    def per_token_logps(self, batch: dict, temperature: float = 1.0) -> torch.Tensor:
        """Log-probs of the completion tokens (B x C, 0 at padding), no logits tensor."""
        hidden, _ = self.completion_hidden(batch, "stored")
        return lm_head_logps(hidden, self.lm_head_weight(), batch["completion_ids"], self.lm_head_bias(),
                             temperature, batch["completion_mask"])[0]
