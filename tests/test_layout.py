"""The layout of ``proxy/``: imports point one way, from the edge down to storage, and never in a circle.

Every import of a ``proxy`` module counts, wherever it is written: at the
top, inside a function (imported late, to spare start-up time) or under
``TYPE_CHECKING``; each is an arrow of the design all the same. Modules are
grouped in layers, listed here from the bottom up; a module may import its
own layer and the layers below, never one above. A module that is in no layer
fails too, naming itself: a new module gets a place in the design when it is
added.

Plain ``ast``: nothing is imported, so a module that cannot be imported here
(OpenTelemetry absent, say) is read all the same.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# From the bottom up: what each layer holds, and so what it may import (itself and what is above in this list).
LAYERS: tuple[tuple[str, str], ...] = (
    ("errors", "the one error hierarchy"),
    ("config", "settings and what is parsed from them: backends, prices, sign-in, keyed hashes, bearer tokens"),
    ("observability", "telemetry's interface and its OpenTelemetry exporter"),
    ("storage", "Table Storage: the tables and the lean entity client"),
    ("upstream", "Azure OpenAI: the pooled client with failover, its transport, request bodies"),
    ("policy", "who may call: credentials, events, keys, the roster, guessed codes, organizer accounts, audit"),
    ("admission", "how much: daily caps, event budgets, requests in flight, budget alerts"),
    ("ledger", "what was used: usage records, how answers end and settle, reconciliation"),
    ("conversations", "what is kept between requests: chat sessions, stored Responses"),
    ("edge", "the attendee's HTTP surface: handlers, callers, key registration, stream relay, access log, pages"),
    ("manage", "the organizer's: operations, HTTP API, probe, plan, doctor, CLI"),
)

# Modules not in a package named for their layer (``proxy/errors.py``; before the move into packages, all of them).
PLACED: dict[str, str] = {
    "proxy.errors": "errors",
}


def modules(root: Path, package: str = "proxy") -> dict[str, Path]:
    """Every module of the package, by dotted name (a package by its own name, for its ``__init__.py``)."""
    found = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> Iterator[tuple[str, int]]:
    """The package's modules that ``name`` imports, with the line of each import."""
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            # ``from proxy import payload``: the module payload, when there is one; else the package itself.
            targets = [
                f"{module}.{alias.name}" if f"{module}.{alias.name}" in known else module for alias in node.names
            ]
        else:
            continue
        for target in targets:
            while target and target not in known:  # ``import proxy.a.b`` imports proxy.a.b; a name in it, its module
                target = target.rpartition(".")[0]
            if target and target != name:
                yield target, node.lineno


def layer_of(name: str) -> str | None:
    if name in PLACED:
        return PLACED[name]
    parts = name.split(".")
    layer = parts[1] if len(parts) > 1 else None
    return layer if layer in dict(LAYERS) else None


def problems(root: Path) -> list[str]:
    """Every import that points up or closes a circle, and every module in no layer; empty when the layout holds."""
    known = modules(root)
    order = {layer: index for index, (layer, _) in enumerate(LAYERS)}
    graph: dict[str, set[str]] = {}
    found = []
    for name, path in known.items():
        graph[name] = set()
        if name == "proxy":
            continue
        layer = layer_of(name)
        if layer is None:
            found.append(f"{name} is in no layer: give it a package (and a place in LAYERS)")
            continue
        for target, line in imports(name, path, known):
            graph[name].add(target)
            target_layer = layer_of(target)
            if target_layer is not None and order[target_layer] > order[layer]:
                where = f"{path.relative_to(root)}:{line}"
                found.append(f"{where}: {name} ({layer}) imports {target} ({target_layer}), a layer above it")
    found += [f"import circle: {' -> '.join([*cycle, cycle[0]])}" for cycle in cycles(graph)]
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One circle through each group of modules that import each other (Tarjan's strongly connected components)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(group)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [_circle(graph, set(group)) for group in groups]


def _circle(graph: dict[str, set[str]], group: set[str]) -> list[str]:
    """A path that goes round within the group, from its first module back to it."""
    start = min(group)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        node = frontier.pop(0)
        for target in sorted(graph[node] & group):
            if target == start:
                return paths[node]
            if target not in paths:
                paths[target] = [*paths[node], target]
                frontier.append(target)
    return sorted(group)


def test_imports_point_down_and_never_in_a_circle() -> None:
    assert problems(ROOT) == []


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


def test_the_check_sees_an_import_up_a_circle_and_a_module_without_a_layer(tmp_path: Path) -> None:
    """The check itself: each kind of fault, written the ways the code writes imports, is reported."""
    root = _tree(
        tmp_path,
        {
            "proxy/__init__.py": "",
            "proxy/errors.py": "",
            "proxy/storage/__init__.py": "",
            "proxy/edge/__init__.py": "",
            "proxy/ledger/__init__.py": "",
            "proxy/observability/__init__.py": "",
            # Up, from inside a function: storage may not reach the edge.
            "proxy/storage/tables.py": "def f():\n    from proxy.edge.handlers import answering\n",
            "proxy/edge/handlers.py": "from proxy.storage import tables\n",
            # A circle within one layer, one arrow under TYPE_CHECKING, one relative.
            "proxy/observability/telemetry.py": (
                "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import proxy.observability.otel\n"
            ),
            "proxy/observability/otel.py": "from . import telemetry\n",
            "proxy/newcomer.py": "from .errors import ProxyError\n",
            # Relative imports of a package above.
            "proxy/ledger/usage.py": "from ..edge.access import Access\n",
            "proxy/edge/access.py": "from ..ledger import usage\n",
        },
    )
    found = problems(root)
    assert (
        "proxy/storage/tables.py:2: proxy.storage.tables (storage) imports proxy.edge.handlers (edge), a layer above it"
        in found
    )
    assert (
        "import circle: proxy.observability.otel -> proxy.observability.telemetry -> proxy.observability.otel" in found
    )
    assert "proxy.newcomer is in no layer: give it a package (and a place in LAYERS)" in found
    assert (
        "proxy/ledger/usage.py:1: proxy.ledger.usage (ledger) imports proxy.edge.access (edge), a layer above it"
        in found
    )
    assert "import circle: proxy.edge.access -> proxy.ledger.usage -> proxy.edge.access" in found
    assert "import circle: proxy.edge.handlers -> proxy.storage.tables -> proxy.edge.handlers" in found
    assert len(found) == 6, found  # nothing else: the arrows down (edge to storage, usage to errors) are fine


def test_each_package_says_what_it_holds_and_names_what_it_imports() -> None:
    """A package's docstring names every package of the proxy its modules import (``proxy.storage``)."""
    known = modules(ROOT)
    found = []
    for name, path in known.items():
        if path.name != "__init__.py" or name == "proxy":
            continue
        docstring = ast.get_docstring(ast.parse(path.read_text())) or ""
        if not docstring:
            found.append(f"{name} has no docstring")
        used = {
            ".".join(target.split(".")[:2])
            for module, module_path in known.items()
            if module.startswith(name + ".")
            for target, _ in imports(module, module_path, known)
        }
        found += [
            f"{name} imports {target}, which its docstring does not name"
            for target in sorted(used - {name})
            if f"``{target}``" not in docstring
        ]
    assert found == []
