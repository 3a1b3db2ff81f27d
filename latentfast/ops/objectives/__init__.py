"""Objectives for the fused lm_head loss engine (``latentfast.ops.lm_head_engine``): each loss
written once, as plain torch over per-token statistics; the fused op and the reference on
full logits both run (and differentiate) this code."""
from latentfast.ops.objectives.grpo import GRPOObjective  # noqa: F401
from latentfast.ops.objectives.ppo import PPOSequenceObjective  # noqa: F401
