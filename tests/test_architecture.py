"""The module layout holds: the model and the objective know nothing of training, and no module-level import
cycle exists between the package's modules (see ARCHITECTURE.md)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import lrc

SRC = Path(lrc.__file__).parent
# What computes the student and its losses, and what it must never reach, directly or through another module.
MODEL = ("lrc.clone", "lrc.weights", "lrc.losses", "lrc.families", "lrc.precision", "lrc.init", "lrc.refit")
TRAINING = ("lrc.trainer", "lrc.cli", "lrc.distributed", "lrc.log", "lrc.run", "lrc.methods", "lrc.evaluate",
            "lrc.checkpoint", "lrc.data", "lrc.demo", "lrc.bench", "lrc.config")


def test_model_and_objective_import_nothing_from_training():
    # A fresh interpreter: what importing the model pulls in, transitively.
    code = ("import sys; import " + ", ".join(MODEL) +
            "; print(' '.join(sorted(m for m in sys.modules if m.startswith('lrc.'))))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert set(MODEL) <= set(loaded)
    assert not set(TRAINING) & set(loaded), sorted(set(TRAINING) & set(loaded))


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in SRC.rglob("*.py")}


def _resolve(name: str) -> str | None:
    """The package module an import names (`lrc.data.build`, or `lrc.data` for `from lrc.data import x`)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(path: Path) -> set[str]:
    """lrc modules `path` imports anywhere (module level and inside functions), except under TYPE_CHECKING
    (annotations only: no import at run time)."""
    found: set[str] = set()
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                   and "TYPE_CHECKING" in ast.unparse(node.test) for n in ast.walk(node)}
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module.startswith("lrc"):
            for alias in node.names:
                target = _resolve(f"{node.module}.{alias.name}") if f"{node.module}.{alias.name}" in MODULES else \
                    _resolve(node.module)
                found.add(target) if target else None
        elif isinstance(node, ast.Import):
            found.update(t for a in node.names if a.name.startswith("lrc.") and (t := _resolve(a.name)))
    found.discard(_module_name(path))
    found.discard("lrc")
    return found


def test_no_import_cycles():
    """Counting every import (inside functions too) of every module (data/ included): no module reaches
    itself again."""
    graph = {name: _imports(path) for name, path in MODULES.items()}
    assert graph["lrc.trainer"] >= {"lrc.methods", "lrc.run"}  # the scan sees real imports
    assert "lrc.tasks" in graph["lrc.evaluate"]  # and imports inside functions
    assert "lrc.data.build" in graph["lrc.data"]

    done: set[str] = set()

    def visit(module, path):
        if module in path:
            raise AssertionError("import cycle: " + " -> ".join([*path[path.index(module):], module]))
        if module in done:
            return
        for dep in sorted(graph.get(module, ())):
            visit(dep, [*path, module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])
