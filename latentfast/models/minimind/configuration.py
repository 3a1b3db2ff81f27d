"""``MiniMindConfig``: the note-era (MiniMind 2510, commit a8455ca) configuration, plus
the gated-attention flags of the public fork that introduced them.

Defaults are what MiniMind's users type (``../shared/notes/minimind.md`` section 1).
Differences from upstream, on purpose:

* ``headwise_attn_output_gate`` / ``elementwise_attn_output_gate`` (arXiv 2505.06708),
  with the fork's q_proj layout, so its weights load.
* YaRN parameters are kept in ``yarn_parameters`` (a property) instead of
  ``rope_scaling``: recent transformers rewrites ``rope_scaling`` into its own
  ``rope_parameters`` format, which MiniMind's formula does not follow.
"""
from __future__ import annotations

from transformers import PretrainedConfig

# MiniMind's YaRN settings for ``inference_rope_scaling`` (extrapolates 2048 -> 32768).
YARN_PARAMETERS = {"beta_fast": 32, "beta_slow": 1, "factor": 16, "original_max_position_embeddings": 2048,
                   "attention_factor": 1.0, "type": "yarn"}
SCORING_FUNCS = ("softmax",)


def minimind_intermediate_size(hidden_size: int) -> int:
    """MiniMind's SwiGLU width: 8/3 of the hidden size, rounded up to a multiple of 64."""
    return 64 * ((int(hidden_size * 8 / 3) + 63) // 64)


class MiniMindConfig(PretrainedConfig):
    model_type = "minimind"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    def __init__(
        self,
        dropout: float = 0.0,
        bos_token_id: int = 1,
        eos_token_id: int = 2,
        hidden_act: str = "silu",
        hidden_size: int = 512,
        intermediate_size: int | None = None,
        max_position_embeddings: int = 32768,
        num_attention_heads: int = 8,
        num_hidden_layers: int = 8,
        num_key_value_heads: int = 2,
        vocab_size: int = 6400,
        rms_norm_eps: float = 1e-05,
        rope_theta: float = 1000000.0,
        inference_rope_scaling: bool = False,
        flash_attn: bool = True,
        headwise_attn_output_gate: bool = False,
        elementwise_attn_output_gate: bool = False,
        # MoE (ignored unless use_moe)
        use_moe: bool = False,
        num_experts_per_tok: int = 2,
        n_routed_experts: int = 4,
        n_shared_experts: int = 1,
        scoring_func: str = "softmax",
        aux_loss_alpha: float = 0.01,
        seq_aux: bool = True,
        norm_topk_prob: bool = True,
        **kwargs,
    ):
        kwargs.pop("tie_word_embeddings", None)  # MiniMind always ties lm_head to the embedding
        kwargs.pop("rope_scaling", None)  # recomputed from inference_rope_scaling (see module docstring)
        kwargs.setdefault("pad_token_id", 0)  # <|endoftext|>
        # MiniMind's forward builds no KV cache unless asked (generate asks); training forwards stay lean.
        self.use_cache = bool(kwargs.pop("use_cache", False))
        head_dim = kwargs.pop("head_dim", None)
        if head_dim is not None and head_dim != hidden_size // num_attention_heads:
            raise ValueError(f"head_dim is fixed to hidden_size // num_attention_heads "
                             f"({hidden_size // num_attention_heads}) in MiniMind, got {head_dim}")
        self.dropout = dropout
        self.hidden_act = hidden_act
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size or minimind_intermediate_size(hidden_size)
        self.max_position_embeddings = max_position_embeddings
        self.num_attention_heads = num_attention_heads
        self.num_hidden_layers = num_hidden_layers
        self.num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        self.head_dim = hidden_size // num_attention_heads
        self.vocab_size = vocab_size
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.inference_rope_scaling = bool(inference_rope_scaling)
        self.flash_attn = bool(flash_attn)
        self.headwise_attn_output_gate = bool(headwise_attn_output_gate)
        self.elementwise_attn_output_gate = bool(elementwise_attn_output_gate)
        self.use_moe = bool(use_moe)
        self.num_experts_per_tok = num_experts_per_tok
        self.n_routed_experts = n_routed_experts
        self.n_shared_experts = n_shared_experts
        self.scoring_func = scoring_func
        self.aux_loss_alpha = aux_loss_alpha
        self.seq_aux = bool(seq_aux)
        self.norm_topk_prob = bool(norm_topk_prob)
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id, tie_word_embeddings=True, **kwargs)
        self._validate()

    def _validate(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                             f"({self.num_attention_heads})")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be divisible by "
                             f"num_key_value_heads ({self.num_key_value_heads})")
        if self.headwise_attn_output_gate and self.elementwise_attn_output_gate:
            raise ValueError("headwise_attn_output_gate and elementwise_attn_output_gate are exclusive; set one")
        if self.use_moe:
            if self.scoring_func not in SCORING_FUNCS:
                raise ValueError(f"scoring_func must be one of {SCORING_FUNCS}, got {self.scoring_func!r}")
            if not 1 <= self.num_experts_per_tok <= self.n_routed_experts:
                raise ValueError(f"num_experts_per_tok must be in [1, n_routed_experts={self.n_routed_experts}], "
                                 f"got {self.num_experts_per_tok}")
            if self.n_shared_experts < 0:
                raise ValueError(f"n_shared_experts must be >= 0, got {self.n_shared_experts}")

    @property
    def attn_gate(self) -> str | None:
        """``"headwise"``, ``"elementwise"`` or None."""
        if self.headwise_attn_output_gate:
            return "headwise"
        return "elementwise" if self.elementwise_attn_output_gate else None

    @property
    def yarn_parameters(self) -> dict | None:
        return dict(YARN_PARAMETERS) if self.inference_rope_scaling else None


def model_config(flags, hidden_size: int | None = None, num_layers: int | None = None) -> MiniMindConfig:
    """The model MiniMind's trainer flags describe (``hidden_size``, ``num_hidden_layers``,
    ``use_moe``, the attention gates), or the given size: the trainers and the planner build it."""
    return MiniMindConfig(hidden_size=hidden_size or flags.hidden_size,
                          num_hidden_layers=num_layers or flags.num_hidden_layers, use_moe=bool(flags.use_moe),
                          headwise_attn_output_gate=bool(flags.headwise_attn_output_gate),
                          elementwise_attn_output_gate=bool(flags.elementwise_attn_output_gate))
