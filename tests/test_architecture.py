"""The layout's import rules (docs/architecture.md), read from the source: models know nothing of parallelism or
training, parallel/ nothing of the loop, no module imports another that imports it back, and private torch
names appear only in pretrain/torch_compat.py."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "pretrain"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_lines(tree: ast.Module) -> set[int]:
    """Lines inside ``if TYPE_CHECKING:`` blocks: imports for annotations only, no runtime dependency."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            for child in node.body:
                lines.update(range(child.lineno, child.end_lineno + 1))
    return lines


def imports(path: Path, modules: set[str]) -> set[str]:
    """The pretrain modules ``path`` imports anywhere (function bodies too), annotations-only imports excepted.
    ``from package import module`` depends on that module; ``from package import name`` on the package."""
    tree = ast.parse(path.read_text())
    skip = _type_checking_lines(tree)
    found = set()
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("pretrain")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pretrain"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in modules else node.module)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in imports(path, set(paths)) if m in paths and m != name} for name, path in paths.items()}


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


@pytest.mark.parametrize("package,forbidden", [
    ("pretrain.models", ["pretrain.parallel", "pretrain.train", "pretrain.bench", "pretrain.convert", "pretrain.data"]),
    ("pretrain.parallel", ["pretrain.train", "pretrain.bench", "pretrain.convert"]),
    ("pretrain.data", ["pretrain.models", "pretrain.parallel", "pretrain.train"]),
    ("pretrain.config", ["pretrain.models", "pretrain.train", "pretrain.data", "pretrain.bench"]),
    ("pretrain.train", ["pretrain.bench"]),
])
def test_package_does_not_import(graph, package, forbidden):
    bad = sorted(f"{name} -> {dep}" for name, deps in graph.items() if _within(name, package)
                 for dep in deps if any(_within(dep, f) for f in forbidden))
    assert not bad, "\n".join(bad)


def test_no_import_cycles(graph):
    """Tarjan's strongly connected components: every one must be a single module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
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
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not cycles, cycles


def _private_torch(node: ast.AST) -> str | None:
    if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "torch":
        parts = node.module.split(".") + [a.name for a in node.names]
        if any(p.startswith("_") and not p.startswith("__") for p in parts):
            return f"from {node.module} import {', '.join(a.name for a in node.names)}"
    if isinstance(node, ast.Import):
        for alias in node.names:
            if alias.name.split(".")[0] == "torch" and any(p.startswith("_") for p in alias.name.split(".")):
                return f"import {alias.name}"
    if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
        chain, base = [node.attr], node.value
        while isinstance(base, ast.Attribute):
            chain.append(base.attr)
            base = base.value
        if isinstance(base, ast.Name) and base.id == "torch":
            return "torch." + ".".join(reversed(chain))
    return None


def test_private_torch_names_only_in_the_compat_module():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "torch_compat.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            name = _private_torch(node)
            if name:
                found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: {name}")
    assert not found, "\n".join(found)
