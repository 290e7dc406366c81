"""Imports point down the layers of docs/architecture.md, never up.

Every import of app/ and workers/ (module level or inside a function) is read
with ``ast``; a module may import its own layer or a lower one.
"""

from __future__ import annotations

import ast
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
    "app.chat.records": 2,
    "app.chat.errors": 2,
    "app.chat": 3,  # stores: scripts, lock, timeline, history, turns, threads, limits, sharded
    "app.redis_client": 3,
    "app.llm": 3,
    "app.chat.fanout": 4,
    "app.chat.follower": 4,
    "app.chat.presence": 4,
    "app.chat.runner": 4,
    "app.chat.reaper": 4,
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
