"""The layering of the code, enforced (docs/architecture.md, "Layers").

Walks the import graph of every module of the eight top-level packages (the AST: imports at module level
and inside functions alike, so a lazy import hides nothing) and fails on
- an import from a lower layer into a higher one,
- an import cycle between modules,
- a function-level import without a comment (on its line or the line above) saying why it is not at the top.
Each failure message lists the offending edges, so the fix starts from the message.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Lowest first: a module may import its own layer or a lower one, never a higher one.
LAYERS = ("config", "schemas", "imaging", "stream", "model_store", "processors", "gateway", "infra")
RANK = {package: rank for rank, package in enumerate(LAYERS)}


@dataclass(frozen=True)
class Edge:
    source: str  # module that imports
    target: str  # module of ours it imports
    path: Path
    line: int
    function_level: bool
    commented: bool

    def where(self) -> str:
        return f"{self.path.relative_to(ROOT) if self.path.is_relative_to(ROOT) else self.path}:{self.line}"


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def discover(root: Path = ROOT) -> dict[str, Path]:
    """Every module of ours, by dotted name."""
    modules: dict[str, Path] = {}
    for package in LAYERS:
        base = root / package
        if not base.is_dir():  # a layer may not exist yet on a branch; the rest is still checked
            continue
        for path in sorted(base.rglob("*.py")):
            modules[module_name(path, root)] = path
    return modules


def resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of a dotted name that is one of our modules."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def import_lines(tree: ast.AST) -> set[int]:
    """The line numbers every import statement of a module spans."""
    return {
        number
        for node in ast.walk(tree)
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for number in range(node.lineno, (node.end_lineno or node.lineno) + 1)
    }


def has_reason(lines: list[str], node: ast.stmt, imports: set[int]) -> bool:
    """A comment on a line of the statement, or a comment line right above it or above the run of import
    statements it belongs to (one comment may give the reason for a block of lazy imports)."""
    end = node.end_lineno or node.lineno
    if any("#" in lines[number - 1] for number in range(node.lineno, end + 1)):
        return True
    above = node.lineno - 1
    while above >= 1 and above in imports:
        above -= 1
    return above >= 1 and lines[above - 1].strip().startswith("#")


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> list[Edge]:
    source = path.read_text(encoding="utf-8")
    lines = source.splitlines()
    tree = ast.parse(source, filename=str(path))
    imports = import_lines(tree)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    edges: list[Edge] = []

    def add(target_name: str, node: ast.stmt, function_level: bool) -> None:
        target = resolve(target_name, modules)
        if target is None or target == name:
            return
        edges.append(Edge(name, target, path, node.lineno, function_level, has_reason(lines, node, imports)))

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                for alias in child.names:
                    add(alias.name, child, in_function)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - (child.level - 1)]
                    base = ".".join([*anchor, child.module] if child.module else anchor)
                else:
                    base = child.module or ""
                for alias in child.names:
                    # `from pkg import mod` imports the module pkg.mod; `from mod import name` imports mod.
                    full = f"{base}.{alias.name}"
                    add(full if full in modules else base, child, in_function)
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(tree, False)
    return edges


def function_level_imports(path: Path) -> list[ast.stmt]:
    """Every import statement inside a function (ours or not: each needs its reason)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: list[ast.stmt] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if in_function and isinstance(child, (ast.Import, ast.ImportFrom)):
                found.append(child)
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(tree, False)
    return found


def graph(root: Path = ROOT) -> tuple[dict[str, Path], list[Edge]]:
    modules = discover(root)
    edges = [edge for name, path in modules.items() for edge in imports_of(name, path, modules)]
    return modules, edges


def cycles(modules: dict[str, Path], edges: list[Edge]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    succ: dict[str, set[str]] = {name: set() for name in modules}
    for edge in edges:
        succ[edge.source].add(edge.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in sorted(modules):
        if root in index:
            continue
        work = [(root, iter(sorted(succ[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(succ[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def layer(module: str) -> str:
    return module.split(".")[0]


def upward(edges: list[Edge]) -> list[Edge]:
    """Imports from a lower layer into a higher one."""
    return [edge for edge in edges if RANK[layer(edge.target)] > RANK[layer(edge.source)]]


def test_the_walker_finds_upward_lazy_cyclic_and_silent_imports(tmp_path: Path) -> None:
    """Guards the walker itself on a small tree whose faults are known."""
    files = {
        "stream/__init__.py": "",
        "stream/runtime.py": "from stream import serde\n",
        "stream/serde.py": (
            "import json\n\n\ndef load():\n"
            "    from stream.runtime import loop  # breaks the cycle at import time\n"
            "    import infra.cli\n    return json, loop, infra.cli\n\n\ndef save():\n"
            "    # heavy: loaded only when saving\n    import json as j\n    import infra.roles\n"
            "    x = 1\n    import infra.cli\n    return x, j, infra.roles, infra.cli\n"
        ),
        "infra/__init__.py": "",
        "infra/cli.py": "from . import roles\nfrom stream.serde import load\n",
        "infra/roles.py": "",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    modules, edges = graph(tmp_path)
    assert set(modules) == {"stream", "stream.runtime", "stream.serde", "infra", "infra.cli", "infra.roles"}
    pairs = {(edge.source, edge.target, edge.function_level, edge.commented) for edge in edges}
    assert pairs == {
        ("stream.runtime", "stream.serde", False, False),
        ("stream.serde", "stream.runtime", True, True),
        ("stream.serde", "infra.cli", True, False),
        ("infra.cli", "infra.roles", False, False),
        ("infra.cli", "stream.serde", False, False),
        ("stream.serde", "infra.roles", True, True),
    }
    assert sorted((edge.source, edge.target) for edge in upward(edges)) == [
        ("stream.serde", "infra.cli"),
        ("stream.serde", "infra.cli"),
        ("stream.serde", "infra.roles"),
    ]
    assert cycles(modules, edges) == [["infra.cli", "stream.runtime", "stream.serde"]]
    lazy = function_level_imports(tmp_path / "stream" / "serde.py")
    source = (tmp_path / "stream" / "serde.py").read_text()
    lines, imports = source.splitlines(), import_lines(ast.parse(source))
    assert [has_reason(lines, node, imports) for node in lazy] == [True, False, True, True, False]


def test_no_lower_layer_imports_a_higher_one() -> None:
    _, edges = graph()
    found = sorted(
        {
            f"{edge.where()}  {edge.source} ({layer(edge.source)}) -> {edge.target} ({layer(edge.target)})"
            for edge in upward(edges)
        }
    )
    assert not found, (
        f"{len(found)} import(s) reach up a layer (order, lowest first: {' < '.join(LAYERS)}):\n" + "\n".join(found)
    )


def test_no_import_cycles() -> None:
    modules, edges = graph()
    found = cycles(modules, edges)
    report = []
    for component in found:
        members = set(component)
        inner = sorted(
            {
                f"    {edge.where()}  {edge.source} -> {edge.target}"
                for edge in edges
                if edge.source in members and edge.target in members
            }
        )
        report.append(" <-> ".join(component) + "\n" + "\n".join(inner))
    assert not found, f"{len(found)} import cycle(s):\n" + "\n".join(report)


def test_every_function_level_import_says_why() -> None:
    modules = discover()
    silent = []
    for path in modules.values():
        source = path.read_text(encoding="utf-8")
        lines, imports = source.splitlines(), import_lines(ast.parse(source))
        for node in function_level_imports(path):
            if not has_reason(lines, node, imports):
                silent.append(f"{path.relative_to(ROOT)}:{node.lineno}  {lines[node.lineno - 1].strip()}")
    assert not silent, (
        f"{len(silent)} function-level import(s) without a one-line reason (move it to the module's header,"
        " or say on its line or the line above why it must stay lazy):\n" + "\n".join(sorted(silent))
    )
