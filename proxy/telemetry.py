"""Telemetry besides the access log: spans and metrics, to Application Insights when configured.

``Telemetry`` itself reports nothing and imports nothing: it is what a worker
runs with when ``APPLICATIONINSIGHTS_CONNECTION_STRING`` is not set, so the
cold start pays for no OpenTelemetry module. With the setting,
``Telemetry.from_settings`` imports ``proxy.otel``, which exports through
``azure-monitor-opentelemetry``. The handlers see only this interface:

- ``start`` / ``finish``: the request's span, opened by ``proxy.handlers.answering``
  and ended with the access line (``proxy.access``), which also counts the metrics;
- ``current``: makes the request's span the parent of what runs inside (the
  handler, each step of a stream);
- ``span``: one step of the request (event lookup, cap reservation, upstream
  call, usage commit).

Span names and attribute keys, and metric names and dimensions, are listed in
``proxy.otel``; the workbook in ``infra/`` queries them.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from proxy.access import Access
    from proxy.settings import Settings

_NOTHING: AbstractContextManager[None] = nullcontext()


class Telemetry:
    """Reports nothing: telemetry is off."""

    @staticmethod
    def from_settings(settings: Settings) -> Telemetry:
        if settings.appinsights_connection_string is None:
            return Telemetry()
        from proxy.otel import AzureMonitorTelemetry  # only now: it costs start-up time

        return AzureMonitorTelemetry.configure(settings)

    def start(self, access: Access) -> None:
        """Open the request's span."""

    def current(self, access: Access) -> AbstractContextManager[object]:
        """Run what follows as part of the request's span."""
        return _NOTHING

    def span(self, name: str, attributes: dict[str, str] | None = None) -> AbstractContextManager[object]:
        """One step of the request, a child of the current span."""
        return _NOTHING

    def finish(self, access: Access) -> None:
        """End the request's span and count its metrics."""
