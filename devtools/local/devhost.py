"""A plain ASGI host for the registered Azure Functions: the proxy alone, without Azure's request path.

Only the benchmark uses it now (``bench/run.py``'s ``proxy`` rows), to measure the proxy
itself next to the same app behind the host emulator (``worker`` rows). ``make run`` and
the tests run the functions under the real Python worker behind ``devtools/funchost/host.py``,
which behaves like the Functions host; this one does not (no body limit, no
``functionTimeout``, exceptions become uvicorn's 500, and it drains on shutdown).

It imports ``function_app``, reads the HTTP triggers registered on its
``FunctionApp`` (one route table: the app's own), serves them with uvicorn
under the route prefix from ``host.json``, and calls the very same handlers
with a FastAPI ``Request`` whose ``path_params`` hold the route's parameters,
as the HTTP streams extension does. Literal routes win over parameterised
ones, and a catch-all (``{*name}``) comes last, as in the Functions host.

    python -m devtools.local.devhost --port 7071

On shutdown (Ctrl-C, SIGTERM) it awaits ``function_app.proxy.aclose()`` when
the app has one, so pending usage is stored before the process ends.
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import socket
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import Request

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

_PARAM = re.compile(r"\{(\*?)([A-Za-z_][A-Za-z0-9_]*)(?::[^}]*)?(\??)\}")


@dataclass(frozen=True)
class Route:
    pattern: re.Pattern[str]
    methods: frozenset[str]
    function: Callable[[Request], Awaitable[Any]]
    rank: tuple[int, int]


def compile_route(prefix: str, template: str) -> tuple[re.Pattern[str], tuple[int, int]]:
    """A Functions route template as a regex, and its precedence (lower wins)."""
    parts: list[str] = []
    position = 0
    params = catch_all = 0
    for match in _PARAM.finditer(template):
        parts.append(re.escape(template[position : match.start()]))
        star, name, optional = match.groups()
        if star:
            parts.append(f"(?P<{name}>.*)")
            catch_all = 1
        else:
            parts.append(f"(?P<{name}>[^/]+)" + ("?" if optional else ""))
            params += 1
        position = match.end()
    parts.append(re.escape(template[position:]))
    root = f"/{prefix.strip('/')}/" if prefix.strip("/") else "/"
    return re.compile(re.escape(root) + "".join(parts) + "/?"), (catch_all, params)


def load_routes(module_name: str, app_dir: Path) -> tuple[Any, list[Route]]:
    """Import the function app and turn its HTTP triggers into routes."""
    sys.path.insert(0, str(app_dir))
    module = importlib.import_module(module_name)
    prefix = json.loads((app_dir / "host.json").read_text())["extensions"]["http"].get("routePrefix", "api")
    routes = []
    for function in module.app.get_functions():
        trigger = next((b for b in function.get_bindings() if b.type == "httpTrigger"), None)
        if trigger is None:  # timer functions: the dev host serves HTTP only
            continue
        pattern, rank = compile_route(prefix, trigger.route)
        methods = frozenset(str(getattr(m, "value", m)).upper() for m in trigger.methods or ["GET", "POST"])
        routes.append(Route(pattern, methods, function.get_user_function(), rank))
    routes.sort(key=lambda r: r.rank)
    return module, routes


class DevHost:
    """The ASGI app: routing, lifespan, and nothing else."""

    def __init__(self, module: Any, routes: list[Route], on_ready: Callable[[], None] = lambda: None) -> None:
        self.module = module
        self.routes = routes
        self.on_ready = on_ready

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        path, method = scope["path"], scope["method"]
        for route in self.routes:
            match = route.pattern.fullmatch(path)
            if match is None or method not in route.methods:
                continue
            scope["path_params"] = {k: v for k, v in match.groupdict().items() if v is not None}
            response = await route.function(Request(scope, receive))
            await response(scope, receive, send)
            return
        body = b'{"error":{"message":"Not found","type":"invalid_request_error","code":"not_found","param":null}}'
        await send({"type": "http.response.start", "status": 404, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
                self.on_ready()
            elif message["type"] == "lifespan.shutdown":
                proxy = getattr(self.module, "proxy", None)
                if proxy is not None:
                    await proxy.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7071, help="0 picks a free port")
    parser.add_argument("--app", default="function_app", help="module holding the FunctionApp")
    parser.add_argument("--app-dir", type=Path, default=Path.cwd())
    args = parser.parse_args(argv)
    module, routes = load_routes(args.app, args.app_dir.resolve())
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    # Listening before uvicorn starts: connections made once the line is printed
    # wait in the backlog instead of being refused.
    sock.listen(2048)
    port = sock.getsockname()[1]

    def ready() -> None:
        print(f"proxy listening on http://{args.host}:{port}/api", flush=True)

    app = DevHost(module, routes, ready)
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on", timeout_graceful_shutdown=30)
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    main()
