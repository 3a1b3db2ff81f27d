"""The MiniMind model family (jingyaogong/minimind, Apache-2.0) as Hugging Face classes.

``MiniMindConfig`` / ``MiniMindForCausalLM`` are registered with ``AutoConfig`` /
``AutoModel`` / ``AutoModelForCausalLM`` under ``model_type="minimind"`` on import.
"""
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration import MiniMindConfig, minimind_intermediate_size, model_config
from .modeling import MiniMindForCausalLM, MiniMindModel
from .pth import checkpoint_name, load_pth, save_pth
from .tokenizer import TOKENIZERS, load_tokenizer

AutoConfig.register("minimind", MiniMindConfig, exist_ok=True)
AutoModel.register(MiniMindConfig, MiniMindModel, exist_ok=True)
AutoModelForCausalLM.register(MiniMindConfig, MiniMindForCausalLM, exist_ok=True)

__all__ = ["MiniMindConfig", "MiniMindForCausalLM", "MiniMindModel", "minimind_intermediate_size", "load_pth",
           "save_pth", "checkpoint_name", "load_tokenizer", "TOKENIZERS", "model_config"]
