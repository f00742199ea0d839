"""Layering (docs/architecture.md): models, losses, diffusion, EMA, tasks and eval are plain PyTorch.

None of them may import Ray, the driver-side `raydae.data` package (and with it pyarrow), or the worker loop.
Two checks per layer and forbidden module: what importing every module of the layer loads, in a fresh
process; and every import statement in the layer's own source, function-local ones included.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["raydae.models", "raydae.losses", "raydae.diffusion", "raydae.ema", "raydae.tasks", "raydae.eval"]
FORBIDDEN = ["ray", "raydae.data", "pyarrow", "raydae.loop"]

# One interpreter loads the heavy shared imports once, then imports each layer in a forked child of its own,
# so what a layer loads is not hidden by what an earlier layer already loaded.
LOADER = r"""
import importlib, json, os, pkgutil, sys
import numpy, torch, yaml

loaded = {}
for layer in sys.argv[1:]:
    read, write = os.pipe()
    if os.fork() == 0:
        os.close(read)
        module = importlib.import_module(layer)
        for info in pkgutil.walk_packages(getattr(module, "__path__", []), layer + "."):
            importlib.import_module(info.name)
        with os.fdopen(write, "w") as out:
            json.dump(sorted(sys.modules), out)
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        loaded[layer] = json.load(pipe)
    os.wait()
print(json.dumps(loaded))
"""


@pytest.fixture(scope="module")
def loaded() -> dict[str, list[str]]:
    done = subprocess.run([sys.executable, "-c", LOADER, *LAYERS], capture_output=True, text=True, timeout=240,
                          cwd=ROOT, check=True)
    return json.loads(done.stdout)


def _is(name: str, forbidden: str) -> bool:
    return name == forbidden or name.startswith(forbidden + ".")


def _source_imports(layer: str) -> dict[str, str]:
    """Every module an import statement in the layer's files names (as written or resolved), with its file."""
    path = ROOT.joinpath(*layer.split("."))
    files = sorted(path.rglob("*.py")) if path.is_dir() else [path.with_suffix(".py")]
    found = {}
    for file in files:
        package = ".".join(file.relative_to(ROOT).with_suffix("").parts[:-1])
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]) if node.level else ""
                module = ".".join(part for part in (base, node.module or "") if part)
                names = [module] + [f"{module}.{alias.name}" for alias in node.names]
            else:
                continue
            found.update({name: str(file.relative_to(ROOT)) for name in names})
    return found


CASES = [pytest.param(layer, forbidden, id=f"{layer}-{forbidden}") for layer in LAYERS for forbidden in FORBIDDEN]


@pytest.mark.parametrize("layer, forbidden", CASES)
def test_layer_does_not_import(loaded, layer, forbidden):
    at_runtime = [name for name in loaded[layer] if _is(name, forbidden)]
    in_source = {name: file for name, file in _source_imports(layer).items() if _is(name, forbidden)}
    assert not at_runtime and not in_source, f"{layer} imports {forbidden}: loads {at_runtime[:5]}, names {in_source}"


def test_the_checks_see_the_imports_they_forbid(loaded):
    """The loader and the source scan report what is there: the data package loads pyarrow and names Ray."""
    assert "torch" in loaded["raydae.models"] and "raydae.models.dit" in loaded["raydae.models"]
    data_imports = _source_imports("raydae.data")
    assert "ray" in data_imports and "raydae.data.images" in data_imports  # function-local, and a from-import
    assert data_imports["ray"].startswith("raydae/data/")
