"""The README's commands from the repo root: ``python -m`` puts the working directory first on
``sys.path``, so nothing at the top of the repo may shadow a package our dependencies import
(a top-level ``kernels/`` once hid Hugging Face's ``kernels`` from transformers and TRL)."""
import json
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent


def _import_from_repo_root(code: str) -> subprocess.CompletedProcess:
    # "-c" puts the working directory ('') first on sys.path, as "python -m pytest" does
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_hf_kernels_package_is_not_shadowed_by_the_repo():
    pytest.importorskip("kernels", reason="Hugging Face's kernels package is in the dev extra")
    r = _import_from_repo_root(
        "import json, kernels, transformers.integrations.hub_kernels as h;"
        "print(json.dumps({'kernels': kernels.__file__, 'hub': h.__file__}))")
    assert r.returncode == 0, r.stderr[-2000:]
    files = json.loads(r.stdout.strip().splitlines()[-1])
    assert files["kernels"] is not None
    assert REPO not in pathlib.Path(files["kernels"]).resolve().parents, files


def test_no_top_level_package_named_like_a_dependency():
    """No folder at the repo root is importable under a dependency's name."""
    deps = {"kernels", "torch", "triton", "transformers", "peft", "safetensors", "tqdm", "numpy",
            "matplotlib", "yaml", "trl", "liger_kernel", "datasets", "accelerate", "huggingface_hub"}
    clashes = sorted(p.name for p in REPO.iterdir() if p.name in deps and (p.is_dir() or p.suffix == ".py"))
    assert not clashes, f"top-level folders shadow dependencies under python -m: {clashes}"


def test_device_code_is_latentfast_kernels():
    import latentfast.kernels as k

    here = pathlib.Path(k.__file__).resolve().parent
    assert sorted(p.name for p in (here / "csrc").glob("*.cpp")), "C++ sources ship in latentfast/kernels/csrc"
    assert (here / "grpo_loss.py").exists()
