"""MiniMind ``.pth`` checkpoints: plain state dicts under MiniMind's key names.

MiniMind's trainers save ``{save_dir}/{save_weight}_{hidden_size}{'_moe' if use_moe}.pth``
as fp16 tensors (both ``model.embed_tokens.weight`` and the tied ``lm_head.weight``);
``checkpoint_name`` / ``save_pth`` / ``load_pth`` read and write exactly that. Ours are
written atomically with a ``.pth.blake2b`` sidecar (``latentfast.files``) and checked finite
after the fp16 cast; ``load_pth`` verifies the sidecar when there is one (MiniMind's own
files have none) and names the file when it is corrupt.
"""
from __future__ import annotations

import os
import pathlib

import torch

from latentfast import files

_GATES = {"none": "no attention output gate", "headwise": "headwise_attn_output_gate=1",
          "elementwise": "elementwise_attn_output_gate=1"}


def checkpoint_name(save_weight: str, hidden_size: int, use_moe: bool, save_dir: str | os.PathLike | None = None):
    """MiniMind's weight file name, e.g. ``pretrain_640_moe.pth`` (joined to ``save_dir`` if given)."""
    name = f"{save_weight}_{hidden_size}{'_moe' if use_moe else ''}.pth"
    return pathlib.Path(save_dir) / name if save_dir is not None else pathlib.Path(name)


def _unwrap(model):
    model = getattr(model, "module", model)  # DDP
    return getattr(model, "_orig_mod", model)  # torch.compile


def _gate_of(q_rows: int, config) -> str | None:
    heads, d = config.num_attention_heads, config.head_dim
    return {heads * d: "none", heads * d + heads: "headwise", 2 * heads * d: "elementwise"}.get(q_rows)


def check_gate_layout(state_dict: dict, config, source: str = "checkpoint") -> None:
    """Raise a ValueError naming the gate flag when the checkpoint's q_proj was made
    with a different attention output gate than ``config``."""
    key = next((k for k in state_dict if k.endswith("self_attn.q_proj.weight")), None)
    if key is None:
        return
    rows, cols = state_dict[key].shape[:2]
    want = config.attn_gate or "none"
    have = _gate_of(rows, config)
    if have is not None and have != want:
        raise ValueError(f"{source} was made with {_GATES[have]} ({key} is {rows}x{cols}) but the model is built "
                         f"with {_GATES[want]}: set --headwise_attn_output_gate / --elementwise_attn_output_gate "
                         f"(MiniMindConfig headwise_attn_output_gate / elementwise_attn_output_gate) to match")


def save_pth(model, path: str | os.PathLike, dtype: torch.dtype | None = torch.float16) -> pathlib.Path:
    """Write the state dict (MiniMind key names, ``dtype``; None keeps each tensor's own)
    atomically with its sidecar. DDP/compile wrappers are unwrapped. A tensor that is not
    finite after the cast (fp16 overflows past 65504) is an error naming it; nothing is written."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: (v.detach().to(dtype) if dtype is not None and v.is_floating_point() else v.detach()).cpu()
             for k, v in _unwrap(model).state_dict().items()}
    files.assert_finite(state.items(), str(path))
    return files.save_with_sidecar(path, lambda tmp: torch.save(state, tmp))


def load_pth(model, path: str | os.PathLike, strict: bool = True):
    """Load a MiniMind ``.pth`` state dict into ``model`` (a ``MiniMindForCausalLM``), cast
    to the model's dtype; a ``module.`` prefix (DDP) is stripped. Returns torch's
    ``(missing_keys, unexpected_keys)``. A gate-layout mismatch raises naming the flag."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"MiniMind weights not found: {path}")
    state = read_pth(path)
    target = _unwrap(model)
    check_gate_layout(state, target.config, source=str(path))
    return target.load_state_dict(state, strict=strict)


def read_pth(path) -> dict:
    """The verified, finite state dict of a ``.pth`` (``module.`` prefixes stripped); a
    corrupt or non-finite file is a ``CorruptFileError`` naming it."""
    path = pathlib.Path(path)
    files.verify_sidecar(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, not a torch file, ...
        raise files.CorruptFileError(f"{path}: not a readable .pth state dict ({type(e).__name__}: "
                                     f"{str(e).splitlines()[0] if str(e) else ''}); truncated or corrupt?") from None
    if not isinstance(state, dict):
        raise files.CorruptFileError(f"{path}: holds a {type(state).__name__}, not a state dict")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    files.assert_finite(state.items(), str(path), error=files.CorruptFileError, action="load")
    return state
