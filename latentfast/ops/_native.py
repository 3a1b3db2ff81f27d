"""Loader of the native CPU backend (``latentfast/kernels/csrc/``), built once on first use.

The library registers ``torch.ops.latentfast_native.*``. It is looked up once, on first
use, in this order:

1. ``LATENTFAST_NATIVE_LIB``: a path the user gives (a failure to load it raises);
2. ``latentfast/_native/liblatentfast_native.so``, where a manual CMake build writes it;
3. the build cache: ``$LATENTFAST_CACHE`` (default ``~/.cache/latentfast``)
   ``/native/torch-<version>/``, compiled there on first use against the torch this process
   runs (``torch.utils.cpp_extension``: ninja, a source-and-flags hash that rebuilds when
   either changes, and a file lock so concurrent ranks build once and the others wait).

Why not at ``pip install``: pip's isolated build environment would need its own torch (a
second, multi-GB download) and would build against a torch the user may not run. When
the build cannot run (no C++ compiler, ``LATENTFAST_NATIVE_BUILD=0``) one log line says
so and the torch path runs. ``LATENTFAST_NATIVE=0`` keeps the library unused (benchmarks).
``python -m latentfast.ops._native`` builds (or finds) it and prints where.
"""
from __future__ import annotations

import logging
import os
import pathlib
import sys
import time

import torch

log = logging.getLogger("latentfast")

ENV_LIB = "LATENTFAST_NATIVE_LIB"
ENV_SWITCH = "LATENTFAST_NATIVE"
ENV_BUILD = "LATENTFAST_NATIVE_BUILD"
ENV_CACHE = "LATENTFAST_CACHE"
_SUFFIX = {"darwin": ".dylib", "win32": ".dll"}.get(sys.platform, ".so")
_PREFIX = "" if sys.platform == "win32" else "lib"
DEFAULT_PATH = pathlib.Path(__file__).resolve().parent.parent / "_native" / f"{_PREFIX}latentfast_native{_SUFFIX}"

_loaded: str | None = None  # path of the loaded library
_tried = False
_why_unavailable: str | None = None
# -ffp-contract=off keeps (L * inv_t) rounded before "- lse", as the torch path does; the
# others let the branch-free loops vectorise (see CMakeLists.txt, which uses the same flags)
CFLAGS = ["-O3", "-fno-trapping-math", "-fno-math-errno", "-ffp-contract=off", "-fopenmp"]


def sources() -> list[str]:
    """The C++ sources, shipped inside the package as ``latentfast/kernels/csrc``."""
    import latentfast.kernels as k  # the package's folder, found only when the backend is built

    return sorted(str(p) for p in (pathlib.Path(k.__file__).resolve().parent / "csrc").glob("*.cpp"))


def cache_dir() -> pathlib.Path:
    root = os.environ.get(ENV_CACHE) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "latentfast")
    tag = torch.__version__.replace("+", "_")
    # keyed by the installed package too: ninja records absolute source paths, so two checkouts or
    # venvs sharing one folder would rebuild in turn and make every other process wait on the lock
    import hashlib

    where = hashlib.sha1(str(pathlib.Path(__file__).resolve().parent.parent).encode()).hexdigest()[:8]
    return pathlib.Path(root) / "native" / f"torch-{tag}-py{sys.version_info[0]}{sys.version_info[1]}-{where}"


def _put_ninja_on_path() -> None:
    """cpp_extension runs ``ninja`` from PATH; the pip package's binary sits beside the venv's
    python, which is not on PATH when the venv is used without activating it."""
    import shutil

    if shutil.which("ninja") is None:
        try:
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        except ImportError:
            pass


STALE_LOCK_S = 600  # a build takes well under this; an older lock is a killed build's leftover


def _clear_stale_lock(out: pathlib.Path) -> None:
    """cpp_extension's lock is a file that a killed build leaves behind, and every later
    process would wait on it forever: remove one older than any real build."""
    lock = out / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return
    if age > STALE_LOCK_S:
        log.warning("latentfast: removing a stale native-build lock %s (%.0f s old, left by a killed build)", lock, age)
        lock.unlink(missing_ok=True)


def build(verbose: bool = False) -> str:
    """Compile the library into ``cache_dir()`` (a no-op when an up-to-date build is there)
    and load it; returns its path. Raises RuntimeError saying why it could not."""
    from torch.utils import cpp_extension

    srcs = sources()
    if not srcs:
        raise RuntimeError("the C++ sources (latentfast/kernels/csrc/*.cpp) are not installed")
    out = cache_dir()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    _put_ninja_on_path()
    _clear_stale_lock(out)
    try:
        cpp_extension.verify_ninja_availability()
        cpp_extension.load(name="latentfast_native", sources=srcs, extra_cflags=CFLAGS, extra_ldflags=["-fopenmp"],
                           build_directory=str(out), is_python_module=False, verbose=verbose)
    except Exception as exc:  # compiler missing, compile error, ninja missing: the torch path runs
        detail = str(exc).strip().splitlines()
        raise RuntimeError(detail[-1] if detail else type(exc).__name__) from exc
    libs = sorted(out.glob("latentfast_native*" + _SUFFIX), key=lambda p: p.stat().st_mtime)
    if not libs or not hasattr(torch.ops.latentfast_native, "logit_stats"):
        raise RuntimeError(f"the build in {out} registered no latentfast_native::logit_stats")
    global _loaded, _tried
    _loaded, _tried = str(libs[-1]), True
    if time.time() - t0 > 1.0:
        log.warning("latentfast: built the native CPU backend in %.0f s (once; cached in %s)", time.time() - t0, out)
    return _loaded


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
            return True
        except RuntimeError:  # e.g. built against another torch: try the build cache
            pass
    global _why_unavailable
    if os.environ.get(ENV_BUILD, "1") == "0":
        _why_unavailable = f"{ENV_BUILD}=0"
        return False
    try:
        build()
    except RuntimeError as exc:
        _why_unavailable = str(exc)
        log.warning("latentfast: native CPU backend unavailable (%s); the torch path runs instead "
                    "(same results, slower). Needs a C++ compiler; see `python -m latentfast.ops._native`.", exc)
    return _loaded is not None


def why_unavailable() -> str | None:
    """Why the last ``available()`` found no library (None when it did or was not asked)."""
    return _why_unavailable


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


if __name__ == "__main__":
    t = time.time()
    try:
        where = build(verbose="-v" in sys.argv)
    except RuntimeError as exc:
        sys.exit(f"latentfast native CPU backend: cannot build ({exc})")
    print(f"latentfast native CPU backend: {where} ({time.time() - t:.1f} s)")
