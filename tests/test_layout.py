"""The layout's import rules (DESIGN.md, Layout), read from the source with `ast`:

- no import cycle among the project's modules (pipelines/, models/, index/), counting the
  imports at module level (what runs on `import`), nor counting the lazy imports inside
  functions too (the registry <-> builders and train <-> train_loops circles were lazy on
  one side);
- `models/` and `index/` import neither Ray nor `pipelines` at module level.

A module is a .py file; `from a.b import c` is an edge to a.b.c when that is a module,
else to a.b. Importing a submodule also runs its package's __init__, but that edge is not
counted: a package that re-exports its submodules would otherwise always be a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipelines", "models", "index")


def _modules() -> dict[str, Path]:
    found = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _imports(tree: ast.Module, module: str, is_package: bool, *, lazy: bool = False) -> list[str]:
    """Names imported by statements that run on import: the module's body, and the
    bodies of its top-level if/try/with blocks (not functions or classes). lazy: every
    import statement, those inside functions and classes too."""
    names: list[str] = []
    base = module.split(".") if is_package else module.split(".")[:-1]
    stack: list[ast.AST] = list(ast.walk(tree)) if lazy else list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                head = ".".join(base[: len(base) - node.level + 1])
                source = f"{head}.{node.module}" if node.module else head
            else:
                source = node.module or ""
            names += [f"{source}.{alias.name}" for alias in node.names] + [source]
        elif not lazy and isinstance(node, ast.If | ast.Try | ast.With):
            for field in ("body", "orelse", "finalbody", "handlers"):
                for child in getattr(node, field, []):
                    stack += child.body if isinstance(child, ast.ExceptHandler) else [child]
    return names


def _graph(*, lazy: bool = False) -> dict[str, set[str]]:
    """module -> the project modules it imports at module level (lazy: anywhere)."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        edges = set()
        for imported in _imports(tree, name, path.name == "__init__.py", lazy=lazy):
            # `from a.b import c`: the module a.b.c if it is one, else a.b
            while imported and imported not in modules:
                imported = imported.rpartition(".")[0]
            if imported and imported != name:
                edges.add(imported)
        graph[name] = edges
    return graph


def _raw_imports(name: str, path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    return _imports(tree, name, path.name == "__init__.py")


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (iterative DFS, three colours)."""
    colour = dict.fromkeys(graph, 0)  # 0 unseen, 1 on the stack, 2 done
    for start in sorted(graph):
        if colour[start]:
            continue
        path = [start]
        iters = [iter(sorted(graph[start]))]
        colour[start] = 1
        while iters:
            nxt = next(iters[-1], None)
            if nxt is None:
                colour[path.pop()] = 2
                iters.pop()
            elif colour[nxt] == 1:
                return path[path.index(nxt):] + [nxt]
            elif colour[nxt] == 0:
                colour[nxt] = 1
                path.append(nxt)
                iters.append(iter(sorted(graph[nxt])))
    return None


def test_the_graph_sees_the_project() -> None:
    graph = _graph()
    assert {"pipelines.cli", "pipelines.train.loops", "models.registry", "index.build"} <= set(graph)
    assert "pipelines.train.config" in graph["pipelines.train.loops"]
    assert "models.errors" in graph["models.registry"]
    assert "models.detection" not in graph["models.registry"]  # looked up lazily
    assert "models.detection" in _graph(lazy=True)["models.registry"]


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycles() -> None:
    cycle = _find_cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_import_cycles_through_lazy_imports() -> None:
    cycle = _find_cycle(_graph(lazy=True))
    assert cycle is None, "import cycle (counting imports inside functions): " + " -> ".join(cycle)


def test_models_and_index_import_neither_ray_nor_pipelines() -> None:
    bad = []
    for module, path in _modules().items():
        if module.split(".")[0] not in ("models", "index"):
            continue
        for name in _raw_imports(module, path):
            if name.split(".")[0] in ("ray", "pipelines"):
                bad.append(f"{path.relative_to(ROOT)}: {name}")
    assert not bad, "models/ and index/ import ray or pipelines: " + "; ".join(sorted(set(bad)))
