"""latentfast: fused kernels, model layer and trainers for latent reasoning + GRPO."""

__version__ = "0.1.0"


def patch_causal_lm(model, **kwargs):
    """Make a Hugging Face causal LM compute its ``labels`` loss through the fused lm_head
    engine (no logits tensor); see ``latentfast.models.causal_lm_patch``."""
    from latentfast.models.causal_lm_patch import patch_causal_lm as patch  # `import latentfast` stays light

    return patch(model, **kwargs)
