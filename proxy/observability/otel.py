"""Spans and metrics to Application Insights through ``azure-monitor-opentelemetry``.

Imported only when ``APPLICATIONINSIGHTS_CONNECTION_STRING`` is set
(``AccessLog.from_settings``, ``proxy.edge.access``): OpenTelemetry and the exporter cost start-up time.
Authenticated with the managed identity when
``APPLICATIONINSIGHTS_AUTHENTICATION_STRING`` says ``Authorization=AAD``, as
the Bicep sets it (local authentication is off on Application Insights).

What arrives, by Application Insights table (the workbook in ``infra/`` queries these names):

- ``requests``: one per request, named ``<METHOD> <route template>``, with
  ``customDimensions`` ``proxy.request_id``, ``proxy.route``, ``proxy.status``,
  ``proxy.error``, ``proxy.event``, ``proxy.attendee``, ``proxy.model``,
  ``proxy.backend``, ``proxy.stream``, ``proxy.prompt_tokens``,
  ``proxy.completion_tokens``, ``proxy.upstream_status``, ``proxy.upstream_ms``.
- ``dependencies``: its steps, ``event lookup``, ``cap reservation``,
  ``upstream call`` and ``usage commit``.
- ``customMetrics``: ``proxy.requests`` (event, model, status, error),
  ``proxy.tokens`` (event, model, type: prompt or completion), ``proxy.cap_refusals``
  (event, error), ``proxy.upstream.throttled`` and ``proxy.upstream.failovers``
  (backend, model), ``proxy.stream.first_chunk`` (event, model; milliseconds).

Nothing secret goes into an attribute: no event code, key, token or content.
Every request is kept (``sampling_ratio=1.0``): an event's traffic is small,
and the workbook sums spans. Only the proxy's own spans are exported: the
distro's automatic instrumentations (HTTP clients, the Azure SDK, FastAPI)
are off, so no URL, header or storage call of theirs reaches a span, and its
log export is off too, since the Functions host already sends the worker's
logs (the access lines among them) to Application Insights.
"""

from __future__ import annotations

import os
import threading
from contextlib import AbstractContextManager
from typing import Any

from azure.monitor.opentelemetry import configure_azure_monitor
from opentelemetry import metrics, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from proxy.config.settings import Settings
from proxy.observability.telemetry import Telemetry, Traced

# Errors that are a cap refusing the request (proxy.admission.limits, proxy.admission.budget).
CAP_REFUSALS = frozenset(
    {
        "daily_request_cap_exceeded",
        "daily_token_cap_exceeded",
        "rate_limited",
        "event_budget_exhausted",
        "max_tokens_exceeds_cap",
        "attendee_limit_reached",
    }
)
_INSTRUMENTATIONS = ("azure_sdk", "django", "fastapi", "flask", "psycopg2", "requests", "urllib", "urllib3")
_CLIENT_STEPS = frozenset({"upstream call"})


class _OneFetchAtATime:
    """A token credential whose callers take turns, so the exporters' threads share one token.

    The trace and the metric exporters each ask for a token when they first post; asked at the
    same moment, the credential, whose cache was still empty for both, fetched twice. Taking
    turns, the second finds the first's token in the credential's cache.
    """

    def __init__(self, credential: Any) -> None:
        self._credential = credential
        self._lock = threading.Lock()

    def get_token(self, *scopes: str, **kwargs: Any) -> Any:
        with self._lock:
            return self._credential.get_token(*scopes, **kwargs)

    def get_token_info(self, *scopes: str, options: Any = None) -> Any:
        with self._lock:
            return self._credential.get_token_info(*scopes, options=options)

    def close(self) -> None:
        self._credential.close()


class AzureMonitorTelemetry(Telemetry):
    """Opens and ends the spans, counts the metrics; the distro exports them."""

    def __init__(self) -> None:
        self._tracer = trace.get_tracer("proxy")
        meter = metrics.get_meter("proxy")
        self._requests = meter.create_counter("proxy.requests", description="Requests answered")
        self._tokens = meter.create_counter("proxy.tokens", description="Tokens used upstream")
        self._refusals = meter.create_counter("proxy.cap_refusals", description="Requests refused by a cap")
        self._throttled = meter.create_counter("proxy.upstream.throttled", description="Upstream answers 429")
        self._failovers = meter.create_counter(
            "proxy.upstream.failovers", description="Requests sent again, to the same or another backend"
        )
        self._first_chunk = meter.create_histogram(
            "proxy.stream.first_chunk", unit="ms", description="Time to a stream's first chunk"
        )

    @classmethod
    def configure(cls, settings: Settings) -> AzureMonitorTelemetry:
        # The distro reads OTEL_LOGS_EXPORTER itself and overrides disable_logging=True with it (1.8.11);
        # its log export would send every record of the worker a second time, after the host's.
        os.environ.setdefault("OTEL_LOGS_EXPORTER", "none")
        options: dict[str, Any] = {
            "connection_string": settings.appinsights_connection_string,
            "disable_logging": True,
            "enable_live_metrics": False,
            "enable_performance_counters": False,
            "sampling_ratio": 1.0,
            "instrumentation_options": {name: {"enabled": False} for name in _INSTRUMENTATIONS},
        }
        if settings.appinsights_identity is not None:
            from azure.identity import ManagedIdentityCredential

            client_id = settings.appinsights_identity or None
            options["credential"] = _OneFetchAtATime(ManagedIdentityCredential(client_id=client_id))
        configure_azure_monitor(**options)
        return cls()

    def start(self, access: Traced) -> None:
        access.span = self._tracer.start_span(f"{access.method} {access.route}", kind=SpanKind.SERVER)

    def current(self, access: Traced) -> AbstractContextManager[object]:
        return trace.use_span(access.span, end_on_exit=False, record_exception=False, set_status_on_exception=False)

    def span(self, name: str, attributes: dict[str, str] | None = None) -> AbstractContextManager[object]:
        kind = SpanKind.CLIENT if name in _CLIENT_STEPS else SpanKind.INTERNAL
        return self._tracer.start_as_current_span(name, kind=kind, attributes=attributes, record_exception=False)

    def finish(self, access: Traced) -> None:
        fields = access.fields()
        span = access.span
        if span is not None:
            span.set_attribute("http.request.method", access.method)
            span.set_attribute("http.route", access.route)
            span.set_attribute("http.response.status_code", access.status)
            for key, value in fields.items():
                if value is not None and key not in ("time", "method"):
                    span.set_attribute(f"proxy.{key}", value)
            if access.status >= 500:
                span.set_status(Status(StatusCode.ERROR, access.error or str(access.status)))
            span.end()
        event, model = access.event_id or "", access.model or ""
        error = access.error or ""
        self._requests.add(1, {"event": event, "model": model, "status": access.status, "error": error})
        tokens = access.upstream_tokens
        if tokens is not None:
            self._tokens.add(tokens[0], {"event": event, "model": model, "type": "prompt"})
            self._tokens.add(tokens[1], {"event": event, "model": model, "type": "completion"})
        if error in CAP_REFUSALS:
            self._refusals.add(1, {"event": event, "error": error})
        upstream = {"backend": access.backend or "", "model": model}
        if access.upstream_status == 429:
            self._throttled.add(1, upstream)
        if access.upstream_attempts > 1:
            self._failovers.add(access.upstream_attempts - 1, upstream)
        if access.first_chunk_ms is not None:
            self._first_chunk.record(access.first_chunk_ms, {"event": event, "model": model})
