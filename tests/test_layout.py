"""The layout of ``proxy/`` and ``devtools/``: imports point one way, and never in a circle.

In ``proxy/``, from the edge down to storage; ``devtools/`` (``DEVTOOLS``) may
import the proxy, never the reverse, and its packages stand apart but for
``devtools.local``, which runs the others.

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
    ("net", "HTTP/1.1 over kept-alive connections, under storage's and upstream's calls"),
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

# ``devtools/``: what each package holds, and what it may import besides itself (packages of devtools, or
# ``proxy``, all of it). Each runs as a process of its own (``python -m devtools.X``); ``local`` starts the
# others so, and seeds the proxy's storage with the proxy's own code. The simulator imports nothing of the
# proxy it stands in front of, so that a misreading of Azure's wire format cannot hide in both.
DEVTOOLS: dict[str, tuple[str, frozenset[str]]] = {
    "simulator": ("the Azure OpenAI simulator", frozenset()),
    "funchost": ("the local Functions host, its routing and timers, the worker it starts", frozenset()),
    "deploy": ("make deploy: az, model versions, accounts, the package it uploads, the Bicep checks", frozenset()),
    "local": (
        "make run, Azurite, the benchmark's plain host",
        frozenset({"devtools.simulator", "devtools.funchost", "proxy"}),
    ),
}

MAX_LINES = 500  # a module longer than this is split by concern (docs/STYLE: "Split anything that nears 500 lines")

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
    importable = {**known, **modules(root, "devtools")}
    order = {layer: index for index, (layer, _) in enumerate(LAYERS)}
    graph: dict[str, set[str]] = {}
    found = []
    for name, path in known.items():
        graph[name] = set()
        for target, line in imports(name, path, importable):
            where = f"{path.relative_to(root)}:{line}"
            if target.split(".")[0] == "devtools":
                found.append(f"{where}: {name} imports {target}: the proxy never imports its dev tools")
                continue
            graph[name].add(target)
            layer, target_layer = layer_of(name), layer_of(target)
            if layer is not None and target_layer is not None and order[target_layer] > order[layer]:
                found.append(f"{where}: {name} ({layer}) imports {target} ({target_layer}), a layer above it")
        if name != "proxy" and layer_of(name) is None:
            found.append(f"{name} is in no layer: give it a package (and a place in LAYERS)")
    found += [f"import circle: {' -> '.join([*cycle, cycle[0]])}" for cycle in cycles(graph)]
    return found


def devtools_problems(root: Path) -> list[str]:
    """Every import of a devtools module that ``DEVTOOLS`` does not allow, every circle, every module in no
    package of ``DEVTOOLS``; empty when the layout holds."""
    known = modules(root, "devtools")
    importable = {**known, **modules(root)}
    graph: dict[str, set[str]] = {}
    found = []
    for name, path in known.items():
        graph[name] = set()
        package = ".".join(name.split(".")[:2])
        allowed = DEVTOOLS.get(package.partition(".")[2], ("", frozenset()))[1]
        if name != "devtools" and package.partition(".")[2] not in DEVTOOLS:
            found.append(f"{name} is in no package of devtools: give it one (and a place in DEVTOOLS)")
        for target, line in imports(name, path, importable):
            graph[name].add(target)
            reached = "proxy" if target.split(".")[0] == "proxy" else ".".join(target.split(".")[:2])
            if reached not in (package, *allowed):
                where = f"{path.relative_to(root)}:{line}"
                found.append(f"{where}: {name} imports {target}, which {package} may not import (DEVTOOLS)")
    found += [f"import circle: {' -> '.join([*cycle, cycle[0]])}" for cycle in cycles(graph)]
    return found


def long_modules(root: Path) -> list[str]:
    """Every module of ``proxy/`` and ``devtools/`` over ``MAX_LINES`` lines, with its count."""
    found = []
    for package in ("proxy", "devtools"):
        for path in modules(root, package).values():
            lines = len(path.read_text().splitlines())
            if lines > MAX_LINES:
                found.append(f"{path.relative_to(root)}: {lines} lines, over {MAX_LINES}: split it by concern")
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


def test_devtools_packages_import_only_what_they_may() -> None:
    assert devtools_problems(ROOT) == []


def test_what_devtools_may_import_points_one_way() -> None:
    """The arrows ``DEVTOOLS`` allows between its packages form no circle (else "one way" would mean nothing)."""
    allowed = {f"devtools.{name}": {t for t in may if t != "proxy"} for name, (_, may) in DEVTOOLS.items()}
    assert cycles(allowed) == []
    assert all(target in allowed for targets in allowed.values() for target in targets)


def test_no_module_is_over_the_line_limit() -> None:
    assert long_modules(ROOT) == []


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


def test_the_devtools_check_sees_each_kind_of_fault(tmp_path: Path) -> None:
    """The devtools check itself, and the proxy's check of imports of devtools, and the line count."""
    root = _tree(
        tmp_path,
        {
            "proxy/__init__.py": "",
            "proxy/errors.py": "",
            "proxy/config/__init__.py": "",
            "proxy/config/settings.py": "def f():\n    import devtools.local.run\n",
            "devtools/__init__.py": "",
            "devtools/simulator/__init__.py": "",
            "devtools/simulator/server.py": "from proxy.errors import ProxyError\n",
            "devtools/funchost/__init__.py": "",
            "devtools/funchost/host.py": "from devtools.simulator import server\n" + "x = 1\n" * MAX_LINES,
            "devtools/local/__init__.py": "",
            "devtools/local/run.py": "from proxy.config import settings\nfrom . import azurite\n",
            "devtools/local/azurite.py": "from devtools.simulator import server\nfrom devtools.local import run\n",
            "devtools/stray.py": "",
        },
    )
    found = devtools_problems(root)
    assert (
        "devtools/simulator/server.py:1: devtools.simulator.server imports proxy.errors, "
        "which devtools.simulator may not import (DEVTOOLS)" in found
    )
    assert (
        "devtools/funchost/host.py:1: devtools.funchost.host imports devtools.simulator.server, "
        "which devtools.funchost may not import (DEVTOOLS)" in found
    )
    assert "import circle: devtools.local.azurite -> devtools.local.run -> devtools.local.azurite" in found
    assert "devtools.stray is in no package of devtools: give it one (and a place in DEVTOOLS)" in found
    assert len(found) == 4, found  # local's imports of the proxy and of the simulator are allowed
    assert (
        "proxy/config/settings.py:2: proxy.config.settings imports devtools.local.run: the proxy never imports "
        "its dev tools" in problems(root)
    )
    assert long_modules(root) == [
        f"devtools/funchost/host.py: {MAX_LINES + 1} lines, over {MAX_LINES}: split it by concern"
    ]


def test_each_package_says_what_it_holds_and_names_what_it_imports() -> None:
    """A package's docstring names every package its modules import (``proxy.storage``, ``devtools.simulator``)."""
    known = {**modules(ROOT), **modules(ROOT, "devtools")}
    found = []
    for name, path in known.items():
        if path.name != "__init__.py" or name in ("proxy", "devtools"):
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
