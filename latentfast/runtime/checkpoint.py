"""Resumable checkpoints in safetensors.

``checkpoint-<step>/``: ``model.safetensors`` (trainable parameters, or the full model
when ``full``), ``optimizer.safetensors`` (optimizer state flattened to tensors),
``trainer_state.json`` (step, param-group hyper-parameters, scheduler, extra state), the
loop's ``rng_state_<rank>.json`` and, written last, ``manifest.json`` (size + blake2b of each
file, ``latentfast.files``). Every file is written under a temporary name and renamed, so a
folder is a checkpoint exactly when its manifest is there and matches: ``latest`` skips the
others (one warning naming them) and ``load`` verifies first, failing with the file's name.
Works for plain, DDP and FSDP2 models through torch.distributed.checkpoint's
full-state-dict helpers; rank 0 writes.
"""
from __future__ import annotations

import json
import pathlib
import shutil
import warnings

import torch
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from latentfast import files

from .dist import is_main
from .guard import assert_finite_weights

_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def _fqn(n: str) -> str:
    return n.replace("module.", "", 1) if n.startswith("module.") else n  # DDP prefix


def _trainable_names(model) -> set:
    return {_fqn(n) for n, p in model.named_parameters() if p.requires_grad}


def _drop_tied(model, msd: dict) -> dict:
    """One entry per shared tensor (tied embeddings appear under two names in a full state
    dict; safetensors refuses aliases), keeping the name ``named_parameters`` reports."""
    named = {_fqn(n) for n, _ in model.named_parameters()}
    out, seen = {}, set()
    for k in sorted(msd, key=lambda k: k not in named):
        v = msd[k]
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape)) if torch.is_tensor(v) else id(v)
        if key not in seen:
            seen.add(key)
            out[k] = v
    return out


def step_of(path) -> int | None:
    tail = pathlib.Path(path).name.rsplit("-", 1)[-1]
    return int(tail) if pathlib.Path(path).name.startswith("checkpoint-") and tail.isdigit() else None


def save(out_dir: str, step: int, model, optimizer, scheduler=None, extra: dict | None = None,
         full: bool = False, seal_now: bool = True) -> str | None:
    """Write ``checkpoint-<step>`` (rank 0); ``seal_now=False`` leaves the manifest to a later
    ``seal`` (the loop adds every rank's RNG state first)."""
    path = pathlib.Path(out_dir) / f"checkpoint-{step}"
    msd = get_model_state_dict(model, options=_FULL)
    if not full:
        keep = _trainable_names(model)
        msd = {k: v for k, v in msd.items() if k in keep}
    else:
        msd = _drop_tied(model, msd)
    assert_finite_weights(msd.items(), f"checkpoint {path}")  # every rank: none returns early
    osd = get_optimizer_state_dict(model, optimizer, options=_FULL)
    if not is_main():
        return None
    path.mkdir(parents=True, exist_ok=True)
    (path / files.MANIFEST).unlink(missing_ok=True)  # rewriting a folder: incomplete until sealed again
    files.clean_stale_tmp(path)
    # save_file writes a temporary in the same folder and renames it (atomic)
    save_file({k: v.contiguous() for k, v in msd.items()}, str(path / "model.safetensors"))
    flat = {}
    for name, st in osd["state"].items():
        for key, v in st.items():
            flat[f"{name}::{key}"] = (v if torch.is_tensor(v) else torch.tensor(v)).contiguous()
    save_file(flat, str(path / "optimizer.safetensors"))
    groups = [{k: v for k, v in g.items()} for g in osd["param_groups"]]
    state = {"step": step, "format": FORMAT, "param_groups": groups,
             "scheduler": scheduler.state_dict() if scheduler is not None else None, "extra": extra or {},
             # every parameter at save time: a frozen one (not saved) may be unfrozen on resume
             "param_names": sorted(_fqn(n) for n, _ in model.named_parameters())}
    files.write_json(path / "trainer_state.json", state, indent=1, default=str)
    if seal_now:
        seal(path)
    return str(path)


def seal(path) -> None:
    """Rank 0, last: the manifest of every file in the folder (the checkpoint is complete)."""
    path = pathlib.Path(path)
    names = [p.name for p in path.iterdir() if p.is_file() and not p.name.startswith(".") and p.name != files.MANIFEST]
    files.write_manifest(path, names, {"step": step_of(path)})


FORMAT = 2  # trainer_state.json "format": 2 = written with a manifest (absent: an older latentfast)


def verify(path) -> dict:
    """The manifest of a complete, unmodified checkpoint folder, else ``CorruptFileError``
    naming the file. A folder from before manifests (trainer_state.json without "format")
    gets a structural check instead, with a warning."""
    path = pathlib.Path(path)
    if not (path / files.MANIFEST).exists() and (path / "trainer_state.json").is_file():
        return _verify_legacy(path)
    man = files.verify_manifest(path)
    for need in ("model.safetensors", "trainer_state.json"):
        if need not in man["files"]:
            raise files.CorruptFileError(f"{pathlib.Path(path) / need}: missing from {files.MANIFEST}")
    return man


def load(path: str, model, optimizer=None, scheduler=None, hint: str = "--projection, LoRA rank or thinking state",
         verified: bool = False) -> dict:
    """Restore in place (after ``verify`` unless ``verified``); returns the trainer_state dict
    (``step``, ``extra``)."""
    path = pathlib.Path(path)
    if not verified:
        verify(path)
    state = json.loads((path / "trainer_state.json").read_text())
    msd = load_file(str(path / "model.safetensors"))
    # non-strict: a trainable-only checkpoint has no frozen weights. But a checkpoint from a
    # different model layout (--projection, LoRA on/off, thinking state) must not load silently.
    missing = _trainable_names(model) - msd.keys()
    known = state.get("param_names")  # frozen at save time, trainable now: keeps its (seeded) init
    missing = sorted(missing - set(known)) if known is not None else []
    res = set_model_state_dict(model, msd, options=StateDictOptions(full_state_dict=True, strict=False))
    unexpected = sorted(_fqn(k) for k in getattr(res, "unexpected_keys", ()))
    if missing or unexpected:
        def few(keys):
            return ", ".join(keys[:5]) + (f" ... ({len(keys)} in all)" if len(keys) > 5 else "")
        raise RuntimeError(f"checkpoint {path} does not match the model (different {hint}?): " + "; ".join(
                               f"{what}: {few(keys)}" for what, keys in (("missing trainable parameters", missing),
                                                                       ("unexpected keys", unexpected)) if keys))
    if optimizer is not None:
        flat = load_file(str(path / "optimizer.safetensors"))
        st: dict = {}
        for k, v in flat.items():
            name, key = k.rsplit("::", 1)
            st.setdefault(name, {})[key] = v
        set_optimizer_state_dict(model, optimizer, {"state": st, "param_groups": state["param_groups"]},
                                 options=StateDictOptions(full_state_dict=True))
    if scheduler is not None and state.get("scheduler"):
        scheduler.load_state_dict(state["scheduler"])
    return state


def _verify_legacy(path: pathlib.Path) -> dict:
    state_file = path / "trainer_state.json"
    try:
        state = json.loads(state_file.read_text())
    except (OSError, ValueError) as e:
        raise files.CorruptFileError(f"{state_file}: unreadable ({type(e).__name__}: {e}); an interrupted "
                                     f"save?") from None
    if not isinstance(state, dict) or "step" not in state:
        raise files.CorruptFileError(f"{state_file}: not a trainer state (no 'step')")
    if state.get("format", 0) >= FORMAT:
        raise files.CorruptFileError(f"{path}: no {files.MANIFEST} (an interrupted save)")
    for name in ("model.safetensors", "optimizer.safetensors"):
        if (path / name).exists() or name == "model.safetensors":
            _check_safetensors(path / name)
    for rng in path.glob("rng_state_*.json"):
        try:
            json.loads(rng.read_text())
        except ValueError as e:
            raise files.CorruptFileError(f"{rng}: unreadable ({e})") from None
    warnings.warn(f"{path} has no {files.MANIFEST} (written by an older latentfast): its files were checked for "
                  f"structure only, not contents", RuntimeWarning, stacklevel=3)
    return {"files": {}, "step": state["step"], "legacy": True}


def _check_safetensors(f: pathlib.Path) -> None:
    """The header parses and the file is exactly as long as the header says."""
    try:
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        ok = f.stat().st_size == 8 + n + end
    except (OSError, ValueError, KeyError, TypeError, MemoryError):
        ok = False
    if not ok:
        raise files.CorruptFileError(f"{f}: not a complete safetensors file (truncated or corrupt)")


def checkpoints(out_dir) -> list[pathlib.Path]:
    """``checkpoint-<step>`` folders of ``out_dir``, oldest first (complete or not)."""
    found = [p for p in pathlib.Path(out_dir).glob("checkpoint-*") if p.is_dir() and step_of(p) is not None]
    return sorted(found, key=step_of)


def latest(out_dir: str, warn: bool = True) -> str | None:
    """The newest complete, verified checkpoint of ``out_dir``; newer folders that are
    incomplete or corrupt are skipped with one warning naming each and why."""
    skipped = []
    for p in reversed(checkpoints(out_dir)):
        try:
            verify(p)
        except files.CorruptFileError as e:
            skipped.append(str(e))
            continue
        if skipped and warn:
            warnings.warn(f"resuming from {p}, the newest intact checkpoint; skipped: " + "; ".join(skipped),
                          RuntimeWarning, stacklevel=2)
        return str(p)
    if skipped and warn:
        warnings.warn(f"no intact checkpoint in {out_dir}; skipped: " + "; ".join(skipped), RuntimeWarning,
                      stacklevel=2)
    return None


def prune(out_dir, keep: int, protect=()) -> list[str]:
    """``--save_total_limit``: delete all but the newest ``keep`` intact checkpoints (and any
    incomplete folder older than the oldest kept); never one named in ``protect``."""
    ckpts = checkpoints(out_dir)
    intact = []
    for p in ckpts:
        try:
            files.read_manifest(p)
            intact.append(p)
        except files.CorruptFileError:
            pass
    if len(intact) <= keep:
        return []
    oldest_kept = step_of(intact[-keep])
    protect = {pathlib.Path(p).resolve() for p in protect}
    gone = []
    for p in ckpts:
        if step_of(p) < oldest_kept and p.resolve() not in protect:
            (p / files.MANIFEST).unlink(missing_ok=True)  # no longer a checkpoint even if the rmtree is cut short
            shutil.rmtree(p, ignore_errors=True)
            gone.append(str(p))
    return gone


__all__ = ["checkpoints", "latest", "load", "prune", "save", "seal", "step_of", "verify"]
