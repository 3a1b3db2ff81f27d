"""The floors of docs/architecture.md that are easy to break by accident: a model gives hidden states
(decoding it is ``latentfast.generation``, its losses are the trainers'), so models/ never imports
generation/ or train/; eval/ and data/ never import train/; train/ never imports the planner
or the console scripts above it (plan/ runs the trainers' steps; scripts/ call both). Read from the source (no imports run)."""
import ast
import pathlib

import pytest

PKG = pathlib.Path(__file__).resolve().parents[1] / "latentfast"
NEVER = {"models": ("generation", "train"), "eval": ("train",), "data": ("train",), "train": ("plan", "scripts"),
         "plan": ("scripts",)}


def imported_modules(source: str, package: str) -> set[str]:
    """Every latentfast module ``source`` (a module of ``package``) imports: relative imports resolved,
    function-local ones included."""
    parts, out = package.split("."), set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = parts[:len(parts) - node.level + 1] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            out.update([mod] + [f"{mod}.{a.name}" for a in node.names])
    return {m for m in out if m.startswith("latentfast.")}


def upward(floor: str, source: str, package: str) -> list[str]:
    return [m for m in sorted(imported_modules(source, package)) for up in NEVER[floor]
            if m == f"latentfast.{up}" or m.startswith(f"latentfast.{up}.")]


@pytest.mark.parametrize("floor", sorted(NEVER))
def test_no_import_points_up(floor):
    bad = {}
    for path in sorted((PKG / floor).rglob("*.py")):
        package = ".".join(["latentfast", *path.relative_to(PKG).parent.parts])
        found = upward(floor, path.read_text(), package)
        if found:
            bad[str(path.relative_to(PKG))] = found
    assert not bad, bad


def test_the_scan_resolves_absolute_relative_and_local_imports():
    src = ("from .local import from_local\nfrom ..hf import adapter\nimport latentfast.ops\n"
           "def f():\n    from latentfast.generation import generate\n")
    mods = imported_modules(src, "latentfast.models.minimind")
    assert {"latentfast.models.minimind.local", "latentfast.models.hf.adapter", "latentfast.ops",
            "latentfast.generation"} <= mods
    assert upward("models", src, "latentfast.models") == ["latentfast.generation", "latentfast.generation.generate"]
    assert upward("models", "from ..train.rl import objectives\n", "latentfast.models")[0] == "latentfast.train.rl"
