"""``patch_causal_lm(model)``: a Hugging Face causal LM computes its ``labels`` loss through the
fused lm_head engine, never building the (B, T, V) logits (the spirit of Liger's
``apply_liger_kernel_to_qwen2(fused_linear_cross_entropy=True)``, for one model instance).

    model = patch_causal_lm(AutoModelForCausalLM.from_config(cfg))
    out = model(input_ids, attention_mask=mask, labels=labels)   # out.logits is None
    out.loss.backward()

Generic over models with a decoder at ``model.model`` (or ``get_decoder()``) and an
``lm_head`` (or ``get_output_embeddings()``): Qwen2, Llama, MiniMind, ... The loss is HF's
``ForCausalLMLoss``: labels shifted left (or ``shift_labels`` as given), ``ignore_index``
-100, a token mean -- or the sum over ``num_items_in_batch`` when the Trainer passes it.
Without labels the original forward runs (logits as usual). A MoE decoder's ``aux_loss``
is passed through on the output, not added (as the decoder returns it).
"""
from __future__ import annotations

import inspect

from torch import nn

from latentfast.ops.cross_entropy import fused_linear_cross_entropy

_LOSS_KWARGS = ("num_items_in_batch", "ignore_index", "shift_labels")
_HEAD_ONLY = ("labels", "logits_to_keep", "return_dict")


def _parts(model: nn.Module):
    decoder = getattr(model, "model", None)
    if decoder is None and hasattr(model, "get_decoder"):
        decoder = model.get_decoder()
    head = getattr(model, "lm_head", None)
    if head is None and hasattr(model, "get_output_embeddings"):
        head = model.get_output_embeddings()
    if not isinstance(decoder, nn.Module) or not isinstance(head, nn.Linear):
        raise TypeError(f"patch_causal_lm needs a causal LM with a decoder at .model and an nn.Linear .lm_head; "
                        f"{type(model).__name__} has model={type(decoder).__name__}, lm_head={type(head).__name__}")
    return decoder, head


def patch_causal_lm(model: nn.Module, *, chunk_size: int | None = None) -> nn.Module:
    """Patch ``model.forward`` in place (idempotent) and return the model.
    ``chunk_size``: rows per chunk of the fused loss (None = the per-device default).
    ``unpatch_causal_lm(model)`` restores the original forward."""
    if getattr(model, "_latentfast_original_forward", None) is not None:
        return model
    _parts(model)  # fail now, not at the first step
    original = model.forward
    signature = inspect.signature(original)

    def forward(*args, **kwargs):
        bound = signature.bind_partial(*args, **kwargs)
        call = dict(bound.arguments)
        extra = call.pop("kwargs", {}) if "kwargs" in signature.parameters else {}
        call.update(extra)
        labels = call.get("labels")
        if labels is None and call.get("shift_labels") is None:
            return original(*args, **kwargs)
        loss_kw = {k: call.pop(k) for k in _LOSS_KWARGS if k in call}
        for k in _HEAD_ONLY:
            call.pop(k, None)
        decoder, head = _parts(model)
        outputs = decoder(**call)
        hidden = outputs.last_hidden_state if hasattr(outputs, "last_hidden_state") else outputs[0]
        ignore = loss_kw.get("ignore_index", -100)
        shift = loss_kw.get("shift_labels")
        if shift is None:
            shift = nn.functional.pad(labels, (0, 1), value=ignore)[..., 1:]
        shift = shift.to(hidden.device)
        n_items = loss_kw.get("num_items_in_batch")
        loss = fused_linear_cross_entropy(
            hidden, head.weight, shift.reshape(hidden.shape[:-1]), head.bias, ignore_index=ignore,
            num_items_in_batch=n_items, chunk_size=chunk_size)
        from transformers.modeling_outputs import CausalLMOutputWithPast

        out = CausalLMOutputWithPast(
            loss=loss, logits=None, hidden_states=getattr(outputs, "hidden_states", None),
            attentions=getattr(outputs, "attentions", None))
        for name in ("cache", "past_key_values", "aux_loss"):
            if getattr(outputs, name, None) is not None:
                out[name] = getattr(outputs, name)
        return out

    model._latentfast_original_forward = original
    model.forward = forward
    return model


def unpatch_causal_lm(model: nn.Module) -> nn.Module:
    original = getattr(model, "_latentfast_original_forward", None)
    if original is not None:
        model.forward = original
        model._latentfast_original_forward = None
    return model


def is_patched(model: nn.Module) -> bool:
    return getattr(model, "_latentfast_original_forward", None) is not None


__all__ = ["patch_causal_lm", "unpatch_causal_lm", "is_patched"]
