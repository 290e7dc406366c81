"""Imports point down the layers of docs/architecture.md, never up.

Every import of app/ and workers/ (module level or inside a function) is read
with ``ast``; a module may import its own layer or a lower one.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# The most specific prefix wins; docs/architecture.md draws the same table.
LAYERS: dict[str, int] = {
    "app.chat.keys": 1,
    "app.chat.redis_types": 1,
    "app.chat.backoff": 1,
    "app.settings": 1,
    "app.metrics": 1,
    "app.logs": 1,
    "app.chat.tasks": 1,
    "app.chat.faults": 1,
    "app.chat.records": 2,
    "app.chat.errors": 2,
    "app.chat": 3,  # stores: scripts, lock, timeline, history, turns, threads, limits, sharded
    "app.redis_client": 3,
    "app.llm": 3,
    "app.chat.fanout": 4,
    "app.chat.follower": 4,
    "app.chat.presence": 4,
    "app.chat.titles": 4,
    "app.chat.runner": 4,
    "app.chat.reaper": 4,
    "app.chat.archiver": 4,
    "app.chat.service": 4,
    "app": 5,  # edges: protocol, ws, seed, rest, auth, origins, ops, client
    "app.web": 5,
    "app.main": 6,
    "app.process": 6,
    "workers": 6,
    "app.cli": 7,
    "app.__main__": 7,
}


def layer(module: str) -> int | None:
    """The layer of a project module, None for anything else (libraries)."""
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        found = LAYERS.get(".".join(parts[:end]))
        if found is not None:
            return found
    return None


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported(tree: ast.AST) -> list[str]:
    """Every absolute module an import names (``from a import b`` may name a
    module ``a.b``: both are checked, the more specific layer counting)."""
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names += [f"{node.module}.{alias.name}" for alias in node.names]
    return names


def project_modules() -> list[Path]:
    return sorted([*ROOT.joinpath("app").rglob("*.py"), *ROOT.joinpath("workers").rglob("*.py")])


def upward_imports() -> list[str]:
    found = []
    for path in project_modules():
        importer = module_name(path)
        own = layer(importer)
        assert own is not None, f"{importer} has no layer: add it to LAYERS"
        for target in imported(ast.parse(path.read_text(), str(path))):
            theirs = layer(target)
            if theirs is not None and theirs > own:
                found.append(f"{importer} (layer {own}) imports {target} (layer {theirs})")
    return found


def test_every_import_points_down_a_layer() -> None:
    assert upward_imports() == []


def import_graph() -> dict[str, set[str]]:
    """Each project module and the project modules it imports."""
    paths = project_modules()
    modules = {module_name(path) for path in paths}
    graph: dict[str, set[str]] = {}
    for path in paths:
        edges = graph.setdefault(module_name(path), set())
        for target in imported(ast.parse(path.read_text(), str(path))):
            parts = target.split(".")
            for end in range(len(parts), 0, -1):
                candidate = ".".join(parts[:end])
                if candidate in modules:
                    if candidate != module_name(path):
                        edges.add(candidate)
                    break
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The groups of modules that import each other, directly or not
    (strongly connected components of more than one module)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return groups


def test_no_modules_import_each_other() -> None:
    """Imports within a layer are allowed, but never in a circle (a lazy
    import inside a function counts too: it is a cycle all the same)."""
    graph = import_graph()
    assert "app.chat.service" in graph["app.ws"]
    assert cycles(graph) == []


def test_the_cycle_check_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


# The domain and what it stands on know nothing of the web: frames, sockets and
# HTTP are the edges' (layer 5 and up).
WEB = ("fastapi", "starlette", "uvicorn", "websockets")


def test_the_domain_imports_no_web_framework() -> None:
    found = []
    for path in project_modules():
        importer = module_name(path)
        if (layer(importer) or 0) > 4:
            continue
        for target in imported(ast.parse(path.read_text(), str(path))):
            if target.split(".")[0] in WEB:
                found.append(f"{importer} imports {target}")
    assert found == []


def test_the_check_sees_an_upward_import() -> None:
    """The check itself can fail: a store importing the service is caught,
    whether the import is at module level or inside a function."""
    source = "def f():\n    from app.chat.service import ChatService\n"
    targets = imported(ast.parse(source))
    assert targets == ["app.chat.service.ChatService"]
    assert layer(targets[0]) == 4 > (layer("app.chat.turns") or 0)
    assert layer("app.chat.records.Message") == 2
    assert layer("redis.asyncio") is None


# Drivers a pod loads only for the feature that needs them: each is a large
# part of a pod's start-up time (Kubernetes' rollouts, the test suite's pods).
OPTIONAL_DRIVERS = ("psycopg", "jsonschema")


def _loaded_after_create_app(env: dict[str, str]) -> set[str]:
    """Top-level packages in sys.modules after a pod's app is built with ``env``."""
    probe = (
        "import sys; from app.main import create_app; create_app();"
        "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))"
    )
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("CHAT_", "REDIS_"))}
    result = subprocess.run(
        [sys.executable, "-c", probe], env={**clean, **env}, cwd=ROOT,
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    return set(result.stdout.split())


def test_a_pod_without_an_archive_or_tools_loads_neither_driver() -> None:
    loaded = _loaded_after_create_app({"CHAT_LLM": "fake"})
    assert loaded.isdisjoint(OPTIONAL_DRIVERS), loaded & set(OPTIONAL_DRIVERS)


def test_a_pod_with_tools_of_its_own_loads_jsonschema() -> None:
    """The check can fail: a deployment's tools are checked at start, by jsonschema."""
    loaded = _loaded_after_create_app(
        {"CHAT_LLM": "fake", "CHAT_TOOLS": "tests.integration.pod_tools:slow"}
    )
    assert "jsonschema" in loaded
