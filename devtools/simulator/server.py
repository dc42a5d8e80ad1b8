"""Azure OpenAI simulator: a fast, deterministic fake of the Azure OpenAI data plane.

It speaks Azure OpenAI's wire format over real HTTP so tests and benchmarks can use
it as the upstream of an OpenAI-compatible proxy. It is a raw ASGI app (no framework
routing) that serialises with orjson and is served by uvicorn.

Routes::

    POST /openai/deployments/{deployment}/chat/completions?api-version=...
    POST /openai/deployments/{deployment}/embeddings?api-version=...
    POST /openai/v1/responses, GET|DELETE /openai/v1/responses/{id},
    GET /openai/v1/responses/{id}/input_items   (the Responses API, ``devtools.simulator.responses``)
    GET  /_sim/stats     inspection counters (not Azure): requests, model calls by ``user``
                         (``by_user``), streams whose client left before their end (``abandoned``)
    POST /_sim/reset     zero the counters

Magic words in the last user message (chat and responses):

* ``SIM_CONTENT_FILTER``  -> 400 Azure content-filter error
* ``SIM_SERVER_ERROR``    -> 500 InternalServerError
* ``SIM_BREAK_STREAM``    -> streams abort the connection after 2 token chunks
* ``SIM_SLOW_MS=<n>``     -> extra n ms latency before responding

A stream whose client disconnects stops being generated, as Azure OpenAI's
does: only the tokens sent until then count in the usage figures.

Agents run against it: ``tools`` are called, tool results answered, ``response_format`` and
``text.format`` honoured, malformed ones refused with Azure's 400 (``devtools.simulator.tools``;
the answer worked out in ``devtools.simulator.chat`` and ``devtools.simulator.responses``).

Quotas, so that several instances can stand for backends in different regions
(``AZURE_OPENAI_BACKENDS``): ``--rpm-limit`` and ``--tpm-limit`` answer 429 with
``retry-after``, ``retry-after-ms`` and ``x-ratelimit-remaining-*`` once a
minute's requests or tokens are used; ``--throttle-fraction F`` answers that
share of chat and embeddings requests 429 whatever the quota, evenly spread
(0.5: every second one), asking for ``--throttle-retry-ms``; ``--fail-status
503`` answers every one with that status, a backend that is down.

CLI::

    python -m devtools.simulator --host 127.0.0.1 --port 0 [--latency-ms N] [--ttft-ms N]
        [--tokens-per-second N] [--rpm-limit N] [--tpm-limit N] [--throttle-fraction F]
        [--throttle-retry-ms N] [--fail-status S] [--api-key K] [--bearer-token T] [--completion-tokens N]

Options may also come from ``SIM_LATENCY_MS``, ``SIM_TTFT_MS``, ``SIM_TOKENS_PER_SECOND``,
``SIM_RPM_LIMIT``, ``SIM_API_KEY``, ``SIM_BEARER_TOKEN`` (the CLI wins).

The Azure wire format itself (bodies, error texts, vectors) lives in ``devtools.simulator.wire``; the
routes in ``devtools.simulator.deployment_routes`` and ``devtools.simulator.response_routes``, what they
share (knobs, counters, quota, auth) in ``devtools.simulator.core``.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket

from devtools.simulator.core import Receive, Scope, Send, SimulatorConfig, SuppressStreamBreak
from devtools.simulator.deployment_routes import DeploymentRoutes
from devtools.simulator.response_routes import ResponseRoutes
from devtools.simulator.wire import MSG_NOT_FOUND, error_body


class Simulator(DeploymentRoutes, ResponseRoutes):
    """The ASGI application; one instance holds its own counters and rate window."""

    # -- ASGI entry point -------------------------------------------------
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        method: str = scope["method"]
        if path.startswith("/_sim/"):
            if path == "/_sim/stats" and method == "GET":
                await self._send_json(send, 200, self.stats.as_json())
                return
            if path == "/_sim/reset" and method == "POST":
                self.reset()
                await self._send_json(send, 200, {"ok": True})
                return
            await self._send_json(send, 404, error_body("404", MSG_NOT_FOUND))
            return
        if path == "/openai/v1/responses" or path.startswith("/openai/v1/responses/"):
            await self._responses_http(scope, receive, send)
        else:
            await self._deployment_http(scope, receive, send)


def create_app(config: SimulatorConfig | None = None) -> Simulator:
    """Build the simulator ASGI app (``config`` defaults to ``SimulatorConfig()``)."""
    logger = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, SuppressStreamBreak) for f in logger.filters):
        logger.addFilter(SuppressStreamBreak())
    return Simulator(config or SimulatorConfig())


def _env(name: str) -> str | None:
    value = os.environ.get(name)
    return value if value else None


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m devtools.simulator", description="Azure OpenAI simulator")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080, help="0 picks a free port")
    parser.add_argument("--latency-ms", type=float, default=float(_env("SIM_LATENCY_MS") or 0))
    parser.add_argument("--ttft-ms", type=float, default=float(_env("SIM_TTFT_MS") or 0))
    parser.add_argument(
        "--tokens-per-second",
        type=float,
        default=float(_env("SIM_TOKENS_PER_SECOND") or 0),
    )
    parser.add_argument("--rpm-limit", type=int, default=int(_env("SIM_RPM_LIMIT") or 0))
    parser.add_argument("--tpm-limit", type=int, default=int(_env("SIM_TPM_LIMIT") or 0))
    parser.add_argument("--throttle-fraction", type=float, default=0.0, help="share of requests answered 429")
    parser.add_argument("--throttle-retry-ms", type=float, default=1000.0, help="the wait those 429s ask for")
    parser.add_argument("--fail-status", type=int, default=0, help="answer every request with this status")
    parser.add_argument("--api-key", default=_env("SIM_API_KEY"))
    parser.add_argument("--bearer-token", default=_env("SIM_BEARER_TOKEN"))
    parser.add_argument("--completion-tokens", type=int, default=12)
    parser.add_argument(
        "--deployment",
        action="append",
        default=[],
        metavar="NAME=KIND",
        help="serve this deployment instead of the defaults (repeatable); KIND: chat, embeddings or reasoning "
        "(chat that refuses max_tokens)",
    )
    return parser.parse_args(argv)


def _serve(app: Simulator, host: str, port: int) -> None:
    import uvicorn

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    # Listening before uvicorn starts: connections made once the line is printed wait in the backlog.
    sock.listen(2048)
    shown = f"[{host}]" if family == socket.AF_INET6 else host
    print(f"simulator listening on http://{shown}:{sock.getsockname()[1]}", flush=True)
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")
    uvicorn.Server(config).run(sockets=[sock])


def main(argv: list[str] | None = None) -> None:
    """Run the simulator from the command line."""
    args = _parse_args(argv)
    config = SimulatorConfig(
        api_key=args.api_key,
        bearer_token=args.bearer_token,
        latency_ms=args.latency_ms,
        ttft_ms=args.ttft_ms,
        tokens_per_second=args.tokens_per_second,
        completion_tokens=args.completion_tokens,
        rpm_limit=args.rpm_limit,
        tpm_limit=args.tpm_limit,
        throttle_fraction=args.throttle_fraction,
        throttle_retry_ms=args.throttle_retry_ms,
        fail_status=args.fail_status,
    )
    if args.deployment:
        config.deployments = dict(item.split("=", 1) for item in args.deployment)
    _serve(create_app(config), args.host, args.port)


if __name__ == "__main__":
    main()
