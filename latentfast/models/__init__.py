from latentfast.hf.capture import AttentionCapture, KVCapture, QKCapture

from .hybrid import HRPO_MODULES, HybridConfig, HybridThinkingLM, ThinkingModules
from .tiny import build_tiny_causal_lm, tiny_config
from .codi import CODIModel
from .minimind import MiniMindConfig, MiniMindForCausalLM
