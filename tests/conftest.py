"""Test set-up: on a machine without CUDA, run the Triton kernels under Triton's
interpreter so CI exercises the real kernel code. Must happen before triton is
imported, hence at conftest import time."""
import os

import pytest

try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _HAS_CUDA = False

if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _decorate_kernels_now():
    """Import every Triton kernel module under this session's TRITON_INTERPRET. ``triton.jit``
    reads the variable when it decorates: a test that sets it to "0" for a while (to take a
    CPU backend) must not be the first importer, or the kernels would be compiled-mode
    functions that later tests' interpreter launches cannot call ("Cannot call @triton.jit'd
    outside of the scope of a kernel", seen with test_grpo_family then test_rl_trainer)."""
    import importlib
    import pkgutil

    try:
        import latentfast.kernels as kernels
    except ImportError:  # pragma: no cover
        return
    for mod in pkgutil.iter_modules(kernels.__path__):
        try:
            importlib.import_module(f"latentfast.kernels.{mod.name}")
        except ImportError:  # no triton: the kernels are never called
            pass


_decorate_kernels_now()


@pytest.fixture
def kernel_device():
    """Where this session runs the Triton kernels: CUDA, else the CPU under the
    interpreter. Tests of kernel-only behaviour use it; a GPU machine (no interpreter,
    CPU tensors take the reference) runs them on CUDA instead."""
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "cpu"
    pytest.skip("needs CUDA or TRITON_INTERPRET=1 (the kernel path)")


@pytest.fixture(autouse=True)
def _seed():
    import torch

    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    if _HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)



@pytest.fixture
def one_thread():
    """One intra-op thread for the test (tiny shapes: a second thread only adds contention,
    up to 18x slower on a busy 2-core box). Files use it with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def two_ranks():
    """Runs ``worker(rank, world_size, port, *args)`` on 2 local processes (a gloo job's
    rendezvous on a free port). Forked: the workers inherit the imported modules, where
    spawn re-imports torch + transformers (~10-15 s a process on a 2-core box); the workers
    set one intra-op thread, so no OpenMP pool is used across the fork."""
    import socket

    import torch.multiprocessing as mp

    def run(worker, *args):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.start_processes(worker, args=(2, port, *args), nprocs=2, join=True, start_method="fork")

    return run
