"""The package's modules import each other without a circle and only downwards through its
layers (``docs/kernels.md#layout``), counting imports inside functions (which would
otherwise hide one)."""

import ast
import subprocess
import sys
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
    # triton_kernels is a link to the top-level folder, which rglob does not follow
    paths = [*PACKAGE.rglob("*.py"), *(PACKAGE / "triton_kernels").glob("*.py")]
    return {module_name(p): imports_of(p) for p in paths}


def test_the_package_has_no_import_circle():
    graph = package_graph()
    assert len(graph) > 30 and graph["dpf_ext.nn"]  # the walk found the package
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def layer_of(module: str) -> str:
    """The layer of a package module: its subpackage (``app``, ``nn``, ...) or ``top``;
    ``python -m dpf_ext`` (``__main__``) is the application's."""
    if module == "dpf_ext.__main__":
        return "app"
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and (PACKAGE / parts[1]).is_dir()) \
        else "top"


ALLOWED = {
    "ops": {"ops", "triton_kernels", "dpf_ext._C"},
    "triton_kernels": {"triton_kernels", "dpf_ext.ops.bits", "dpf_ext.ops.reference"},
    "nn": {"nn", "ops", "dpf_ext.distributed"},
}
"""What each lower layer may import (a layer's name, or a module's); the top level and
``methods`` may import everything but ``app``, and ``app`` anything."""


def layering_violations(graph: dict[str, set[str]]) -> list[str]:
    """The imports of ``graph`` that point up through the package's layers."""
    bad = []
    for module, targets in sorted(graph.items()):
        layer = layer_of(module)
        for target in sorted(targets):
            if layer == "app":
                continue
            if layer_of(target) == "app":
                bad.append(f"{module} -> {target} (the library never imports the application)")
            elif layer in ALLOWED and not {layer_of(target), target} & ALLOWED[layer]:
                bad.append(f"{module} -> {target} ({layer} imports only {sorted(ALLOWED[layer])})")
    return bad


def test_imports_point_down_through_the_layers():
    graph = package_graph()
    assert {layer_of(m) for m in graph} >= {"top", "app", "nn", "methods", "ops", "triton_kernels"}
    assert layering_violations(graph) == []


def test_the_top_level_keeps_at_most_16_modules():
    assert len(list(PACKAGE.glob("*.py"))) <= 16, sorted(p.name for p in PACKAGE.glob("*.py"))


@pytest.mark.parametrize("graph, violation", [
    ({"dpf_ext.pruner": {"dpf_ext.app.train"}}, "library never imports the application"),
    ({"dpf_ext.ops.sparse": {"dpf_ext.nn.layers"}}, "ops imports only"),
    ({"dpf_ext.nn.layers": {"dpf_ext.pruner"}}, "nn imports only"),
])
def test_the_layering_check_finds_upward_imports(graph, violation):
    assert violation in " ".join(layering_violations(graph))
    assert layering_violations({"dpf_ext.app.cli": {"dpf_ext.pruner"},
                                "dpf_ext.nn.layers": {"dpf_ext.ops.bits"}}) == []


@pytest.mark.parametrize("graph, circle", [
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
    ({"a": {"b"}, "b": set()}, None),
])
def test_the_circle_finder_finds_circles(graph, circle):
    assert find_cycle(graph) == circle


def test_the_public_modules_are_there_after_import_dpf_ext():
    # a fresh interpreter: the test session has imported every module already
    code = ("import dpf_ext; dpf_ext.allocator.retain_freed_memory; dpf_ext.nn.sparsify; "
            "dpf_ext.budgets.ERK; dpf_ext.schedules.Cubic; dpf_ext.methods.METHODS; "
            "dpf_ext.ops.simd; import sys; assert 'dpf_ext.app' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_imports_inside_functions_count():
    # layer_types imports conv1d (and with it transformers) inside a function only
    assert "dpf_ext.nn.conv1d" in imports_of(PACKAGE / "nn" / "layer_types.py")
