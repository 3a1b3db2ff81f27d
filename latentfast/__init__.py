"""latentfast: fused kernels, model layer and trainers for latent reasoning + GRPO."""

__version__ = "0.1.0"
