"""The import graph of src/compresslm: no loops, and every import points down the layers of docs/architecture.md.

Imports inside functions count as much as those at the top of a file: a lazy import that dodges a
loop is still a loop. The layer order is read from the `layers` block of docs/architecture.md, so
the document and the code cannot drift apart.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "src" / "compresslm"
DOC = ROOT / "docs" / "architecture.md"


def _layers() -> dict[str, int]:
    """Top-level package or module name -> layer index (0 is the top)."""
    match = re.search(r"```layers\n(.*?)```", DOC.read_text(), re.S)
    assert match, f"{DOC} has no ```layers block"
    order: dict[str, int] = {}
    for index, line in enumerate(line for line in match.group(1).splitlines() if line.strip()):
        for name in line.split("#")[0].split():
            order[name] = index
    return order


def _module_name(path: Path) -> str:
    parts = path.relative_to(SOURCE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, module: str, known: set[str]) -> set[str]:
    """Every compresslm module `path` imports, at any depth of the file."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        found.update(name for name in names if name == "compresslm" or name.startswith("compresslm."))
    return found - {module}


def _graph() -> dict[str, set[str]]:
    files = {_module_name(path): path for path in SOURCE.rglob("*.py")}
    return {module: _imports(path, module, set(files)) for module, path in files.items()}


def _layer(module: str, layers: dict[str, int]) -> int:
    top = module.split(".")[1] if "." in module else "compresslm"
    assert top in layers, f"{module} belongs to no layer of docs/architecture.md; add '{top}' to its layers block"
    return layers[top]


def test_every_import_points_down_the_layers():
    layers = _layers()
    upward = [
        f"{module} (layer {_layer(module, layers)}) imports {target} (layer {_layer(target, layers)})"
        for module, targets in sorted(_graph().items())
        for target in sorted(targets)
        if _layer(target, layers) < _layer(module, layers)
    ]
    assert not upward, "imports against the layer order:\n" + "\n".join(upward)


def test_the_import_graph_has_no_loop():
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                return [*path[path.index(target) :], target]
            if target not in state and (loop := visit(target)):
                return loop
        path.pop()
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state and (loop := visit(module)):
            raise AssertionError("import loop: " + " -> ".join(loop))


def test_the_layer_check_sees_lazy_and_relative_imports(tmp_path):
    source = tmp_path / "compresslm" / "pkg"
    source.mkdir(parents=True)
    (source / "mod.py").write_text("def f():\n    from compresslm.cli import main\n    from . import other\n")
    found = _imports(source / "mod.py", "compresslm.pkg.mod", {"compresslm.pkg.other", "compresslm.cli"})
    assert found == {"compresslm.cli", "compresslm.pkg.other"}
