"""A small Azure Functions host emulator: the registered functions under the real Python worker.

It does, for machines without Azure Functions Core Tools, what the Functions host does with a
Python app that uses the HTTP streams extension:

- starts the language worker (``devtools/funchost/language_worker.py`` driving the real worker library,
  ``azure_functions_runtime``) as a separate process and speaks the host's side of the gRPC
  protocol: start stream, worker init with indexing, functions metadata, function load,
  invocations. If indexing fails it prints the worker's exception and exits with code 1;
- routes each request as the host does (``devtools/funchost/routing.py``), reads the whole
  request body first (limit ``FUNCTIONS_REQUEST_BODY_SIZE_LIMIT``, default 104857600 bytes,
  a bare 413 over it), then forwards it to the worker's HTTP server with
  ``x-ms-invocation-id`` (``Host`` dropped, ``X-Forwarded-*`` set, connect retries) while
  sending the ``InvocationRequest`` with the route parameters; the answer streams back
  chunk by chunk, never buffered, and a client that hangs up closes the worker's stream;
- enforces ``functionTimeout`` from ``host.json`` (``AzureFunctionsJobHost__functionTimeout``
  overrides it, as in Azure) from the invocation until its response ends, by killing the
  worker; restarts the worker whenever it dies; requests that arrive meanwhile wait for it;
- on SIGTERM, SIGINT or SIGHUP kills the worker with SIGKILL at once: no drain, no lifespan
  shutdown, exactly as the host ends a worker on scale-in, restart or deployment;
- invokes timer-triggered functions on their NCRONTAB schedule (``--timer-interval`` makes
  every timer fire every N seconds instead; 0 turns timers off).

    python -m devtools.funchost --port 7071 [--app-dir .] [--settings-file local.settings.json]
        [--timer-interval SECONDS]

It prints ``worker started pid=N`` each time a worker is ready (so tests can kill it) and,
once, ``proxy listening on http://HOST:PORT/api``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import os
import signal
import socket
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Generator
from datetime import timedelta
from pathlib import Path
from types import FrameType
from typing import Any

import aiohttp
import uvicorn
import yarl

from devtools.funchost import protos as funcprotos
from devtools.funchost.routing import HostConfig, Route
from devtools.funchost.timers import TimerRunner
from devtools.funchost.workers import StartupFailed, Worker, WorkerChannel, WorkerGone, elapsed_since, start_worker

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

DEFAULT_BODY_LIMIT = 104_857_600
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade", "host"}
)
CONNECT_RETRIES = 10
WORKER_WAIT = 120.0  # how long a request waits for a worker that is (re)starting


class ResponseCut(Exception):
    """The worker's response broke off after it had started: the client gets a truncated body."""


class Supervisor:
    """Keeps one worker running: starts it, restarts it when it dies, kills it on demand."""

    def __init__(self, channel: WorkerChannel, app_dir: Path, config: HostConfig, timer_interval: float | None) -> None:
        self.channel = channel
        self.app_dir = app_dir
        self.config = config
        self.timer_interval = timer_interval
        self.worker: Worker | None = None
        self.ready = asyncio.Event()
        self.stopping = False
        self.failure: StartupFailed | None = None

    async def start(self) -> Worker:
        started = time.monotonic()
        worker = await start_worker(self.channel, self.app_dir, self.config)
        self.worker = worker
        self.ready.set()
        print(
            f"worker started pid={worker.pid} ({len(worker.router.routes)} HTTP functions,"
            f" {len(worker.timers)} timers, {elapsed_since(started)})",
            flush=True,
        )
        return worker

    async def supervise(self, first: Worker) -> None:
        """Wait for the worker to die and start another, as the host does, until stopped."""
        worker = first
        while True:
            if self.stopping:  # stopped while this worker was starting
                worker.kill()
            timers = TimerRunner(worker, self.timer_interval)
            timers.start()
            code = await worker.process.wait()
            timers.stop()
            self.ready.clear()
            if self.stopping:
                return
            print(f"worker pid={worker.pid} exited with code {code}; restarting it", flush=True)
            try:
                worker = await self.start()
            except StartupFailed as failure:
                self.failure = failure
                print(f"the worker could not be restarted: {failure}", file=sys.stderr, flush=True)
                return

    async def current(self) -> Worker | None:
        if not self.ready.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.ready.wait(), WORKER_WAIT)
        return self.worker if self.ready.is_set() else None

    def kill(self, worker: Worker, reason: str) -> None:
        """Kill ``worker`` if it is still the one serving (a late timer must not kill its successor)."""
        if worker is self.worker and worker.process.returncode is None and not worker.gone:
            print(f"killing worker pid={worker.pid}: {reason}", flush=True)
            self.ready.clear()
            worker.kill()

    def stop(self) -> None:
        self.stopping = True
        if self.worker is not None:
            self.worker.kill()


class FrontEnd:
    """The ASGI app in front of the worker: routing, body limit, forwarding, timeouts."""

    def __init__(self, supervisor: Supervisor, body_limit: int, function_timeout: timedelta | None) -> None:
        self.supervisor = supervisor
        self.body_limit = body_limit
        self.function_timeout = function_timeout.total_seconds() if function_timeout else None
        self.session: aiohttp.ClientSession | None = None

    def client(self) -> aiohttp.ClientSession:
        if self.session is None:
            self.session = aiohttp.ClientSession(
                # Idle connections go before the worker's uvicorn closes them (5 s), so none is reused closed.
                connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=4),
                # The front end cuts a response at 230 s; YARP's idle timeout is 240 s.
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=240),
                auto_decompress=False,
                skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
            )
        return self.session

    async def aclose(self) -> None:
        if self.session is not None:
            await self.session.close()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        worker = await self.supervisor.current()
        if worker is None:
            await bare(send, 503)
            return
        matched = worker.router.match(scope["method"], scope["path"])
        if matched is None:
            await bare(send, 404)
            return
        body = await read_body(scope, receive, self.body_limit)
        if body is None:
            await bare(send, 413)
            return
        route, parameters = matched
        completed = asyncio.Event()

        async def send_and_note(message: dict[str, Any]) -> None:
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                completed.set()

        forwarding = asyncio.create_task(self._invoke(worker, route, parameters, scope, body, send_and_note))
        hangup: asyncio.Future[Any] = asyncio.ensure_future(receive())
        try:
            await asyncio.wait({forwarding, hangup}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            hangup.cancel()
            if not forwarding.done() and not completed.is_set():
                # The client hung up: close the worker's response so the function sees it.
                forwarding.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await forwarding

    async def _invoke(
        self, worker: Worker, route: Route, parameters: dict[str, str], scope: Scope, body: bytes, send: Send
    ) -> None:
        invocation_id = str(uuid.uuid4())
        protos = worker.protos
        http = protos.RpcHttp(params=parameters)
        request = protos.InvocationRequest(
            invocation_id=invocation_id,
            function_id=route.function_id,
            input_data=[protos.ParameterBinding(name=route.trigger_parameter, data=protos.TypedData(http=http))],
        )
        invocation = worker.request(f"invocation:{invocation_id}", invocation_request=request)
        invocation.add_done_callback(lambda done: report_failure(route.name, invocation_id, done))
        timer = None
        if self.function_timeout is not None:
            reason = f"functionTimeout ({self.function_timeout:g} s) expired for {route.name} ({invocation_id})"
            timer = asyncio.get_running_loop().call_later(self.function_timeout, self.supervisor.kill, worker, reason)
        try:
            await self._forward(worker, scope, body, invocation_id, send)
        finally:
            if timer is not None:
                timer.cancel()

    async def _forward(self, worker: Worker, scope: Scope, body: bytes, invocation_id: str, send: Send) -> None:
        target = worker.http_uri + scope["raw_path"].decode("latin-1")
        if scope["query_string"]:
            target += "?" + scope["query_string"].decode("latin-1")
        headers = forwarded_headers(scope, invocation_id)
        started = False
        try:
            async with await self._connect(scope["method"], yarl.URL(target, encoded=True), headers, body) as answer:
                response_headers = [
                    (name, value) for name, value in answer.raw_headers if name.lower().decode() not in HOP_BY_HOP
                ]
                await send({"type": "http.response.start", "status": answer.status, "headers": response_headers})
                started = True
                await relay_body(answer.content, send)
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except (aiohttp.ClientError, WorkerGone) as error:
            if started:
                raise ResponseCut(str(error)) from error
            await bare(send, 500)

    async def _connect(
        self, method: str, url: yarl.URL, headers: list[tuple[str, str]], body: bytes
    ) -> aiohttp.ClientResponse:
        # The worker's server may not listen yet right after init: the host retries connecting.
        for attempt in range(CONNECT_RETRIES):
            try:
                return await self.client().request(method, url, headers=headers, data=body, allow_redirects=False)
            except aiohttp.ClientConnectorError:
                if attempt == CONNECT_RETRIES - 1:
                    raise
                await asyncio.sleep(min(0.05 * (attempt + 1), 0.25))
        raise AssertionError("unreachable")


async def relay_body(content: aiohttp.StreamReader, send: Send) -> None:
    """Send the worker's body on as it arrives, including what came just before its connection broke.

    aiohttp raises a broken connection's error before handing over bytes it had already
    received (when both arrive in one loop iteration); YARP forwards those bytes first, so
    this does too, then lets the error cut the client's response.
    """
    try:
        async for chunk in content.iter_any():
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
    except aiohttp.ClientPayloadError:
        received = content._read_nowait(-1)
        if received:
            await send({"type": "http.response.body", "body": received, "more_body": True})
        raise


def report_failure(function: str, invocation_id: str, done: asyncio.Future[Any]) -> None:
    """The host's log line for a failed invocation (the client got the worker's bare 500)."""
    if done.cancelled() or done.exception() is not None:
        return
    result = done.result().result
    if result.status == result.Failure:
        exception = result.exception
        print(
            f"Executed 'Functions.{function}' (Failed, Id={invocation_id}): {exception.message}\n"
            f"{exception.stack_trace.rstrip()}",
            file=sys.stderr,
            flush=True,
        )


async def bare(send: Send, status: int) -> None:
    """An empty answer, as the host gives for 404, 413 and a dead worker."""
    await send({"type": "http.response.start", "status": status, "headers": [(b"content-length", b"0")]})
    await send({"type": "http.response.body", "body": b""})


async def read_body(scope: Scope, receive: Receive, limit: int) -> bytes | None:
    """The whole request body, or None when it is over ``limit`` bytes."""
    for name, value in scope["headers"]:
        if name == b"content-length" and value.isdigit() and int(value) > limit:
            return None
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"".join(chunks)
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def forwarded_headers(scope: Scope, invocation_id: str) -> list[tuple[str, str]]:
    """The client's headers as YARP forwards them: no Host, hop-by-hop or stale X-Forwarded-*."""
    headers: list[tuple[str, str]] = []
    host = ""
    for raw_name, raw_value in scope["headers"]:
        name = raw_name.decode("latin-1").lower()
        value = raw_value.decode("latin-1")
        if name == "host":
            host = value
        if name in HOP_BY_HOP or name == "content-length" or name.startswith("x-forwarded-"):
            continue
        headers.append((name, value))
    client = scope.get("client")
    if client:
        headers.append(("x-forwarded-for", str(client[0])))
    headers.append(("x-forwarded-proto", str(scope.get("scheme", "http"))))
    if host:
        headers.append(("x-forwarded-host", host))
    headers.append(("x-ms-invocation-id", invocation_id))
    return headers


class QuietCuts(logging.Filter):
    """uvicorn logs a response the app did not complete; here that is the worker's doing, already told."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], ResponseCut):
            return False
        return "without completing response" not in record.getMessage()


class Server(uvicorn.Server):
    """uvicorn, with the host's reaction to a stop signal: the worker is killed first."""

    def __init__(self, config: uvicorn.Config, supervisor: Supervisor) -> None:
        super().__init__(config)
        self.supervisor = supervisor
        self.listening = asyncio.Event()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        self.listening.set()

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in signals}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.supervisor.stop()
        self.should_exit = True


def body_limit(env: dict[str, str]) -> int:
    raw = env.get("FUNCTIONS_REQUEST_BODY_SIZE_LIMIT", "")
    if not raw:
        return DEFAULT_BODY_LIMIT
    if not raw.isdigit():
        raise SystemExit(f"FUNCTIONS_REQUEST_BODY_SIZE_LIMIT must be a number of bytes, not {raw!r}")
    return int(raw)


async def serve(args: argparse.Namespace) -> int:
    app_dir: Path = args.app_dir.resolve()
    config = HostConfig.read(app_dir, dict(os.environ))
    channel = WorkerChannel(funcprotos.load())
    await channel.start()
    supervisor = Supervisor(channel, app_dir, config, args.timer_interval)
    try:
        first = await supervisor.start()
    except StartupFailed as failure:
        print(f"error: {failure}", file=sys.stderr, flush=True)
        await channel.stop()
        return 1

    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say they are TCP,
    # and without it Nagle and the client's delayed ACK add 40 ms to every small answer.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError as error:
        supervisor.stop()
        raise SystemExit(f"cannot listen on {args.host}:{args.port}: {error}") from error
    sock.listen(2048)
    port = sock.getsockname()[1]
    front = FrontEnd(supervisor, body_limit(dict(os.environ)), config.function_timeout)
    logging.getLogger("uvicorn.error").addFilter(QuietCuts())
    server = Server(
        uvicorn.Config(
            front,
            lifespan="off",
            log_level="warning",
            access_log=False,
            server_header=False,
            date_header=False,
            timeout_keep_alive=230,
            timeout_graceful_shutdown=1,
        ),
        supervisor,
    )
    supervision = asyncio.create_task(supervisor.supervise(first))
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    await asyncio.wait({asyncio.ensure_future(server.listening.wait()), serving}, return_when=asyncio.FIRST_COMPLETED)
    prefix = config.route_prefix.strip("/")
    print(f"proxy listening on http://{args.host}:{port}" + (f"/{prefix}" if prefix else ""), flush=True)
    await asyncio.wait({supervision, serving}, return_when=asyncio.FIRST_COMPLETED)
    if not serving.done():
        # The worker could not be restarted: nothing left to serve.
        server.should_exit = True
        await serving
    supervisor.stop()
    await supervision
    await front.aclose()
    await channel.stop()
    return 1 if supervisor.failure is not None else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7071, help="0 picks a free port")
    parser.add_argument(
        "--app-dir", type=Path, default=Path.cwd(), help="the function app (function_app.py, host.json)"
    )
    parser.add_argument(
        "--timer-interval",
        type=float,
        default=None,
        help="fire timer-triggered functions every N seconds instead of on their schedule (0: never)",
    )
    parser.add_argument(
        "--settings-file",
        type=Path,
        default=None,
        help="a local.settings.json whose Values are app settings, as func start reads them (the environment wins)",
    )
    args = parser.parse_args(argv)
    if args.settings_file is not None:
        values = json.loads(args.settings_file.read_text()).get("Values", {})
        for name, value in values.items():
            os.environ.setdefault(name, str(value))
    # Azure's host is .NET: this Python stand-in should not add its young collections to every
    # request it forwards (3 % of its time at 64 concurrent requests). The worker's collector is
    # the app's to set (proxy.config.collector).
    gc.freeze()
    gc.set_threshold(10_000, *gc.get_threshold()[1:])
    return asyncio.run(serve(args))


if __name__ == "__main__":
    sys.exit(main())
