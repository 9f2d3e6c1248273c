"""The boundary docs/architecture.md draws, held by test: the layers are packages that import
only downwards, the decision core (``gateway.core``) is pure (no I/O library, no asyncio, no
clock, no shell module), the import graph has no cycle (lazy and type-only imports count), the
runtime never imports the tools, and ``loadtest`` never imports ``tests``."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "gateway"

# The layers of the runtime, bottom to top. A module may import the gateway modules of its own
# package and of the packages named in its layer's entry; a new module falls under its
# package's rule without editing this test. The top-level modules (``gateway.server``,
# ``gateway.plan``, ``gateway.__main__``) are the entry points and may import any layer.
CORE_PACKAGE = "gateway.core"
LAYERS: dict[str, frozenset[str]] = {
    "gateway.core": frozenset(),
    "gateway.fleet": frozenset({"gateway.core"}),
    "gateway.engine": frozenset({"gateway.core", "gateway.fleet"}),
    "gateway.ops": frozenset({"gateway.core", "gateway.fleet", "gateway.engine"}),
    "gateway.app": frozenset({"gateway.core", "gateway.fleet", "gateway.engine", "gateway.ops"}),
    "gateway.http": frozenset({"gateway.core", "gateway.fleet", "gateway.engine", "gateway.ops",
                               "gateway.app"}),
    "gateway.grpc": frozenset({"gateway.core", "gateway.fleet", "gateway.engine", "gateway.ops",
                               "gateway.app"}),
}
FORBIDDEN_IN_CORE = frozenset({
    "asyncio", "socket", "ssl", "selectors", "subprocess", "threading", "time",
    "httptools", "uvicorn", "starlette", "redis", "aiolimiter", "prometheus_client", "grpc",
    "httpx", "aiohttp", "urllib.request",
})
RUNTIME_ENTRY = "gateway.server"
TOOLS = ("gateway.sim", "gateway.tools", "loadtest", "tests")


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth (function bodies, TYPE_CHECKING blocks)."""
    tree = ast.parse(path.read_text(), str(path))
    package = module_name(path).rsplit(".", 1)[0] if path.name != "__init__.py" \
        else module_name(path)
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join([*anchor, base]) if base else ".".join(anchor)
            found.add(base)
            for alias in node.names:  # `from gateway import routing` imports a module
                found.add(f"{base}.{alias.name}")
    return found


def project_graph() -> dict[str, set[str]]:
    files = [*PACKAGE.rglob("*.py"), *(ROOT / "loadtest").rglob("*.py"),
             *(ROOT / "tests").rglob("*.py")]
    modules = {module_name(f): f for f in files}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        graph[name] = {m for m in imports_of(path) if m in modules and m != name}
    return graph


GRAPH = project_graph()
# The decision core: synchronous functions and state machines over snapshots; time is an
# argument. Every module of the core package, found, not listed.
CORE = frozenset(m for m in GRAPH if m.startswith(CORE_PACKAGE + "."))


def package_of(module: str) -> str:
    """The layer package a runtime module belongs to (``gateway`` for the entry points)."""
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 2 or module in LAYERS else "gateway"


def reachable(start: str) -> set[str]:
    seen = {start}
    todo = [start]
    while todo:
        for nxt in GRAPH[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_the_package_import_graph_has_no_cycle() -> None:
    gateway = {m: {d for d in deps if d.startswith("gateway")}
               for m, deps in GRAPH.items() if m.startswith("gateway")}
    # Each package's __init__ is imported with its submodules; cycles through it are not
    # real. Drop edges into package __init__ modules that only hold a docstring/version.
    packages = {m for m in gateway if (ROOT / m.replace(".", "/") / "__init__.py").exists()}
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(gateway[node] - packages):
            if state.get(nxt) == 1:
                cycle = [*path[path.index(nxt):], nxt]
                pytest.fail("import cycle: " + " → ".join(cycle))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for module in sorted(gateway):
        if module not in state:
            visit(module)


@pytest.mark.parametrize("module", sorted(CORE))
def test_the_decision_core_imports_no_shell_no_io_and_no_clock(module: str) -> None:
    path = ROOT / (module.replace(".", "/") + ".py")
    imported = imports_of(path)
    io = sorted(m for m in imported
                if m in FORBIDDEN_IN_CORE or m.split(".")[0] in FORBIDDEN_IN_CORE)
    assert not io, f"{module} imports {io}"
    shell = sorted(m for m in GRAPH[module] if m.startswith("gateway") and m not in CORE
                   and m not in ("gateway", CORE_PACKAGE))
    assert not shell, f"{module} (core) imports shell modules {shell}"


def test_the_runtime_never_imports_the_tools() -> None:
    runtime = reachable(RUNTIME_ENTRY)
    tools = sorted(m for m in runtime if m.startswith(TOOLS))
    assert not tools, f"`gateway serve` would import {tools}"


def test_loadtest_never_imports_tests() -> None:
    bad = sorted((m, d) for m, deps in GRAPH.items() if m.startswith("loadtest")
                 for d in deps if d.startswith("tests"))
    assert not bad, bad


def test_the_core_package_holds_the_decisions() -> None:
    expected = {"routing", "breaker", "admission", "fairshare", "waitqueue", "batching",
                "concurrency", "capacity", "forecast", "config", "types", "errors"}
    missing = sorted(f"{CORE_PACKAGE}.{m}" for m in expected
                     if f"{CORE_PACKAGE}.{m}" not in CORE)
    assert not missing, missing


RUNTIME = sorted(m for m in GRAPH if m.startswith("gateway") and not m.startswith(TOOLS))


def test_every_runtime_module_sits_in_a_layer_or_is_an_entry_point() -> None:
    entry_points = {"gateway", "gateway.__main__", "gateway.server", "gateway.plan"}
    stray = sorted(m for m in RUNTIME if package_of(m) not in LAYERS and m not in entry_points)
    assert not stray, f"modules outside every layer package: {stray}"


@pytest.mark.parametrize("module", RUNTIME)
def test_layers_import_only_downwards(module: str) -> None:
    package = package_of(module)
    if package not in LAYERS:
        return  # an entry point: may import any layer (but never the tools, tested below)
    allowed = LAYERS[package] | {package}
    upward = sorted(d for d in GRAPH[module] if d.startswith("gateway.")
                    and package_of(d) != "gateway" and package_of(d) not in allowed)
    assert not upward, f"{module} ({package}) imports {upward}"
    entry = sorted(d for d in GRAPH[module] if d.startswith("gateway.")
                   and package_of(d) == "gateway" and d not in LAYERS)
    assert not entry, f"{module} imports the entry points {entry}"


def test_the_tools_may_use_loadtest_but_the_runtime_never() -> None:
    runtime_reach = set().union(*(reachable(m) for m in RUNTIME))
    assert not sorted(m for m in runtime_reach if m.startswith(("loadtest", "tests")))
