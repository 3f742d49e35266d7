"""The package installs where its users are: declared dependencies match the imports, every module imports, and
installing the project into an environment that already has torch and megatron-core keeps them."""

from __future__ import annotations

import ast
import importlib.metadata
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "mor_megatron"
# GPU-only kernels megatron-core uses when they are installed; imported behind a guard, never required.
OPTIONAL_IMPORTS = {"apex", "transformer_engine"}


def _declared() -> dict[str, str]:
    """Normalised distribution name -> requirement string, from pyproject's [project.dependencies]."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {_normalise(re.split(r"[<>=!~\[; ]", req, maxsplit=1)[0]): req for req in project["dependencies"]}


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _imported_top_level_names() -> dict[str, list[str]]:
    """Top-level module name -> files importing it (absolute imports of third-party code in mor_megatron/)."""
    found: dict[str, list[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in ("mor_megatron", "__future__"):
                    found.setdefault(top, []).append(str(path.relative_to(ROOT)))
    return found


def test_every_imported_distribution_is_declared_and_every_declared_one_is_imported():
    declared = _declared()
    owners = importlib.metadata.packages_distributions()
    used: set[str] = set()
    undeclared = {}
    for top, files in _imported_top_level_names().items():
        if top in OPTIONAL_IMPORTS:
            continue
        dists = {_normalise(d) for d in owners.get(top, [])}
        assert dists, f"{top!r} (imported by {files[0]}) belongs to no installed distribution"
        if not dists & declared.keys():
            undeclared[top] = (sorted(dists), files[0])
        used |= dists & declared.keys()
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"
    assert set(declared) == used, f"declared but never imported: {sorted(set(declared) - used)}"


def test_every_module_imports():
    """In a fresh interpreter, so the imports see no state left by other tests."""
    modules = sorted(
        ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for path in PACKAGE.rglob("*.py"))
    code = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\n"
    result = subprocess.run([sys.executable, "-c", code, *modules], capture_output=True, text=True,
                            timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]


def test_installed_versions_satisfy_the_declared_ranges():
    from packaging.requirements import Requirement

    for requirement in map(Requirement, _declared().values()):
        version = importlib.metadata.version(requirement.name)
        assert requirement.specifier.contains(version, prereleases=True), f"{requirement.name} {version}"


def test_installing_the_project_keeps_the_environments_torch_and_megatron_core():
    """A GPU container's torch and megatron-core satisfy the ranges, so pip plans to install only the project."""
    pytest.importorskip("setuptools", minversion="77")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--report", "-",
         "--no-build-isolation", "--disable-pip-version-check", "-e", str(ROOT)],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    planned = {_normalise(item["metadata"]["name"]): item["metadata"]["version"]
               for item in json.loads(result.stdout)["install"]}
    assert planned.keys() == {"mor-megatron"}, f"pip would also install {planned}"
