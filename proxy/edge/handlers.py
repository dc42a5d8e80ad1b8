"""The attendee-facing HTTP handlers, and the per-worker services they share.

``Proxy`` holds the clients (tables, upstream, credential) created once per
worker; ``function_app.py`` registers its handlers as Azure Functions, which
the Functions host (or locally its emulator, ``devtools/funchost/host.py``) serves. Errors are turned into responses
in one
place (``answering``) and, for streams already under way, in
``proxy.ledger.ending`` (``Answer.relay``), which also ends every answer that
reached upstream, however it ends.

A request that reaches upstream (chat, embeddings, Responses) walks one path,
``Proxy.forward``: credential, event, body, admission, upstream, relay,
settlement, each step once; where the routes differ, it asks the route's
object (``proxy.edge.routes``).

A chat or embeddings request costs, on its critical path: the cached event
lookup (0 storage operations when cached, 2 point reads per code per
``EVENT_CACHE_SECONDS`` otherwise) and, for ``CODE/name``, whether the name
has a personal key (0 when cached, 1 range query of the event's names per
``EVENT_CACHE_SECONDS``); with a personal key instead, the cached key lookup
(0, or 2 sequential reads per key and ``EVENT_CACHE_SECONDS``, ``proxy.policy.keys``);
then the cap reservation of ``proxy.admission.limits`` (0 or 1 operation; a new
name's roster row rides in it, ``proxy.policy.attendees``), and the upstream call.
Usage is written afterwards.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import httpx
import orjson
from azure.core.credentials_async import AsyncTokenCredential
from azure.core.exceptions import ResourceNotFoundError
from starlette.requests import Request
from starlette.responses import Response

from proxy.admission.alerts import Alerts
from proxy.admission.budget import has_budget
from proxy.admission.days import CLIENT_GONE, Admission, booked_cost, booked_tokens, day_of, next_midnight
from proxy.admission.limits import Ledger
from proxy.config.prices import PriceTable, usd
from proxy.config.settings import Settings
from proxy.config.tokens import make_credential
from proxy.conversations.responses import Owner, ResponsesApi
from proxy.conversations.sessions import SessionLimits, Sessions
from proxy.edge.access import Access, AccessLog, access_log, configure_access_log
from proxy.edge.callers import Callers, check_open
from proxy.edge.routes import Call, ChatRoute, EmbeddingsRoute, ResponsesRoute, Route
from proxy.errors import (
    CapExceeded,
    MethodNotAllowed,
    ModelNotFound,
    ModelPriceUnknown,
    NotFound,
    ProxyError,
    StorageUnavailable,
    UpstreamError,
    internal_error,
)
from proxy.ledger.ending import Answer, AnswerStream
from proxy.ledger.usage import UsageRecord, UsageRecorder
from proxy.observability.telemetry import Telemetry
from proxy.policy.attendees import Roster
from proxy.policy.events import Event, EventStore
from proxy.policy.guessing import FailedLookups
from proxy.policy.keys import PersonalKeys
from proxy.storage.tables import Tables, guarded
from proxy.upstream import payload as bodies
from proxy.upstream.client import Upstream, read_answer
from proxy.upstream.transport import UpstreamResponse

log = logging.getLogger("proxy")

Handler = Callable[..., Awaitable[Response]]
_JSON = "application/json"
_PASSED_HEADERS = ("retry-after", "retry-after-ms", "x-ratelimit-remaining-requests", "x-ratelimit-remaining-tokens")


def error_response(error: ProxyError) -> Response:
    return Response(error.body(), status_code=error.status, headers=error.headers, media_type=_JSON)


def answering(handler: Handler) -> Handler:
    """Give the request its id, turn whatever a handler raises into an OpenAI-shaped answer, log its access line.

    A ``ProxyError`` becomes its own status and code. Anything else is a bug:
    it is logged with its traceback and the request id, and the client gets
    ``500 internal_error`` naming that id, never the Functions worker's bare
    ``500 text/plain``. Messages and logs never carry the request's content
    or credential. Every answer carries ``x-request-id``, and the access line
    (``proxy.edge.access``) that has the same id is written when the answer ends.
    """

    @functools.wraps(handler)
    async def wrapper(self: Any, request: Request, *args: Any, **kwargs: Any) -> Response:
        request_id = request.state.request_id = os.urandom(16).hex()  # 32 hex digits as uuid4().hex, 1/5 of its cost
        lines = access_log()
        access = request.state.access = Access.start(request, request_id, kwargs)
        lines.telemetry.start(access)
        try:
            with lines.telemetry.current(access):
                response = await handler(self, request, *args, **kwargs)
        except ProxyError as error:
            if error.status >= 500:
                log.warning("%s: %s (request %s)", error.code, error.message, request_id)
            access.error = error.code
            response = error_response(error)
        except Exception:
            log.exception("internal error in %s (request %s)", handler.__name__, request_id)
            access.error = "internal_error"
            response = error_response(internal_error(request_id))
        except BaseException:  # cancelled: the client went away before its answer
            access.status, access.error = 499, access.error or "client_disconnected"
            lines.finish(access)
            raise
        finally:
            bodies.release_body(request)  # the handler has let go of its body (proxy.upstream.payload)
        response.headers.setdefault("x-request-id", request_id)
        return lines.respond(access, response)

    return wrapper


class Proxy:
    """The services of one worker and the handlers that use them."""

    def __init__(
        self,
        settings: Settings,
        tables: Tables,
        upstream: Upstream,
        credential: AsyncTokenCredential | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        telemetry: Telemetry | None = None,
    ) -> None:
        self.settings = settings
        self.tables = tables
        self.events = EventStore(tables, settings.hasher(), settings.event_cache_seconds)
        self.prices = PriceTable.load(settings.model_prices)
        self.ledger = Ledger(tables, self.prices)
        self.roster = Roster(tables)
        self.keys = PersonalKeys(tables, self.events, self.roster, settings.event_cache_seconds)
        self.failed_lookups = FailedLookups(settings.failed_lookups_per_minute)
        self._routes: list[tuple[re.Pattern[str], list[str]]] = []
        self.telemetry = telemetry or Telemetry()
        # Who is calling: a credential resolved to an event and a name (proxy.edge.callers).
        self.callers = Callers(self.events, self.keys, self.failed_lookups, self.telemetry, clock)
        # Plain http webhooks (to loopback) only in a local run, on Azurite's connection string.
        self.alerts = Alerts(tables, local=settings.storage_connection_string is not None)
        self.recorder = UsageRecorder(tables, self.ledger, self.prices, self.telemetry)
        # What the access log names the backend when upstream does not say (one endpoint).
        self.backend_name = httpx.URL(settings.openai_endpoint).netloc.decode() if settings.openai_endpoint else ""
        self.upstream = upstream
        self.bodies = bodies.BodyBudget(settings.body_memory_bytes)
        self.responses = ResponsesApi(tables, upstream)
        limits = SessionLimits(settings.session_max_turns, settings.session_max_chars, settings.session_ttl_seconds)
        self.sessions = Sessions(tables, limits, clock)
        # What differs between the routes that reach upstream (proxy.edge.routes).
        self._chat = ChatRoute(self.sessions)
        self._embeddings = EmbeddingsRoute()
        self._responses = ResponsesRoute(self.responses)
        self._credential = credential
        self._clock = clock

    def know_routes(self, routes: list[tuple[str, list[str]]]) -> None:
        """The registered routes (under ``/api/``) and their methods, for 405 ``method_not_allowed``."""
        for route, methods in routes:
            if route.startswith("{*"):
                continue  # the catch-all
            pattern = re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(route))
            self._routes.append((re.compile(f"/api/{pattern}/?"), methods))

    @classmethod
    def from_settings(cls, settings: Settings) -> Proxy:
        credential = make_credential(settings)
        upstream = Upstream(settings, Upstream.transport(settings), credential)
        lines = AccessLog.from_settings(settings)
        configure_access_log(lines)
        return cls(settings, Tables.create(settings, credential), upstream, credential, telemetry=lines.telemetry)

    async def aclose(self) -> None:
        """Graceful shutdown: store pending usage, then close the clients."""
        await self.recorder.drain()
        await self.ledger.drain()
        await self.alerts.aclose()
        await self.upstream.aclose()
        await self.tables.aclose()
        if self._credential is not None:
            await self._credential.close()

    # Attendee routes

    @answering
    async def chat(self, request: Request, deployment: str | None = None) -> Response:
        return await self.forward(request, self._chat, deployment)

    @answering
    async def embeddings(self, request: Request, deployment: str | None = None) -> Response:
        return await self.forward(request, self._embeddings, deployment)

    @answering
    async def create_response(self, request: Request) -> Response:
        return await self.forward(request, self._responses, None)

    @answering
    async def stored_response(self, request: Request, response_id: str) -> Response:
        """``GET``/``DELETE /v1/responses/{id}``: only the attendee who made it sees it
        (``proxy.conversations.responses``)."""
        return await self._stored(request, response_id, "")

    @answering
    async def response_input_items(self, request: Request, response_id: str) -> Response:
        return await self._stored(request, response_id, "/input_items")

    @answering
    async def forget_session(self, request: Request, session_id: str) -> Response:
        """``DELETE /v1/sessions/{id}``: forget one of the caller's chat sessions (``proxy.conversations.sessions``)."""
        caller = await self.callers.of(request)
        if not await self.sessions.forget(caller.event.id, caller.user, session_id):
            raise NotFound(f"No chat session '{session_id}' is kept for you in this event.", param="session_id")
        forgotten = {"id": session_id, "object": "session.deleted", "deleted": True}
        return Response(orjson.dumps(forgotten), media_type=_JSON)

    async def _stored(self, request: Request, response_id: str, suffix: str) -> Response:
        caller = await self.callers.of(request)
        if request.method != "DELETE":  # deleting what one stored stays possible once the event is over
            check_open(caller.event, self._clock())
        owner = Owner(caller.event.id, caller.user)
        query = list(request.query_params.multi_items())
        return await self.responses.stored(request.method, owner, response_id, suffix, query, request.state.request_id)

    @answering
    async def models(self, request: Request) -> Response:
        caller = await self.callers.of(request)
        check_open(caller.event, self._clock())
        created = int(caller.event.created_at.timestamp())
        data = [{"id": m, "object": "model", "created": created, "owned_by": "event"} for m in caller.event.models]
        return Response(orjson.dumps({"object": "list", "data": data}), media_type=_JSON)

    @answering
    async def event_info(self, request: Request) -> Response:
        caller = await self.callers.of(request)
        event, now = caller.event, self._clock()
        today = await self.ledger.read(event.id, caller.user, day_of(now, event.time_zone))
        reserved, tokens = int(today.get("reserved", 0)), int(today.get("total_tokens", 0))
        is_open = event.active and event.starts_at <= now < event.ends_at
        event_budget = await self.ledger.budget_totals(event) if has_budget(event) else None
        info = {
            "name": event.name,
            "description": event.description,
            "start": event.starts_at.isoformat(),
            "end": event.ends_at.isoformat(),
            "start_local": event.local(event.starts_at),
            "end_local": event.local(event.ends_at),
            "time_zone": event.time_zone,
            "open": is_open,
            "active": event.active,
            "models": list(event.models),
            "caps": {
                "max_tokens": event.max_tokens,
                "daily_requests": event.daily_requests,
                "daily_tokens": event.daily_tokens,
                "tpm": event.tpm,
                "event_requests": event.event_requests,
                "event_tokens": event.event_tokens,
                "daily_cost": event.daily_cost,
                "event_cost": event.event_cost,
                "max_attendees": event.max_attendees,
                "session_turns": self.sessions.limits_for(event).max_turns,
                "session_chars": self.sessions.limits_for(event).max_chars,
            },
            # Whether the whole event's budget is used up; not how much others used.
            "event_budget_exhausted": bool(event_budget and event_budget["exhausted"]),
            "user": caller.user,
            "blocked": caller.user in event.blocked,
            "usage_today": {
                "day": day_of(now, event.time_zone),  # the event's local date: its daily caps reset at its midnight
                "resets_at": next_midnight(now, event.time_zone).isoformat(),
                "resets_at_local": event.local(next_midnight(now, event.time_zone)),
                "requests": int(today.get("requests", 0)),
                "prompt_tokens": int(today.get("prompt_tokens", 0)),
                "completion_tokens": int(today.get("completion_tokens", 0)),
                "total_tokens": tokens,
                "cost": usd(booked_cost(today, 0.0)),  # USD recorded today (proxy.config.prices)
            },
            # Nothing remains outside the window; tokens count the estimates of requests in flight.
            "remaining_today": {
                "requests": None if event.daily_requests is None else max(0, event.daily_requests - reserved),
                "tokens": None if event.daily_tokens is None else max(0, event.daily_tokens - booked_tokens(today)),
            }
            if is_open
            else {"requests": 0, "tokens": 0},
        }
        return Response(orjson.dumps(info), media_type=_JSON)

    @answering
    async def health(self, request: Request) -> Response:
        # Each backend by name, with the models this worker has found throttled or failing (no endpoint, no key).
        backends = self.upstream.health.report(self.upstream.backends)
        try:
            await guarded(self.tables.events.get_entity("health", "probe"))
        except ResourceNotFoundError:
            pass
        except StorageUnavailable:
            unavailable = {"status": "unavailable", "storage": "unreachable", "backends": backends}
            return Response(orjson.dumps(unavailable), 503, media_type=_JSON)
        return Response(orjson.dumps({"status": "ok", "storage": "ok", "backends": backends}), media_type=_JSON)

    @answering
    async def not_found(self, request: Request, path: str = "") -> Response:
        for pattern, methods in self._routes:
            if pattern.fullmatch(request.url.path):
                raise MethodNotAllowed(request.method, request.url.path, methods)
        raise NotFound(
            f"No route {request.method} {request.url.path}. Use /api/v1/chat/completions, "
            "/api/v1/responses, /api/v1/embeddings or /api/v1/models with an OpenAI client."
        )

    # The walk of a request that reaches upstream, the same for every route (proxy.edge.routes)

    async def forward(self, request: Request, route: Route, deployment: str | None) -> Response:
        """Credential, event, body, admission, upstream, relay, settlement: each step once, in this order."""
        # Credential: who is calling (proxy.edge.callers).
        caller = await self.callers.of(request)
        # Event: open now (its window, switched on).
        event, now = caller.event, self._clock()
        check_open(event, now)
        # Body: read within the worker's memory, the model allowed, checked and capped by the route.
        share = f"{event.id}/{caller.user}"  # one attendee's share of the worker's memory for bodies
        payload = await bodies.read_json(request, self.settings.max_request_bytes, self.bodies, share)
        model = bodies.requested_model(payload, deployment)
        access: Access = request.state.access
        access.model = model
        if model not in event.models:
            raise ModelNotFound(
                f"The model '{model}' is not available in '{event.name}'. Available: {', '.join(event.models)}.",
                param="model",
            )
        if (event.daily_cost is not None or event.event_cost is not None) and self.prices.known(model) is None:
            raise ModelPriceUnknown(model, event.name)  # else the cost caps would count its requests as free
        call = await route.prepare(payload, event, caller.user)
        prepared = call.prepared
        prompt_estimate, estimate = prepared.estimates(payload.get("n"))
        request_id: str = request.state.request_id
        access.stream = prepared.stream
        # Admission: the roster, then every cap and budget at once (proxy.admission.limits).
        admission = await self._admit(event, caller.user, now, estimate, request_id)
        record = UsageRecord(
            event_id=event.id,
            user=caller.user,
            model=model,
            kind=route.kind,
            stream=prepared.stream,
            admission=admission,
            request_id=request_id,
            started_at=now,
            perf_start=time.perf_counter(),
            prompt_estimate=prompt_estimate,
        )
        access.record = record
        # Upstream: from here every way the request ends is recorded.
        response = await self._send(call, model, record)
        access.backend = response.backend or self.backend_name
        access.upstream_attempts = response.attempts
        answer = Answer(record, self.recorder, response)
        headers = _headers(admission, record.request_id, response)
        # Relay: a stream goes out as it comes, and ends through Answer.relay (proxy.ledger.ending).
        if prepared.stream and response.status_code == 200:
            return AnswerStream(answer, call.relay(answer, response), headers)
        body, whole = await _read_whole(call, answer, response)
        # Settlement: the answer goes out only once what it keeps and its usage are stored.
        await answer.complete(call.keep(record, body, whole))
        return Response(body, status_code=response.status_code, headers=headers, media_type=_JSON)

    async def _admit(self, event: Event, user: str, now: datetime, estimate: int, request_id: str) -> Admission:
        self.recorder.check_storage()
        self.alerts.touch(event)  # its budgets are checked a moment later, off this path (proxy.admission.alerts)
        with self.telemetry.span("cap reservation"):
            # A new name's roster row rides with its first day (one transaction), or is inserted alone in an event
            # without caps, which writes no day before upstream (proxy.policy.attendees).
            joining = await self.roster.admit(event, user)
            try:
                admission = await self.ledger.admit_all(event, user, now, estimate, request_id, joining)
            except CapExceeded as refused:
                if joining is not None:
                    self.roster.seen(event.id, user)  # stored alone, its request refused
                if refused.code == "event_budget_exhausted":
                    self.alerts.touch(event, exhausted=True)  # used up for attendees, if not to the last token
                raise
            if joining is not None:
                self.roster.seen(event.id, user)  # stored with its first day
            return admission

    async def _send(self, call: Call, model: str, record: UsageRecord) -> UpstreamResponse:
        """Upstream's answer; a request that never got one is recorded here, charged if upstream may bill it."""
        try:
            with self.telemetry.span("upstream call", {"proxy.model": model}):
                response = await call.send(self.upstream, model, record.request_id)
        except ProxyError as error:  # upstream failed, or refused: nothing reached it that it bills
            record.status = error.status
            self.recorder.submit(record)
            raise
        except asyncio.CancelledError:  # the request was on its way to upstream when the client left: charged
            record.reached_upstream = True
            Answer(record, self.recorder, None).abandon(CLIENT_GONE)
            raise
        except Exception:  # a bug before upstream answered: nothing it bills, the slot is given back
            record.status = 500
            self.recorder.submit(record)
            raise
        record.reached_upstream = True
        record.status = record.upstream_status = response.status_code
        record.backend = response.backend
        return response


async def _read_whole(call: Call, answer: Answer, response: UpstreamResponse) -> tuple[bytes, dict[str, Any] | None]:
    """A whole (not streamed) answer, and its JSON object when upstream answered 200, its usage read by the route.

    An answer that cannot be read, or a 5xx, ends here (``Answer.abandon``), charged as ``proxy.ledger.ending`` says.
    """
    record = answer.record
    whole = None
    try:
        body = await read_answer(response)
        if response.status_code == 200:
            try:
                parsed = orjson.loads(body)
            except orjson.JSONDecodeError:
                log.warning("upstream answered 200 with a body that is not JSON (request %s)", record.request_id)
            else:
                if isinstance(parsed, dict):
                    whole = parsed
                    call.take_usage(record, whole)
    except ProxyError as error:
        answer.abandon(error.status)
        raise
    except BaseException:  # the client left (cancelled), or a bug: charged all the same
        answer.abandon(CLIENT_GONE)
        raise
    if response.status_code >= 500:
        answer.abandon(response.status_code)
        raise UpstreamError(f"Azure OpenAI failed with status {response.status_code}{_attempts(response)}.")
    return body, whole


def _attempts(response: UpstreamResponse) -> str:
    """How many times the request was sent, for a 502's message (``proxy.upstream`` retries some statuses)."""
    attempts = response.attempts
    return f" on each of {attempts} attempts" if attempts > 1 else " (not retried: only 502, 503 and 504 are)"


def _headers(admission: Admission, request_id: str, response: UpstreamResponse) -> dict[str, str]:
    headers = {"x-request-id": request_id}
    if response.status_code >= 400:
        # Upstream's own limits matter to the client only when upstream refused.
        for name in _PASSED_HEADERS:
            value = response.headers.get(name)
            if value is not None:
                headers[name] = value
    if admission.remaining_requests is not None:
        headers["x-ratelimit-remaining-requests"] = str(admission.remaining_requests)
    if admission.remaining_tokens is not None:
        headers["x-ratelimit-remaining-tokens"] = str(admission.remaining_tokens)
    return headers
