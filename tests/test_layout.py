"""The package's layout rules, read from the source with ``ast``: each folder imports only from the folders before
it (util -> models -> capture -> analysis -> interventions -> eval / finetuning -> sweeps / reporting -> cli), and no
import cycle runs between files. Every import counts, including the ones inside functions (a lazy import is still a
dependency); only ``if TYPE_CHECKING:`` blocks are left out (they never run)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "melayer"

# a folder may import from its own level and the levels before it
LEVELS = {"util": 0, "data": 0, "models": 1, "capture": 2, "analysis": 3, "interventions": 4, "eval": 5,
          "finetuning": 5, "sweeps": 6, "reporting": 6, "cli": 7}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The melayer modules that ``name`` imports at run time (a ``from X import y`` names X.y when that is a module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                out.add(full if full in modules else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return {m for m in out if m in modules and m != name}


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _folder(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in LEVELS) else None


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one member (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return found


def test_no_import_cycle_between_files():
    assert cycles(import_graph()) == []


def test_no_import_cycle_between_folders():
    graph: dict[str, set[str]] = {}
    for module, deps in import_graph().items():
        a = _folder(module)
        if a is not None:
            graph.setdefault(a, set()).update(b for d in deps if (b := _folder(d)) is not None and b != a)
    assert cycles(graph) == []


def test_each_folder_imports_only_from_the_folders_before_it():
    wrong = []
    for module, deps in import_graph().items():
        a = _folder(module)
        for dep in deps:
            b = _folder(dep)
            if a is not None and b is not None and LEVELS[b] > LEVELS[a]:
                wrong.append(f"{module} -> {dep}")
    assert wrong == []


def test_the_graph_sees_lazy_and_relative_imports():
    graph = import_graph()
    # a function-level import (the loader converts a GGUF through models.convert only when it meets one)
    assert "melayer.models.convert" in graph["melayer.models.loading"]
    assert "melayer.util.errors" in graph["melayer.models.archmap"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
