"""Loader of the optional native CPU backend (``kernels/csrc/``, built by ``CMakeLists.txt``).

The library registers ``torch.ops.latentfast_native.*``. It is looked up once, on first
use: the path in ``LATENTFAST_NATIVE_LIB`` if set (a failure to load it raises, since the
user asked for it), else ``latentfast/_native/liblatentfast_native.so`` where the CMake
build writes it (absent or unloadable: silently unavailable, the torch path runs).
``LATENTFAST_NATIVE=0`` keeps the library unused without unloading it (benchmarks).
"""
from __future__ import annotations

import os
import pathlib
import sys

import torch

ENV_LIB = "LATENTFAST_NATIVE_LIB"
ENV_SWITCH = "LATENTFAST_NATIVE"
_SUFFIX = {"darwin": ".dylib", "win32": ".dll"}.get(sys.platform, ".so")
_PREFIX = "" if sys.platform == "win32" else "lib"
DEFAULT_PATH = pathlib.Path(__file__).resolve().parent.parent / "_native" / f"{_PREFIX}latentfast_native{_SUFFIX}"

_loaded: str | None = None  # path of the loaded library
_tried = False


def load(path: str | os.PathLike) -> None:
    """Load the library at ``path`` (idempotent). Raises RuntimeError naming the path."""
    global _loaded, _tried
    path = str(pathlib.Path(path).resolve())
    if _loaded is not None:
        if _loaded != path:
            raise RuntimeError(f"latentfast native library already loaded from {_loaded}; cannot also load {path}")
        return
    if not os.path.isfile(path):
        raise RuntimeError(f"latentfast native library not found: {path}")
    try:
        torch.ops.load_library(path)
    except Exception as exc:
        raise RuntimeError(f"could not load the latentfast native library {path}: {exc}") from exc
    if not hasattr(torch.ops.latentfast_native, "logit_stats"):
        raise RuntimeError(f"{path} loaded but registers no latentfast_native::logit_stats")
    _loaded, _tried = path, True


def loaded_path() -> str | None:
    return _loaded


def looked_up() -> bool:
    """True once the library was loaded or looked for (``available()`` then does no file I/O)."""
    return _tried or _loaded is not None


def available() -> bool:
    """True once the library is loaded; tries the env path / default location on first call."""
    global _tried
    if _loaded is not None or _tried:
        return _loaded is not None
    _tried = True
    user = os.environ.get(ENV_LIB)
    if user:
        load(user)  # asked for explicitly: errors surface
        return True
    if DEFAULT_PATH.is_file():
        try:
            load(DEFAULT_PATH)
        except RuntimeError:  # e.g. built against another torch: fall back to the torch path
            return False
    return _loaded is not None


def enabled() -> bool:
    """Use the native kernels: library available and not switched off by LATENTFAST_NATIVE=0."""
    return os.environ.get(ENV_SWITCH, "1") != "0" and available()


def usable(t: torch.Tensor, op: str) -> bool:
    """Run ``torch.ops.latentfast_native.<op>`` for tensors like ``t``: CPU, not float64
    (the kernels accumulate in fp32), enabled, and this build has ``op`` (an older build
    may lack it). Inside torch.compile only a library already looked up counts (no file
    I/O in a traced graph)."""
    if t.device.type != "cpu" or t.dtype == torch.float64:
        return False
    if torch.compiler.is_compiling() and not looked_up():
        return False
    return enabled() and hasattr(torch.ops.latentfast_native, op)
