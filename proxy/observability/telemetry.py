"""Telemetry besides the access log: spans and metrics, to Application Insights when configured.

``Telemetry`` itself reports nothing and imports nothing: it is what a worker
runs with when ``APPLICATIONINSIGHTS_CONNECTION_STRING`` is not set, so the
cold start pays for no OpenTelemetry module. With the setting,
``AccessLog.from_settings`` (``proxy.edge.access``) imports ``proxy.observability.otel``, which
exports through ``azure-monitor-opentelemetry``. The handlers see only this
interface, over ``Traced``, what it reads of a request (``proxy.edge.access.Access``):

- ``start`` / ``finish``: the request's span, opened by ``proxy.edge.handlers.answering``
  and ended with the access line (``proxy.edge.access``), which also counts the metrics;
- ``current``: makes the request's span the parent of what runs inside (the
  handler, each step of a stream);
- ``span``: one step of the request (event lookup, cap reservation, upstream
  call, usage commit).

Span names and attribute keys, and metric names and dimensions, are listed in
``proxy.observability.otel``; the workbook in ``infra/`` queries them.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any, Protocol

_NOTHING: AbstractContextManager[None] = nullcontext()


class Traced(Protocol):
    """What telemetry reads of a request: ``proxy.edge.access.Access``, which imports this module, not the reverse."""

    span: Any  # set by ``start``

    @property
    def method(self) -> str: ...
    @property
    def route(self) -> str: ...
    @property
    def status(self) -> int: ...
    @property
    def error(self) -> str | None: ...
    @property
    def event_id(self) -> str | None: ...
    @property
    def model(self) -> str | None: ...
    @property
    def backend(self) -> str | None: ...
    @property
    def upstream_status(self) -> int | None: ...
    @property
    def upstream_attempts(self) -> int: ...
    @property
    def first_chunk_ms(self) -> float | None: ...
    @property
    def upstream_tokens(self) -> tuple[int, int] | None: ...
    def fields(self) -> dict[str, object]: ...


class Telemetry:
    """Reports nothing: telemetry is off."""

    def start(self, access: Traced) -> None:
        """Open the request's span."""

    def current(self, access: Traced) -> AbstractContextManager[object]:
        """Run what follows as part of the request's span."""
        return _NOTHING

    def span(self, name: str, attributes: dict[str, str] | None = None) -> AbstractContextManager[object]:
        """One step of the request, a child of the current span."""
        return _NOTHING

    def finish(self, access: Traced) -> None:
        """End the request's span and count its metrics."""
