"""The access log: one line per request, written when its answer has ended.

Every handler goes through ``proxy.edge.handlers.answering``, which opens an
``Access`` entry on ``request.state.access``; the handlers fill in what they
learn (event, attendee, model, the usage record), and ``AccessLog.respond``
writes the line once the answer is complete: after a plain answer's body has
gone (so not on its latency: the line cost 0.16 ms, 4 % of a request at
concurrency 1), at the last chunk for a stream (the client's disconnect
included). The same moment ends the request's span and counts its metrics
(``proxy.observability.telemetry``).

The line is logfmt (``LOG_FORMAT=logfmt``, the default) or one JSON object
(``LOG_FORMAT=json``), logged at INFO on the ``proxy.edge.access`` logger, which
prints it on standard output (see ``_print_lines`` for why). It holds
the route template (``/api/v1/responses/{response_id}``), never the raw URL or
query, and no secret or content: no event code, key, token, organizer key,
prompt or answer. Values a client chooses (the attendee name, the model) are
quoted and escaped, so a line stays one line.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import orjson
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from proxy.config.settings import LogFormat, Settings
from proxy.observability.telemetry import Telemetry

if TYPE_CHECKING:
    from proxy.ledger.usage import UsageRecord

access_logger = logging.getLogger("proxy.access")
# A stream that ends with one of these events ended in an error after its 200 (proxy.edge.streaming).
_ERROR_EVENT = b'data: {"error":'
CLIENT_DISCONNECTED = "client_disconnected"


@dataclass(slots=True)
class Access:
    """What one request's access line says; filled in as the request goes."""

    request_id: str
    method: str
    route: str
    started_at: datetime
    perf_start: float
    status: int = 0
    error: str | None = None
    event_id: str | None = None
    attendee: str | None = None
    model: str | None = None
    backend: str | None = None
    stream: bool | None = None
    upstream_status: int | None = None
    upstream_attempts: int = 0
    first_chunk_ms: float | None = None
    latency_ms: float = 0.0
    record: UsageRecord | None = None
    span: Any = None  # the request's span, when telemetry is on

    @classmethod
    def start(cls, request: Request, request_id: str, path_params: dict[str, Any]) -> Access:
        route = getattr(request.state, "route", None)
        access = cls(
            request_id=request_id,
            method=request.method,
            route=f"/api/{route}" if route else request.url.path,
            started_at=datetime.now(UTC),
            perf_start=time.perf_counter(),
        )
        # The organizer's routes name an event (and an attendee) in their path.
        access.event_id = path_params.get("event_id")
        access.attendee = path_params.get("user")
        return access

    @property
    def prompt_tokens(self) -> int | None:
        return None if self.record is None else self.record.prompt_tokens

    @property
    def completion_tokens(self) -> int | None:
        return None if self.record is None else self.record.completion_tokens

    @property
    def upstream_tokens(self) -> tuple[int, int] | None:
        """Prompt and completion tokens, when the request reached upstream."""
        if self.record is None or not self.record.reached_upstream:
            return None
        return self.record.prompt_tokens, self.record.completion_tokens

    @property
    def upstream_ms(self) -> float | None:
        if self.record is None or not self.record.reached_upstream:
            return None
        return round(self.record.latency_ms, 1)

    def fields(self) -> dict[str, object]:
        """The line's fields, in order; absent ones are None."""
        return {
            "time": self.started_at.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "request_id": self.request_id,
            "method": self.method,
            "route": self.route,
            "status": self.status,
            "error": self.error,
            "event": self.event_id,
            "attendee": self.attendee,
            "model": self.model,
            "backend": self.backend,
            "stream": self.stream,
            "upstream_status": self.upstream_status,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "latency_ms": round(self.latency_ms, 1),
            "upstream_ms": self.upstream_ms,
            "first_chunk_ms": None if self.first_chunk_ms is None else round(self.first_chunk_ms, 1),
        }


def logfmt(fields: dict[str, object]) -> str:
    """``key=value`` pairs; absent fields left out, strings quoted when they need it."""
    parts = []
    for key, value in fields.items():
        if value is None:
            continue
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, int | float):
            text = str(value)
        else:
            text = str(value)
            if not text or any(c in text for c in ' ="\\') or not text.isprintable():
                text = orjson.dumps(text).decode()  # escapes quotes and control characters
        parts.append(f"{key}={text}")
    return " ".join(parts)


class AccessLog:
    """Writes each request's line (and, through ``telemetry``, its span and metrics) when its answer ends."""

    def __init__(self, log_format: LogFormat = "logfmt", telemetry: Telemetry | None = None) -> None:
        self.format = log_format
        _print_lines()
        self.telemetry = telemetry or Telemetry()

    @classmethod
    def from_settings(cls, settings: Settings) -> AccessLog:
        """``LOG_FORMAT``, and spans and metrics to Application Insights when it is configured."""
        if settings.appinsights_connection_string is None:
            return cls(settings.log_format)
        from proxy.observability.otel import AzureMonitorTelemetry  # only now: it costs start-up time

        return cls(settings.log_format, AzureMonitorTelemetry.configure(settings))

    def line(self, access: Access) -> str:
        fields = access.fields()
        if self.format == "json":
            return orjson.dumps(fields).decode()
        return logfmt(fields)

    def finish(self, access: Access) -> None:
        access.latency_ms = (time.perf_counter() - access.perf_start) * 1000
        if access.record is not None and access.record.reached_upstream and access.upstream_status is None:
            access.upstream_status = access.record.status
        access_logger.info("%s", self.line(access))
        self.telemetry.finish(access)

    def respond(self, access: Access, response: Response) -> Response:
        """The response to send, logged once it has gone: a plain one after its body, a stream after its last chunk."""
        access.status = response.status_code
        if isinstance(response, StreamingResponse):
            response.body_iterator = self._streamed(access, response.body_iterator)
        else:
            response.background = BackgroundTask(self._sent, access)
        return response

    async def _sent(self, access: Access) -> None:
        self.finish(access)  # a coroutine function, so Starlette calls it in place, not in a thread

    async def _streamed(self, access: Access, chunks: Any) -> AsyncIterator[Any]:
        last = b""
        iterator = chunks.__aiter__()
        try:
            while True:
                with self.telemetry.current(access):  # the relay's own spans (usage commit) nest in the request's
                    try:
                        chunk = await iterator.__anext__()
                    except StopAsyncIteration:
                        break
                if access.first_chunk_ms is None:
                    access.first_chunk_ms = (time.perf_counter() - access.perf_start) * 1000
                last = chunk if isinstance(chunk, bytes) else str(chunk).encode()
                yield chunk
        except BaseException:  # the client went away: the stream is cancelled or closed mid-way
            access.error = access.error or CLIENT_DISCONNECTED
            raise
        finally:
            if access.error is None and last.startswith(_ERROR_EVENT):
                access.error = _error_code(last)
            self.finish(access)


class _Lines(logging.StreamHandler):  # type: ignore[type-arg]
    """Prints the access lines as they are, one per line."""


def _print_lines() -> None:
    """Send the access lines to standard output only, bare.

    Not through the root logger: the Functions worker sends its records to the
    host as ``RpcLog`` messages, and the host drops one whose invocation has
    already ended, as a stream's has when its last chunk goes. The host logs
    whatever a worker prints (category ``Host.Function.Console``, which
    ``host.json`` keeps at Information), so every line reaches its logs.
    """
    if not any(isinstance(handler, _Lines) for handler in access_logger.handlers):
        handler = _Lines(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        access_logger.addHandler(handler)
    access_logger.propagate = False
    access_logger.setLevel(logging.INFO)


def _error_code(event: bytes) -> str:
    try:
        code = orjson.loads(event[6:])["error"]["code"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return "stream_error"
    return str(code) if code else "stream_error"


_configured: list[AccessLog] = []


def configure_access_log(log: AccessLog) -> None:
    """Set, at a worker's cold start, how its lines are written (``LOG_FORMAT``) and where telemetry goes."""
    _configured[:] = [log]


def access_log() -> AccessLog:
    """The worker's access log: logfmt without telemetry until ``configure_access_log`` is called."""
    if not _configured:
        _configured.append(AccessLog())
    return _configured[0]
