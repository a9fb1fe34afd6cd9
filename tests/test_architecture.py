"""The layering of docs/architecture.md, read from the code's own imports (no module is run).

Every module of tfmeta lives in one layer package; a module imports only from its own layer or a
lower one, function-local imports included; and no chain of imports comes back to where it
started. The top-level ``tfmeta/__init__.py`` (the public API) and ``tfmeta/__main__.py`` stand
above every layer.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "tfmeta"
#: lowest first: a module may import from its own layer and the layers before it.
LAYERS = ("core", "data", "implicit", "estimators", "training", "export", "app")
#: above every layer: the public API and `python -m tfmeta`.
API = ("tfmeta", "tfmeta.__main__")


def module_names(package: pathlib.Path) -> dict[str, pathlib.Path]:
    """Dotted name -> file, for every module under `package` (a package is its __init__)."""
    names = {}
    for path in sorted(package.rglob("*.py")):
        parts = (package.name,) + path.relative_to(package).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def _resolve(name: str, known) -> str | None:
    """The module an import of `name` runs last: the longest known prefix."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in known:
            return candidate
    return None


def imports(path: pathlib.Path, known, root: str) -> list[tuple[str, int]]:
    """(module imported, line) for every import of `root`'s modules in `path`, at any depth
    (function-local and conditional imports included)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == root:
                    found.append((_resolve(alias.name, known), node.lineno))
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] != root:
                continue
            for alias in node.names:  # `from pkg import submodule` imports the submodule
                target = _resolve(f"{node.module}.{alias.name}", known)
                if target != f"{node.module}.{alias.name}":
                    target = _resolve(node.module, known)
                found.append((target, node.lineno))
    return [(target, line) for target, line in found if target is not None]


def layer_of(name: str) -> int | None:
    """Index of the module's layer in LAYERS; None for the API; ValueError outside any layer."""
    if name in API:
        return None
    parts = name.split(".")
    if len(parts) < 2 or parts[1] not in LAYERS:
        raise ValueError(f"{name} is in no layer: expected tfmeta.<{'|'.join(LAYERS)}>...")
    return LAYERS.index(parts[1])


def import_graph(package: pathlib.Path) -> dict[str, list[tuple[str, int]]]:
    known = module_names(package)
    return {name: imports(path, known, package.name) for name, path in known.items()}


def upward_imports(graph) -> list[str]:
    """'a (layer) line N imports b (higher layer)' for every import against the layering."""
    found = []
    for name, targets in sorted(graph.items()):
        here = layer_of(name)
        if here is None:
            continue
        for target, line in targets:
            there = layer_of(target)
            if there is None or there > here:
                found.append(f"{name} ({LAYERS[here]}) line {line} imports {target} "
                             f"({'the API' if there is None else LAYERS[there]})")
    return found


def cycles(graph) -> list[list[str]]:
    """Every strongly connected set of modules that import each other (Tarjan), and self-imports."""
    index, low, stack, on_stack, result, counter = {}, {}, [], set(), [], [0]

    def visit(node):
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target, _ in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or any(t == node for t, _ in graph.get(node, ())):
                result.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return result


def test_every_module_is_in_a_layer():
    for name in module_names(PACKAGE):
        layer_of(name)  # raises for a module outside every layer


def test_no_module_imports_from_a_higher_layer():
    assert upward_imports(import_graph(PACKAGE)) == []


def test_no_import_cycles():
    assert cycles(import_graph(PACKAGE)) == []


def _write(root: pathlib.Path, files: dict[str, str]) -> pathlib.Path:
    package = root / "tfmeta"
    for relative, text in files.items():
        path = package / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return package


def test_the_checks_see_function_local_upward_imports_and_cycles(tmp_path):
    """The checks themselves can fail: a small tree with one upward, function-local import (core
    -> training, the kind that hid the old cycles) and one cycle inside a layer."""
    package = _write(tmp_path, {
        "__init__.py": "from tfmeta.training import trainer\n",
        "core/__init__.py": "",
        "core/learner.py": "def f():\n    from tfmeta.training.trainer import MetaTrainer\n",
        "core/a.py": "import tfmeta.core.b\n",
        "core/b.py": "from tfmeta.core import a\n",
        "training/__init__.py": "",
        "training/trainer.py": "from tfmeta.core import learner\nMetaTrainer = None\n",
    })
    graph = import_graph(package)
    assert upward_imports(graph) == [
        "tfmeta.core.learner (core) line 2 imports tfmeta.training.trainer (training)"]
    assert sorted(cycles(graph)) == [["tfmeta.core.a", "tfmeta.core.b"],
                             ["tfmeta.core.learner", "tfmeta.training.trainer"]]
    with pytest.raises(ValueError, match="tfmeta.loose is in no layer"):
        layer_of("tfmeta.loose")
