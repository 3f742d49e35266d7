"""Guards of the package's layering (docs/architecture.md), read from the source with ``ast``.

* Only ``mor_megatron/runtime/`` touches megatron-core's ``parallel_state`` globals; everything else gets groups
  and pipeline-stage predicates from the :class:`~mor_megatron.runtime.DistributedContext`.
* ``mor_megatron/model/`` is plain megatron-core modules: no runtime, training loop, tracking, checkpointing,
  command line, DeepSpeed or MLflow.
* Every module of the package imports on its own (in a fresh interpreter, so that import side effects such as
  the CPU runtime switch stay out of this test process).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "mor_megatron"

MODEL_MAY_NOT_IMPORT = ("mor_megatron.runtime", "mor_megatron.training", "mor_megatron.tracking",
                        "mor_megatron.checkpoint", "mor_megatron.cli", "deepspeed", "mlflow")


def _sources(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.py"))


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import statement in ``path``, relative imports resolved."""
    package = _module_name(path).split(".") if path.name == "__init__.py" else _module_name(path).split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            # `from megatron.core import parallel_state` imports the submodule: name it in full too.
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names] + [(node.lineno, base)]
    return found


def _parallel_state_references(path: Path) -> list[str]:
    """Lines of ``path`` that import or name megatron's ``parallel_state`` (docstrings and comments aside)."""
    hits = [f"{path.relative_to(REPO)}:{line}: imports {name}" for line, name in _imported_modules(path)
            if "parallel_state" in name.split(".")]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        named = ((isinstance(node, ast.Name) and node.id == "parallel_state")
                 or (isinstance(node, ast.Attribute) and node.attr == "parallel_state")
                 or (isinstance(node, ast.Constant) and isinstance(node.value, str)
                     and node.value.endswith("core.parallel_state")))  # importlib / sys.modules look-ups
        if named:
            hits.append(f"{path.relative_to(REPO)}:{node.lineno}: names parallel_state")
    return hits


def test_only_the_runtime_touches_parallel_state():
    runtime = PACKAGE / "runtime"
    hits = [hit for path in _sources(PACKAGE) if runtime not in path.parents
            for hit in _parallel_state_references(path)]
    assert not hits, ("megatron's parallel_state outside mor_megatron/runtime/; take groups and stage predicates "
                      "from the DistributedContext instead:\n" + "\n".join(hits))


def test_the_model_imports_nothing_above_it():
    hits = [f"{path.relative_to(REPO)}:{line}: {name}" for path in _sources(PACKAGE / "model")
            for line, name in _imported_modules(path)
            if any(name == banned or name.startswith(banned + ".") for banned in MODEL_MAY_NOT_IMPORT)]
    assert not hits, "mor_megatron/model/ imports from layers above it:\n" + "\n".join(sorted(set(hits)))


_IMPORT_EVERY_MODULE = r"""
import importlib, importlib.util, json, pkgutil, sys, traceback
import mor_megatron

results = {"mor_megatron": ["ok", ""]}
failed_walk = []
for info in pkgutil.walk_packages(mor_megatron.__path__, "mor_megatron.", onerror=failed_walk.append):
    try:
        importlib.import_module(info.name)
        results[info.name] = ["ok", ""]
    except ModuleNotFoundError as err:
        top = (err.name or "").partition(".")[0]
        absent = bool(top) and top != "mor_megatron" and importlib.util.find_spec(top) is None
        results[info.name] = ["absent" if absent else "error",
                              f"needs {err.name}, which is not installed" if absent else traceback.format_exc()]
    except BaseException:
        results[info.name] = ["error", traceback.format_exc()]
for name in failed_walk:
    results.setdefault(name, ["error", "pkgutil.walk_packages could not import this package"])
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def import_results() -> dict[str, list[str]]:
    done = subprocess.run([sys.executable, "-c", _IMPORT_EVERY_MODULE], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


MODULES = [_module_name(path) for path in _sources(PACKAGE)]


def test_every_source_file_is_a_module_of_the_package(import_results):
    """pkgutil finds every file (a folder without ``__init__.py`` would hide its modules from the import test)."""
    assert sorted(set(MODULES) - set(import_results)) == []


@pytest.mark.parametrize("module", MODULES)
def test_every_module_imports(import_results, module):
    status, detail = import_results.get(module, ["error", "not reached by pkgutil.walk_packages"])
    if status == "absent":
        pytest.skip(detail)
    assert status == "ok", f"import {module} fails:\n{detail}"
