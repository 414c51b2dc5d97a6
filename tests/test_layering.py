"""The package's import graph keeps the pipeline's stage order (no lower stage imports a higher
one, no import circle, no `loadtest`), read from the source with `ast` so a lazy import inside a
function counts as much as one at the top of a module."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "appliance"

# The stage of each module, and the stages each stage may import (besides itself).
# api → query → store ← batch ← buffer ← ingest; all of them → the shared base modules.
BASE = {"appliance", "appliance.config", "appliance.events", "appliance.metrics", "appliance.logs"}
BASE |= {"appliance.httpd", "appliance.redis_server"}
ALLOWED: dict[str, set[str]] = {
    "base": set(),
    "buffer": {"base"},
    "store": {"base"},
    "ingest": {"base", "buffer"},
    "batch": {"base", "buffer", "store"},
    "identity": {"base", "store"},
    "query": {"base", "store", "identity"},
    "api": {"base", "store", "query", "identity"},
    # the command line, `appliance up` and other commands start every service
    "top": {"base", "buffer", "store", "ingest", "batch", "identity", "query", "api"},
}


def stage_of(module: str) -> str:
    """A module's stage. Other top-level modules (commands such as `appliance up`) are on top:
    they may import any stage, and no stage may import them (add a shared module to BASE)."""
    if module in BASE:
        return "base"
    if module == "appliance.buffer":
        return "buffer"
    parts = module.split(".")
    if len(parts) >= 2 and parts[1] in ("ingest", "batch", "store", "identity", "query", "api"):
        return parts[1]
    return "top"


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Every module `path` imports, anywhere in it (absolute names)."""
    tree = ast.parse(path.read_text(), str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: use absolute imports"
            base = node.module or ""
            found.add(base)
            # `from appliance.store import layout` imports the module appliance.store.layout
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                if (ROOT / Path(*candidate.split("."))).with_suffix(".py").is_file() or (
                    ROOT / Path(*candidate.split(".")) / "__init__.py"
                ).is_file():
                    found.add(candidate)
    return found


def graph() -> dict[str, set[str]]:
    return {
        module_name(p): {m for m in imports_of(p) if m.split(".")[0] == "appliance"}
        | {m for m in imports_of(p) if m.split(".")[0] == "loadtest"}
        for p in sorted(PACKAGE.rglob("*.py"))
    }


GRAPH = graph()


def violations(graph: dict[str, set[str]]) -> list[str]:
    """Each import that breaks the stage order, or reaches `loadtest`."""
    found = []
    for module in sorted(graph):
        stage = stage_of(module)
        for imported in sorted(graph[module]):
            if imported.split(".")[0] == "loadtest":
                found.append(f"{module} imports {imported}")
                continue
            target = stage_of(imported)
            if target != stage and target not in ALLOWED[stage]:
                found.append(f"{module} ({stage}) imports {imported} ({target})")
    return found


def circle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle in `graph` (modules, the first repeated at the end), or None."""
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for nxt in sorted(graph.get(module, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt in graph and nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state:
            found = visit(module)
            if found:
                return found
    return None


def test_every_module_imports_only_its_own_stage_and_the_stages_below() -> None:
    assert violations(GRAPH) == [], (
        "the stage order is api → query → store ← batch ← buffer ← ingest, "
        "all above config/events/metrics/logs; appliance never imports loadtest"
    )


def test_the_package_has_no_import_circle() -> None:
    assert circle(GRAPH) is None


def test_the_graph_is_read_from_the_source() -> None:
    # lazy imports count, `from package import module` names the module
    assert "appliance.store.compact" in GRAPH["appliance.batch.batcher"]
    assert "appliance.store.layout" in GRAPH["appliance.store.compact"]
    assert {"appliance.ingest.ingester", "appliance.api.app"} <= set(GRAPH)


def test_the_checks_catch_what_they_guard_against() -> None:
    # the old circle: compaction imported the batcher for its crash points
    bad = {
        "appliance.store.compact": {"appliance.batch.batcher", "appliance.config"},
        "appliance.batch.batcher": {"appliance.store.compact"},
        "appliance.supervisor": {"loadtest.jetstream_server"},
        "appliance.query.engine": {"appliance.api.models"},
    }
    assert violations(bad) == [
        "appliance.query.engine (query) imports appliance.api.models (api)",
        "appliance.store.compact (store) imports appliance.batch.batcher (batch)",
        "appliance.supervisor imports loadtest.jetstream_server",
    ]
    assert circle(bad) == [
        "appliance.batch.batcher",
        "appliance.store.compact",
        "appliance.batch.batcher",
    ]
