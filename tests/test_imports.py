"""The package's modules import each other without a circle, counting imports inside
functions (which would otherwise hide one)."""

import ast
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "dpf_ext"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def source_of(name: str) -> Path | None:
    """The file of package module ``name`` (source, or a built extension), or None."""
    base = PACKAGE.parent.joinpath(*name.split("."))
    extensions = [base.with_name(base.name + suffix) for suffix in EXTENSION_SUFFIXES]
    for path in (base.with_suffix(".py"), base / "__init__.py", *extensions):
        if path.is_file():
            return path
    return None


def imports_of(path: Path) -> set[str]:
    """The package modules ``path`` imports anywhere in its body, functions included."""
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            # ``from . import x`` imports the submodule x where there is one
            targets = [f"{base}.{alias.name}" if source_of(f"{base}.{alias.name}") else base
                       for alias in node.names]
        else:
            continue
        # a built extension (dpf_ext._C) imports nothing of the package
        found.update(t for t in targets
                     if t.split(".")[0] == "dpf_ext" and (source_of(t) or Path()).suffix == ".py")
    found.discard(here)
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph``, as the list of its modules, or None."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def package_graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in PACKAGE.rglob("*.py")}


def test_the_package_has_no_import_circle():
    graph = package_graph()
    assert len(graph) > 30 and graph["dpf_ext.nn"]  # the walk found the package
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


@pytest.mark.parametrize("graph, circle", [
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
    ({"a": {"b"}, "b": set()}, None),
])
def test_the_circle_finder_finds_circles(graph, circle):
    assert find_cycle(graph) == circle


def test_imports_inside_functions_count():
    # layer_types imports conv1d (and with it transformers) inside a function only
    assert "dpf_ext.conv1d" in imports_of(PACKAGE / "layer_types.py")
