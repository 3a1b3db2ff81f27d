from latentfast.nn.thinking_residual import ThinkingResidual, ThinkingResidualLambda  # noqa: F401
from latentfast.nn.cka import CKALoss, linear_cka  # noqa: F401
from latentfast.nn.codi import CODILoss, CODIObjective  # noqa: F401
from latentfast.nn.kv_loss import AttentionWeightedKVLoss, KVProjection, cache_kv  # noqa: F401
from latentfast.nn.layer_pairs import layer_pairs  # noqa: F401
from latentfast.nn.grpo_loss import FusedLinearGRPOLoss  # noqa: F401
from latentfast.nn.cross_entropy import FusedLinearCrossEntropyLoss  # noqa: F401
from latentfast.nn.preference import FusedLinearDPOLoss, FusedLinearORPOLoss, FusedLinearSimPOLoss  # noqa: F401
from latentfast.nn.distill import FusedLinearJSDLoss  # noqa: F401

from latentfast.hf.capture import QKCapture  # noqa: F401  (one capture mechanism, re-exported)
