from latentfast.ops.thinking_residual import thinking_residual  # noqa: F401
from latentfast.ops.attention_importance import attention_token_importance  # noqa: F401
from latentfast.ops.kv_loss import importance_weights, kv_loss, weighted_sq_error  # noqa: F401
from latentfast.ops.grpo_loss import GRPOMetrics, fused_linear_grpo_loss, lm_head_logps  # noqa: F401
from latentfast.ops.swiglu import swiglu_mlp  # noqa: F401
from latentfast.ops.cross_entropy import CrossEntropyOutput, fused_linear_cross_entropy  # noqa: F401
from latentfast.ops.preference import fused_linear_dpo_loss, fused_linear_orpo_loss, fused_linear_simpo_loss  # noqa: F401
from latentfast.ops.distill import fused_linear_distill_loss, fused_linear_jsd_loss  # noqa: F401
