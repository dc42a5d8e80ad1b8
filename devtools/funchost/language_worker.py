"""The Python language-worker process that the host emulator starts, one at a time.

In Azure the Functions host starts the Python worker with the address of its gRPC server; a
thin dispatcher in the worker (the "proxy worker") opens the bidirectional ``EventStream``,
sends ``StartStream`` and hands every host message to the worker library,
``azure_functions_runtime``, which indexes ``function_app.py``, starts the HTTP-streams server
(uvicorn with the FastAPI extension) and runs the functions. This module is that dispatcher,
written for the emulator: the library it drives is the real one, unchanged.

    python -m devtools.funchost.language_worker --host 127.0.0.1 --port PORT --worker-id ID \\
        --request-id ID --functions-uri APP_DIR

What it does as Azure's does: it sets ``PYTHON_ENABLE_INIT_INDEXING`` (needed by the 3.11
worker for HTTP streams) unless the host set it, puts the app directory first on
``sys.path`` and makes it the working directory, answers each request in order except
invocations, which run concurrently, and runs uvicorn on the worker's plain asyncio loop (not
``uvloop``), with ``httptools`` as its parser only if the app's ``requirements.txt`` ships it, as
in Azure, where uvicorn comes from the app's packages (h11 otherwise). It handles no
``WorkerTerminate`` (the Python worker declares no support for it), so the host's only way to
stop it is to kill it. It exits when the host's
stream ends, so a worker never outlives its host.

What differs: logs are written to this process's stderr instead of being sent to the host as
``RpcLog`` messages; the library's own INFO lines (``azure.functions``) and uvicorn's access
lines are left out, as ``host.json``'s ``"default": "Warning"`` leaves them out in Azure. What
the app and the Azure SDKs it uses log during an invocation is kept at INFO, as Azure's
``"Function": "Information"`` sends it to Application Insights; ``PYTHON_ENABLE_DEBUG_LOGGING=1``
turns DEBUG on, as it does in Azure.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc  # type: ignore[import-untyped]

from devtools.funchost import protos as funcprotos

log = logging.getLogger("funcworker")

# The message the host sends -> the library's handler, and the field of its answer.
RuntimeHandler = Callable[[Any], Awaitable[Any]]


@dataclass(frozen=True)
class HostMessage:
    """What the library's handlers take: the message and the properties the proxy worker gives them."""

    request: Any
    properties: dict[str, Any]


@dataclass
class Dispatcher:
    protos: ModuleType
    runtime: ModuleType
    host: str
    worker_id: str
    request_id: str
    outgoing: asyncio.Queue[Any] = field(default_factory=asyncio.Queue)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def handlers(self) -> dict[str, tuple[str, RuntimeHandler]]:
        runtime = self.runtime
        return {
            "worker_init_request": ("worker_init_response", runtime.worker_init_request),
            "functions_metadata_request": ("function_metadata_response", runtime.functions_metadata_request),
            "function_load_request": ("function_load_response", runtime.function_load_request),
            "invocation_request": ("invocation_response", runtime.invocation_request),
            "function_environment_reload_request": (
                "function_environment_reload_response",
                runtime.function_environment_reload_request,
            ),
        }

    def send(self, **content: Any) -> None:
        self.outgoing.put_nowait(self.protos.StreamingMessage(request_id=self.request_id, **content))

    async def run(self, address: str) -> None:
        options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
        async with grpc.aio.insecure_channel(address, options=options) as channel:
            await asyncio.wait_for(channel.channel_ready(), 30)
            call = self.protos.FunctionRpcStub(channel).EventStream()
            writer = asyncio.create_task(self._write(call))
            self.send(start_stream=self.protos.StartStream(worker_id=self.worker_id))
            handlers = self.handlers()
            try:
                while True:
                    message = await call.read()
                    if message is grpc.aio.EOF:
                        return
                    await self._dispatch(message, handlers)
            finally:
                writer.cancel()

    async def _write(self, call: Any) -> None:
        while True:
            await call.write(await self.outgoing.get())

    async def _dispatch(self, message: Any, handlers: dict[str, tuple[str, RuntimeHandler]]) -> None:
        kind = message.WhichOneof("content")
        if kind == "worker_status_request":
            self.send(worker_status_response=self.protos.WorkerStatusResponse())
            return
        if kind not in handlers:
            log.debug("ignoring %s from the host", kind)
            return
        answer_field, handler = handlers[kind]
        wrapped = HostMessage(message, {"host": self.host, "protos": self.protos})
        if kind == "invocation_request":
            task = asyncio.create_task(self._answer(answer_field, handler, wrapped))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        else:
            await self._answer(answer_field, handler, wrapped)

    async def _answer(self, answer_field: str, handler: RuntimeHandler, message: HostMessage) -> None:
        self.send(**{answer_field: await handler(message)})


def configure_logging() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    debug = os.environ.get("PYTHON_ENABLE_DEBUG_LOGGING", "").lower() in ("1", "true")
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    logging.getLogger("azure.functions").setLevel(logging.WARNING)
    # uvicorn reconfigures its loggers when the library starts it; filters survive that.
    logging.getLogger("uvicorn.access").addFilter(lambda record: False)
    logging.getLogger("uvicorn.error").addFilter(lambda record: record.levelno >= logging.WARNING)


def hide_unshipped_parser(app_dir: Path) -> None:
    """Hide ``httptools`` unless the app ships it: in Azure uvicorn sees only the app's packages.

    This venv has it for the tools (``uvicorn[standard]``), so without this the worker would parse
    HTTP faster here than in Azure whenever the app's ``requirements.txt`` leaves it out. The app
    ships it by naming it, or through ``uvicorn[standard]`` (whose extras include it).
    """
    requirements = app_dir / "requirements.txt"
    text = requirements.read_text(encoding="utf-8") if requirements.exists() else ""
    if not re.search(r"^\s*(httptools\b|uvicorn\s*\[[^\]]*\bstandard\b)", text, re.MULTILINE | re.IGNORECASE):
        sys.modules.setdefault("httptools", None)  # type: ignore[arg-type]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", required=True, help="the host's gRPC address; also where the HTTP server listens")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--worker-id", required=True)
    parser.add_argument("--request-id", required=True)
    parser.add_argument("--functions-uri", type=Path, required=True, help="the function app directory")
    args = parser.parse_args(argv)

    os.environ.setdefault("PYTHON_ENABLE_INIT_INDEXING", "1")
    os.environ.setdefault("FUNCTIONS_WORKER_RUNTIME", "python")
    app_dir = str(args.functions_uri.resolve())
    hide_unshipped_parser(Path(app_dir))
    os.chdir(app_dir)
    if app_dir not in sys.path:
        sys.path.insert(0, app_dir)
    configure_logging()

    protos = funcprotos.load()
    import azure_functions_runtime as runtime  # type: ignore[import-untyped]

    runtime.start_threadpool_executor()
    # ``-m devtools.funchost.language_worker`` put this repository on sys.path; the app sees only its own directory.
    tools_root = str(Path(__file__).resolve().parents[2])
    if tools_root != app_dir:
        sys.path[:] = [entry for entry in sys.path if entry not in ("", tools_root)]
    dispatcher = Dispatcher(protos, runtime, args.host, args.worker_id, args.request_id)
    # Not asyncio.run: its clean-up would cancel the HTTP server and wait for it.
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        loop.run_until_complete(dispatcher.run(f"{args.host}:{args.port}"))
    except (grpc.aio.AioRpcError, TimeoutError) as error:
        reason = error.details() if isinstance(error, grpc.aio.AioRpcError) else "no answer"
        print(f"worker pid={os.getpid()}: the host went away ({reason}); exiting", file=sys.stderr, flush=True)
    # The HTTP server and any invocation die with the process, as when the host kills it.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
