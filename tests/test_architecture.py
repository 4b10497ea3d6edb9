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


def _module_level_imports(path: Path) -> set[str]:
    """lrc modules imported at module level (not inside functions, not under TYPE_CHECKING)."""
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        for sub in ast.walk(node) if not isinstance(node, (ast.FunctionDef, ast.ClassDef)) else ():
            if isinstance(sub, ast.ImportFrom) and sub.module and sub.module.startswith("lrc"):
                found.add(sub.module)
                found.update(f"lrc.{a.name}" for a in sub.names if sub.module == "lrc")
            elif isinstance(sub, ast.Import):
                found.update(a.name for a in sub.names if a.name.startswith("lrc."))
    return found


def test_no_import_cycles():
    graph = {f"lrc.{p.stem}": _module_level_imports(p) for p in SRC.glob("*.py")}
    assert graph["lrc.trainer"] >= {"lrc.methods", "lrc.run"}  # the scan sees real imports

    def visit(module, path):
        if module in path:
            raise AssertionError(" -> ".join([*path[path.index(module):], module]))
        for dep in graph.get(module, ()):
            visit(dep, [*path, module])

    for module in graph:
        visit(module, [])
