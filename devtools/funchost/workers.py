"""The host's side of the worker conversation: the gRPC stream, and one worker process's life.

The host listens on a gRPC port; each worker it starts connects, sends ``StartStream`` with
the id it was started with, and from then on the two exchange ``StreamingMessage``s on that
one stream. The host then sends, in order: ``WorkerInitRequest`` (the worker imports
``function_app.py`` here and starts its HTTP server), ``FunctionsMetadataRequest`` (one entry
per function, bindings as raw JSON), one ``FunctionLoadRequest`` per function, and then an
``InvocationRequest`` per call. Answers are matched to requests by their kind and their
function or invocation id.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc  # type: ignore[import-untyped]

from devtools.funchost.routing import HostConfig, Route, Router, route_from_binding

ROOT = Path(__file__).resolve().parents[2]
HOST_VERSION = "4.1044.0"  # a Functions host version of 2026, as Azure reports it
SERVICE = "AzureFunctionsRpcMessages.FunctionRpc"


class WorkerGone(Exception):
    """The worker process died or its stream closed before answering."""


class StartupFailed(Exception):
    """The worker could not index or load the function app; the message says why."""


@dataclass(frozen=True)
class TimerFunction:
    function_id: str
    name: str
    parameter: str
    schedule: str
    run_on_startup: bool


@dataclass
class Worker:
    """One worker process, its stream, and what the host learnt from it."""

    worker_id: str
    process: asyncio.subprocess.Process
    protos: ModuleType
    outgoing: asyncio.Queue[Any] = field(default_factory=asyncio.Queue)
    pending: dict[str, asyncio.Future[Any]] = field(default_factory=dict)
    connected: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    router: Router = field(default_factory=lambda: Router([]))
    timers: list[TimerFunction] = field(default_factory=list)
    http_uri: str = ""
    gone: bool = False

    @property
    def pid(self) -> int:
        return self.process.pid

    def request(self, key: str, **content: Any) -> asyncio.Future[Any]:
        """Send a message; the future gets the answer filed under ``key``."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if self.gone:
            future.set_exception(WorkerGone(f"worker pid={self.pid} is gone"))
            return future
        self.pending[key] = future
        self.outgoing.put_nowait(self.protos.StreamingMessage(request_id=self.worker_id, **content))
        return future

    def resolve(self, message: Any) -> None:
        kind = message.WhichOneof("content")
        body: Any = getattr(message, kind) if kind else None
        if kind == "worker_init_response":
            key = "init"
        elif kind == "function_metadata_response":
            key = "metadata"
        elif kind == "function_load_response":
            key = f"load:{body.function_id}"
        elif kind == "invocation_response":
            key = f"invocation:{body.invocation_id}"
        elif kind == "rpc_log":
            print(f"worker: {body.message}", flush=True)
            return
        else:
            return
        future = self.pending.pop(key, None)
        if future is not None and not future.done():
            future.set_result(body)

    def stream_closed(self) -> None:
        self.gone = True
        for future in self.pending.values():
            if not future.done():
                future.set_exception(WorkerGone(f"worker pid={self.pid} is gone"))
                future.exception()  # retrieved: nobody may be waiting any more
        self.pending.clear()

    def kill(self) -> None:
        """SIGKILL, as the host ends a worker: no signal the worker could handle."""
        self.gone = True
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, signal.SIGKILL)


class WorkerChannel:
    """The host's gRPC server: pairs each incoming stream with the worker started with its id."""

    def __init__(self, protos: ModuleType) -> None:
        self.protos = protos
        self.expected: dict[str, Worker] = {}
        self.server: Any = None
        self.port = 0

    async def start(self) -> None:
        options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
        self.server = grpc.aio.server(options=options)
        handler = grpc.stream_stream_rpc_method_handler(
            self._event_stream,
            request_deserializer=self.protos.StreamingMessage.FromString,
            response_serializer=self.protos.StreamingMessage.SerializeToString,
        )
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {"EventStream": handler}),))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(0)

    async def _event_stream(self, request_iterator: AsyncIterator[Any], context: Any) -> None:
        first = await context.read()
        if first is grpc.aio.EOF or first.WhichOneof("content") != "start_stream":
            return
        worker = self.expected.pop(first.start_stream.worker_id, None)
        if worker is None:
            return
        worker.connected.set_result(None)
        reader = asyncio.create_task(self._read(context, worker))
        try:
            while (message := await worker.outgoing.get()) is not None:
                await context.write(message)
        finally:
            reader.cancel()
            worker.stream_closed()

    async def _read(self, context: Any, worker: Worker) -> None:
        try:
            while (message := await context.read()) is not grpc.aio.EOF:
                worker.resolve(message)
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            pass
        finally:
            worker.outgoing.put_nowait(None)


def worker_environment(app_dir: Path) -> dict[str, str]:
    """What the host adds to the app settings for the Python worker."""
    return {
        **os.environ,
        "FUNCTIONS_WORKER_RUNTIME": "python",
        "FUNCTIONS_WORKER_RUNTIME_VERSION": f"{sys.version_info.major}.{sys.version_info.minor}",
        "PYTHON_ENABLE_INIT_INDEXING": os.environ.get("PYTHON_ENABLE_INIT_INDEXING", "1"),
        "AzureWebJobsScriptRoot": str(app_dir),
        "PYTHONUNBUFFERED": "1",
    }


def _failure(what: str, result: Any) -> StartupFailed:
    exception = result.exception
    detail = exception.message or "(no message)"
    if exception.stack_trace:
        detail += "\n" + exception.stack_trace.rstrip()
    return StartupFailed(f"{what}: {detail}")


async def start_worker(channel: WorkerChannel, app_dir: Path, config: HostConfig, timeout: float = 120) -> Worker:
    """Start a worker process and take it through init, metadata and load; raises ``StartupFailed``."""
    protos = channel.protos
    worker_id = str(uuid.uuid4())
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "devtools.funchost.language_worker",
        "--host",
        "127.0.0.1",
        "--port",
        str(channel.port),
        "--worker-id",
        worker_id,
        "--request-id",
        str(uuid.uuid4()),
        "--functions-uri",
        str(app_dir),
        cwd=ROOT,
        env=worker_environment(app_dir),
        # Its own session: Ctrl-C in the terminal reaches the host, which kills the worker.
        start_new_session=True,
    )
    worker = Worker(worker_id, process, protos)
    channel.expected[worker_id] = worker
    try:
        await _initialise(worker, app_dir, config, timeout)
    except BaseException:
        channel.expected.pop(worker_id, None)
        worker.kill()
        await process.wait()
        raise
    return worker


async def _answer(worker: Worker, future: asyncio.Future[Any], what: str, timeout: float) -> Any:
    exited = asyncio.ensure_future(worker.process.wait())
    try:
        done, _ = await asyncio.wait({future, exited}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        exited.cancel()
    if future in done and future.exception() is None:
        return future.result()
    if worker.process.returncode is not None:
        raise StartupFailed(f"the worker exited with code {worker.process.returncode} during {what}")
    if not done:
        raise StartupFailed(f"the worker did not answer {what} within {timeout:.0f} s")
    raise StartupFailed(f"the worker's stream closed during {what}")


async def _initialise(worker: Worker, app_dir: Path, config: HostConfig, timeout: float) -> None:
    protos = worker.protos
    await _answer(worker, worker.connected, "start-up (StartStream)", timeout)
    init = protos.WorkerInitRequest(
        host_version=HOST_VERSION,
        function_app_directory=str(app_dir),
        worker_directory=str(ROOT / "devtools"),
        capabilities={"HandlesWorkerTerminateMessage": "false"},
    )
    response = await _answer(worker, worker.request("init", worker_init_request=init), "WorkerInitRequest", timeout)
    if response.result.status != protos.StatusResult.Success:
        raise _failure("indexing the function app failed", response.result)
    worker.http_uri = response.capabilities.get("HttpUri", "")
    if not worker.http_uri:
        raise StartupFailed(
            "the worker started no HTTP server: the app must use the HTTP streams extension "
            "(azurefunctions-extensions-http-fastapi), the only model this emulator serves"
        )
    metadata = await _answer(
        worker,
        worker.request(
            "metadata", functions_metadata_request=protos.FunctionsMetadataRequest(function_app_directory=str(app_dir))
        ),
        "FunctionsMetadataRequest",
        timeout,
    )
    if metadata.result.status != protos.StatusResult.Success:
        raise _failure("reading the functions' metadata failed", metadata.result)
    functions = list(metadata.function_metadata_results)
    if not functions:
        raise StartupFailed(f"no functions found in {app_dir / 'function_app.py'}")
    loads = [
        worker.request(
            f"load:{function.function_id}",
            function_load_request=protos.FunctionLoadRequest(function_id=function.function_id, metadata=function),
        )
        for function in functions
    ]
    for function, load in zip(functions, loads, strict=True):
        loaded = await _answer(worker, load, f"FunctionLoadRequest ({function.name})", timeout)
        if loaded.result.status != protos.StatusResult.Success:
            raise _failure(f"loading function {function.name} failed", loaded.result)
    routes: list[Route] = []
    for function in functions:
        for raw in function.raw_bindings:
            binding = json.loads(raw)
            kind = binding.get("type")
            if kind == "httpTrigger":
                routes.append(route_from_binding(function.function_id, function.name, binding, config.route_prefix))
            elif kind == "timerTrigger":
                worker.timers.append(
                    TimerFunction(
                        function.function_id,
                        function.name,
                        str(binding.get("name", "timer")),
                        str(binding.get("schedule", "")),
                        bool(binding.get("runOnStartup", False)),
                    )
                )
    worker.router = Router(routes)


def elapsed_since(start: float) -> str:
    return f"{time.monotonic() - start:.2f} s"
