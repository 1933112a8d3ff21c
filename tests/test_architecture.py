"""The layers' arrows point down only: a static import graph of app/, imports inside functions counted.

api -> engine -> model runner -> models (loading -> layers -> numerics -> kernels); the tools (bench, eval) import
anything and are imported by the CLI alone. docs/architecture.md draws the same picture.
"""

from __future__ import annotations

import ast
from pathlib import Path

APP = Path(__file__).resolve().parents[1] / "app"


def _modules() -> dict[str, Path]:
    found = {}
    for path in APP.rglob("*.py"):
        parts = list(path.relative_to(APP.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _graph() -> dict[str, set[str]]:
    """module -> the app modules it imports (at any depth: top level, functions, TYPE_CHECKING blocks)."""
    modules = _modules()

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package
                    for _ in range(node.level - 1):
                        anchor = anchor.rpartition(".")[0]
                    base = f"{anchor}.{base}" if base else anchor
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for target in targets:
                if target == "app" or target.startswith("app."):
                    found = resolve(target)
                    if found is not None and found != module:
                        graph[module].add(found)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

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
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def _imports_of(graph: dict[str, set[str]], prefix: str) -> dict[str, set[str]]:
    return {m: targets for m, targets in graph.items() if m == prefix or m.startswith(prefix + ".")}


def _violations(graph: dict[str, set[str]], prefix: str, forbidden: tuple[str, ...]) -> list[str]:
    return sorted(f"{m} -> {t}" for m, targets in _imports_of(graph, prefix).items() for t in targets
                  if any(t == f or t.startswith(f + ".") for f in forbidden))  # fmt: skip


def test_the_graph_sees_imports_inside_functions() -> None:
    graph = _graph()
    assert "app.eval.report" in graph["app.eval.endpoints"]  # imported inside run_eval only
    assert "app.models.layers.decode_step" in graph["app.engine.model_runner"]


def test_no_import_cycle_anywhere_in_app() -> None:
    assert _cycles(_graph()) == []


def test_models_never_import_the_engine_the_api_or_the_tools() -> None:
    forbidden = ("app.engine", "app.api", "app.tasks", "app.eval", "app.bench", "app.main", "app.startup", "app.cli")
    assert _violations(_graph(), "app.models", forbidden) == []


def test_the_rooms_of_models_point_down() -> None:
    graph = _graph()
    assert _violations(graph, "app.models.kernels", ("app.models.loading", "app.models.layers",
                                                      "app.models.numerics")) == []  # fmt: skip
    assert _violations(graph, "app.models.numerics", ("app.models.loading", "app.models.layers")) == []
    assert _violations(graph, "app.models.layers", ("app.models.loading",)) == []


def test_the_engine_never_imports_the_api_or_the_tools() -> None:
    forbidden = ("app.api", "app.tasks", "app.eval", "app.bench", "app.main", "app.startup", "app.cli", "app.config")
    assert _violations(_graph(), "app.engine", forbidden) == []


def test_the_tools_are_imported_by_the_cli_alone() -> None:
    graph = _graph()
    users = sorted(m for m, targets in graph.items() if not m.startswith(("app.bench", "app.eval"))
                   and any(t.startswith(("app.bench", "app.eval")) for t in targets))  # fmt: skip
    assert users == ["app.cli"]
