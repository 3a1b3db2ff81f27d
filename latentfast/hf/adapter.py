"""The one adapter between latentfast and a Hugging Face causal LM (Llama / Qwen / Mistral style).

    hf = unwrap(lm)                        # the PreTrainedModel under PEFT (LoRA layers injected in place)
    lm = add_lora(lm, rank=32)             # PEFT LoRA on q/k/v/o/gate/up/down (+ modules_to_save)
    out = run_decoder(lm, embeds, mask)    # inputs_embeds forward, positions counted over the mask
    W, b = lm_head_weight(lm), lm_head_bias(lm)
    loss = keep_in_graph(loss, params)     # DDP: every trainable parameter gets a (zero) gradient

``HybridThinkingLM`` (HRPO), ``CODIModel`` and the KV distiller all reach the model
through these functions, so a new architecture or a transformers rename (``cache`` vs
``past_key_values``) is handled here once.
"""
from __future__ import annotations

import inspect
import warnings

import torch
from torch import nn

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def unwrap(lm: nn.Module) -> nn.Module:
    """The ``PreTrainedModel`` under a PEFT wrapper (the model itself otherwise)."""
    return lm.get_base_model() if hasattr(lm, "get_base_model") else lm


def decoder(lm: nn.Module) -> nn.Module:
    """The base transformer (embeddings + blocks + final norm, no lm_head)."""
    return unwrap(lm).base_model


def decoder_layers(lm: nn.Module):
    """The decoder blocks of a causal LM (PEFT-wrapped or not)."""
    base = getattr(unwrap(lm), "model", unwrap(lm))
    if not hasattr(base, "layers"):
        raise TypeError(f"{type(unwrap(lm)).__name__}: no .model.layers (expected a Llama/Qwen-style decoder)")
    return base.layers


def add_lora(lm: nn.Module, rank: int, alpha: int | None = None, dropout: float = 0.0, target_modules=None,
             modules_to_save=None) -> nn.Module:
    """``lm`` wrapped with PEFT LoRA (alpha default 2 * rank; the recipes' q/k/v/o/gate/up/down
    targets); ``modules_to_save`` are trained in full (HRPO's thinking modules)."""
    from peft import LoraConfig

    if rank <= 0:
        raise ValueError(f"LoRA rank must be > 0, got {rank}")
    cfg = LoraConfig(r=rank, lora_alpha=alpha or 2 * rank, lora_dropout=dropout,
                     target_modules=list(target_modules or LORA_TARGETS),
                     modules_to_save=list(modules_to_save) if modules_to_save else None, task_type="CAUSAL_LM")
    return wrap_peft(lm, cfg)


def wrap_peft(lm: nn.Module, peft_config) -> nn.Module:
    """``peft.get_peft_model``; PEFT reads transformers' deprecated ``is_gradient_checkpointing``
    (a FutureWarning from their code, not ours to rename), so that one warning is silenced here."""
    from peft import get_peft_model

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        return get_peft_model(lm, peft_config)


def enable_activation_checkpointing(hf: nn.Module, **kwargs) -> None:
    """Hugging Face's activation checkpointing under its current name (transformers >= 5.2x
    deprecates ``gradient_checkpointing_enable``)."""
    if hasattr(hf, "activation_checkpointing_enable"):
        hf.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def cache_kwarg(transformer: nn.Module) -> str:
    """The decoder's KV-cache keyword: transformers >= 5.2x renamed ``past_key_values`` to ``cache``."""
    return "cache" if "cache" in inspect.signature(type(transformer).forward).parameters else "past_key_values"


def output_cache(out):
    """The KV cache a forward with ``use_cache=True`` returned (``cache`` in transformers
    >= 5.2x, ``past_key_values`` before)."""
    return getattr(out, "cache", None) or out.past_key_values


def new_cache(config):
    from transformers import DynamicCache

    return DynamicCache(config=config)


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Position ids counted over real tokens only (left padding / holes do not advance them)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def run_decoder(lm: nn.Module, embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids=None, cache=None,
                output_hidden_states: bool = False, transformer: nn.Module | None = None):
    """One decoder call on ``inputs_embeds`` (HF output: ``last_hidden_state`` after the final
    norm, ``hidden_states`` = embeddings + every block when asked). Positions default to
    ``positions_from_mask``; with a ``cache`` the call appends to it."""
    tf = transformer if transformer is not None else decoder(lm)
    if position_ids is None:
        position_ids = positions_from_mask(attention_mask)
    kw = {cache_kwarg(tf): cache} if cache is not None else {}
    emb = tf.get_input_embeddings().weight
    if not torch.is_autocast_enabled() and embeds.dtype != emb.dtype:
        embeds = embeds.to(emb.dtype)
    return tf(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
              use_cache=cache is not None, output_hidden_states=output_hidden_states, **kw)


def lm_head_weight(lm: nn.Module) -> torch.Tensor:
    return unwrap(lm).get_output_embeddings().weight


def lm_head_bias(lm: nn.Module):
    return getattr(unwrap(lm).get_output_embeddings(), "bias", None)


def keep_in_graph(loss: torch.Tensor, params) -> torch.Tensor:
    """``loss + 0 * sum(params)``: parameters a batch did not use still get a (zero) gradient,
    which DDP's all-reduce expects of every trainable parameter."""
    params = [p for p in params if p.requires_grad]
    if not params:
        return loss
    return loss + 0.0 * sum(p.sum() for p in params).to(loss.dtype)


__all__ = ["LORA_TARGETS", "add_lora", "cache_kwarg", "decoder", "decoder_layers", "keep_in_graph", "lm_head_bias",
           "lm_head_weight", "new_cache", "output_cache", "positions_from_mask", "run_decoder", "unwrap"]
