"""Files that are whole or absent: atomic writes, manifests, sidecars, finite exports.

* ``atomic_write(path, write)``: ``write(tmp)`` to a temporary name in the same folder, then
  ``os.replace`` (a kill or a full disk leaves the old file or none, never a half one; the
  temporary is removed on an error).
* ``write_manifest(folder, names)``: ``manifest.json`` — size and blake2b of each file — written
  last, so a folder is complete exactly when its manifest is there and matches
  (``verify_manifest``, which raises ``CorruptFileError`` naming the file).
* ``write_sidecar`` / ``verify_sidecar``: the same for a single file (``x.pth`` ->
  ``x.pth.blake2b``); the sidecar may list the previous hash too, so a kill between the two
  renames leaves a pair that still verifies.
* ``atomic_folder(path)`` / ``save_pretrained(path, *objs)``: a folder written whole under a
  temporary sibling name, then swapped in (a model export killed half-way leaves the previous
  export, never a folder a loader would half-read).
* ``clean_stale_tmp(folder)``: temporaries left by killed writes (ours and safetensors').
* ``assert_finite(named_tensors, where)``: refuse to write a non-finite weight (after the cast).

Used by ``runtime/checkpoint.py`` and the MiniMind ``.pth`` exports; nothing here imports train/.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pathlib
import re
import shutil

import torch

MANIFEST = "manifest.json"
SIDECAR_SUFFIX = ".blake2b"
TMP_TAG = ".tmp-"  # our temporaries: .<name>.tmp-<pid>
_STALE = re.compile(r"^(\..+\.tmp-\d+|\.tmp[A-Za-z0-9]{6}|.+\.pth\.tmp)$")  # ours, safetensors', pth's old name
_STALE_DIR = re.compile(r"^\..+\.(tmp|old)-\d+$")  # atomic_folder's


class CorruptFileError(RuntimeError):
    """A file does not match its manifest / sidecar (truncated, modified, half-written)."""


class NonFiniteWeightError(ValueError):
    """A weight to be written holds NaN / Inf (after its cast to the save dtype)."""


def tmp_name(path: pathlib.Path) -> pathlib.Path:
    return path.with_name(f".{path.name}{TMP_TAG}{os.getpid()}")


def atomic_write(path, write) -> pathlib.Path:
    """``write(tmp_path)`` then rename over ``path``; on any error the temporary is removed."""
    path = pathlib.Path(path)
    tmp = tmp_name(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


@contextlib.contextmanager
def atomic_folder(path):
    """Yield a temporary sibling folder to fill; on success it replaces ``path`` (the previous
    folder is moved aside first and deleted last), on any error it is deleted."""
    path = pathlib.Path(path)
    tmp = tmp_name(path)
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def save_pretrained(path, *objs) -> pathlib.Path:
    """``obj.save_pretrained`` of each (model, tokenizer, ...) into ``path``, atomically."""
    with atomic_folder(path) as tmp:
        for obj in objs:
            obj.save_pretrained(str(tmp))
    return pathlib.Path(path)


def write_text(path, text: str) -> pathlib.Path:
    def w(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    return atomic_write(path, w)


def write_json(path, obj, **kw) -> pathlib.Path:
    return write_text(path, json.dumps(obj, **kw))


def file_hash(path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def describe(path) -> dict:
    path = pathlib.Path(path)
    return {"size": path.stat().st_size, "blake2b": file_hash(path)}


# ---------------------------------------------------------------------------- folders
def write_manifest(folder, names, extra: dict | None = None) -> pathlib.Path:
    folder = pathlib.Path(folder)
    files = {n: describe(folder / n) for n in sorted(names)}
    return write_json(folder / MANIFEST, {"files": files, **(extra or {})}, indent=1)


def read_manifest(folder) -> dict:
    folder = pathlib.Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise CorruptFileError(f"{folder}: no {MANIFEST} (an interrupted save, or not a checkpoint folder)")
    try:
        man = json.loads(path.read_text())
        files = man["files"]
    except (ValueError, KeyError, TypeError) as e:
        raise CorruptFileError(f"{path}: unreadable manifest ({type(e).__name__}: {e})") from None
    return man | {"files": files}


def verify_manifest(folder, hashes: bool = True) -> dict:
    """The manifest after checking every file it lists (size, and blake2b when ``hashes``)."""
    folder = pathlib.Path(folder)
    man = read_manifest(folder)
    for name, rec in man["files"].items():
        _check(folder / name, [rec["blake2b"]], rec["size"], f"its {MANIFEST}", hashes)
    return man


def _check(path: pathlib.Path, hashes: list, size, source: str, check_hash: bool = True) -> None:
    if not path.is_file():
        raise CorruptFileError(f"{path}: missing (listed in {source})")
    have = path.stat().st_size
    if size is not None and have != size:
        raise CorruptFileError(f"{path}: {have} bytes, {source} says {size} (truncated or modified after saving)")
    if check_hash and file_hash(path) not in hashes:
        raise CorruptFileError(f"{path}: contents differ from {source} (blake2b mismatch: corrupted or modified "
                               f"after saving)")


# ---------------------------------------------------------------------------- single files
def sidecar(path) -> pathlib.Path:
    path = pathlib.Path(path)
    return path.with_name(path.name + SIDECAR_SUFFIX)


def save_with_sidecar(path, write) -> pathlib.Path:
    """Write ``path`` atomically with ``write(tmp)`` and its sidecar: first the sidecar with the
    new hash and the old one, then the file, then the sidecar with the new hash only."""
    path = pathlib.Path(path)
    tmp = tmp_name(path)
    try:
        write(tmp)
        new = describe(tmp)
        old = [file_hash(path)] if path.is_file() else []  # what is on disk (an earlier save may have been cut)
        write_json(sidecar(path), {"blake2b": [new["blake2b"], *old], "size": None})
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    write_json(sidecar(path), {"blake2b": [new["blake2b"]], "size": new["size"]})
    return path


def verify_sidecar(path) -> bool:
    """Check ``path`` against its sidecar; False when it has none (a file from elsewhere,
    e.g. MiniMind's own weights), a ``CorruptFileError`` naming the file on a mismatch."""
    path = pathlib.Path(path)
    side = sidecar(path)
    if not side.is_file():
        return False
    try:
        rec = json.loads(side.read_text())
        hashes, size = list(rec["blake2b"]), rec.get("size")
    except (ValueError, KeyError, TypeError) as e:
        raise CorruptFileError(f"{side}: unreadable ({type(e).__name__}: {e})") from None
    _check(path, hashes, size, side.name)
    return True


# ---------------------------------------------------------------------------- hygiene
def clean_stale_tmp(folder) -> list[str]:
    """Remove temporaries of killed writes in ``folder`` (not recursive); returns their names.
    Only call it while holding the folder's run lock (a live writer's temporary looks the same)."""
    folder = pathlib.Path(folder)
    gone = []
    if folder.is_dir():
        for p in folder.iterdir():
            if p.is_file() and _STALE.match(p.name):
                p.unlink(missing_ok=True)
                gone.append(p.name)
            elif p.is_dir() and _STALE_DIR.match(p.name):
                shutil.rmtree(p, ignore_errors=True)
                gone.append(p.name)
    return gone


def nonfinite(named_tensors) -> list[tuple[str, torch.dtype, int]]:
    """(name, dtype, count) of every floating tensor with a NaN / Inf."""
    out = []
    for k, v in named_tensors:
        if torch.is_tensor(v) and v.is_floating_point():
            bad = int((~torch.isfinite(v)).sum())
            if bad:
                out.append((k, v.dtype, bad))
    return out


def assert_finite(named_tensors, where: str, error=NonFiniteWeightError, action: str = "write") -> None:
    bad = nonfinite(named_tensors)
    if bad:
        few = ", ".join(f"{k} ({str(d).removeprefix('torch.')}: {n} non-finite)" for k, d, n in bad[:5])
        more = f" ... ({len(bad)} tensors in all)" if len(bad) > 5 else ""
        raise error(f"refusing to {action} {where}: {few}{more}. Values beyond the save dtype's range "
                    f"(fp16: |x| > 65504) overflow to inf: lower the learning rate or save in bf16/fp32")


__all__ = ["CorruptFileError", "MANIFEST", "NonFiniteWeightError", "assert_finite", "atomic_write", "clean_stale_tmp",
           "describe", "file_hash", "nonfinite", "read_manifest", "save_with_sidecar", "sidecar", "tmp_name",
           "verify_manifest", "verify_sidecar", "write_json", "write_manifest", "write_text"]
