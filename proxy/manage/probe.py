"""The organizer's probe, ``POST /api/manage/probe``: does each model answer through this proxy?

It sends one tiny request per deployment upstream, with the app's own identity and
upstream client, exactly as an attendee's request would travel, but outside any
event: no event is opened, no attendee cap or usage is touched. ``proxy.manage.doctor``
calls it before an event. Authenticated with the organizer key, like the rest of
``/api/manage/``.

Body: ``{"event": "EVENT_ID"}`` (probe the models that event allows) or
``{"models": ["name", ...]}`` (deployment names, checked as an event's are:
each becomes a path segment of the upstream URL). Answer: ``{"results": [{"model", "backend", "ok",
"operation", "status", "latency_ms", "error"}]}``, 200 whatever the models
answered: one result per model and upstream backend that serves it
(``AZURE_OPENAI_BACKENDS``), each backend called on its own, since an attendee's
request would fail over and hide a backend that cannot serve.

A deployment is tried as chat first (embeddings first when its name says
"embedding"); Azure answers 400 ``OperationNotSupported`` for the wrong one, and
the other is tried. Chat asks for one completion token with
``max_completion_tokens`` (which reasoning models require), falling back to
``max_tokens`` for a model that refuses it. When ``max_completion_tokens``
works, a second one-token request tells whether the model refuses ``max_tokens``
(reasoning models do): the answer's ``refuses_max_tokens`` says so, and
``refuses_max_completion_tokens`` when the fallback was needed. The doctor compares them with
the field the proxy itself sets on a request that names neither (``proxy.upstream.payload``).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from proxy.config.backends import Backend
from proxy.edge.handlers import answering
from proxy.errors import InvalidRequest, ProxyError
from proxy.manage import operations as organizer
from proxy.manage.api import OrganizerApi
from proxy.manage.models import MODEL_PATTERN
from proxy.policy.accounts import Actor, require_writer
from proxy.upstream.client import Upstream
from proxy.upstream.payload import read_json

CHAT = "chat/completions"
EMBEDDINGS = "embeddings"
MAX_MODELS = 32
_PROMPT = [{"role": "user", "content": "Reply with one word: ok"}]


class ProbeApi:
    """``POST /api/manage/probe`` on the worker's organizer API and upstream client."""

    def __init__(self, organizer_api: OrganizerApi, upstream: Upstream) -> None:
        self.api, self.upstream = organizer_api, upstream

    @answering
    async def probe(self, request: Request) -> Response:
        actor = await self.api.authorize(request)
        require_writer(actor, "probe models (each probe is a billed request)")
        fields = await read_json(request, self.api.settings.max_request_bytes)
        models = await self._models(actor, fields)
        # No backend serving a model: probed anyway, for upstream's own explanation.
        unserved: list[Backend | None] = [None]
        probes = [(model, backend) for model in models for backend in self.upstream.serving(model) or unserved]
        results = await asyncio.gather(*(self.probe_model(model, backend) for model, backend in probes))
        return Response(orjson.dumps({"results": list(results)}), media_type="application/json")

    async def _models(self, actor: Actor, fields: dict[str, Any]) -> list[str]:
        unknown = sorted(set(fields) - {"event", "models"})
        if unknown:
            raise InvalidRequest(f"Unknown field '{unknown[0]}': send 'event' or 'models'.", param=unknown[0])
        if ("event" in fields) == ("models" in fields):
            raise InvalidRequest("Send either 'event' (an event id) or 'models' (deployment names).")
        if "event" in fields:
            event = await organizer.get_event(self.api.store, actor, str(fields["event"]))
            return [str(model) for model in event["models"]]
        models = fields["models"]
        if not isinstance(models, list) or not models or not all(isinstance(m, str) and m for m in models):
            raise InvalidRequest("'models' must be a non-empty array of deployment names.", param="models")
        if len(models) > MAX_MODELS:
            raise InvalidRequest(f"At most {MAX_MODELS} models per probe.", param="models")
        for model in models:
            if not MODEL_PATTERN.fullmatch(model):
                raise InvalidRequest(
                    f"'models' holds {model[:80]!r}, not a deployment name (1 to 64 of A-Z a-z 0-9 . _ -, "
                    "starting with a letter or digit).",
                    param="models",
                )
        return list(dict.fromkeys(models))

    async def probe_model(self, model: str, backend: Backend | None = None) -> dict[str, Any]:
        """One deployment (on ``backend`` only, when given): the first operation that answers, or why none did."""
        operations = (EMBEDDINGS, CHAT) if "embed" in model.lower() else (CHAT, EMBEDDINGS)
        result: dict[str, Any] = {}
        for operation in operations:
            result = await self._call(model, operation, backend)
            if result["ok"] or result.get("error_code") != "OperationNotSupported":
                break
        return {"model": model, "backend": None if backend is None else backend.name, **result}

    async def _call(self, model: str, operation: str, backend: Backend | None) -> dict[str, Any]:
        if operation == EMBEDDINGS:
            return await self._send(model, operation, {"input": "ok"}, backend)
        answer = await self._send(model, operation, {"messages": _PROMPT, "max_completion_tokens": 1}, backend)
        if not answer["ok"] and "max_completion_tokens" in str(answer.get("error", "")):
            legacy = await self._send(model, operation, {"messages": _PROMPT, "max_tokens": 1}, backend)
            return {**legacy, "refuses_max_completion_tokens": True}
        if answer["ok"]:
            legacy = await self._send(model, operation, {"messages": _PROMPT, "max_tokens": 1}, backend)
            answer["refuses_max_tokens"] = not legacy["ok"] and "max_tokens" in str(legacy.get("error", ""))
        return answer

    async def _send(self, model: str, operation: str, body: dict[str, Any], backend: Backend | None) -> dict[str, Any]:
        kind = "chat" if operation == CHAT else "embeddings"
        started = time.perf_counter()
        try:
            response = await self.upstream.send(
                model, operation, orjson.dumps(body), uuid.uuid4().hex, only=backend, raw=True
            )
            try:
                content = await response.aread()
            finally:
                await response.aclose()
        except ProxyError as error:
            return _result(model, kind, error.status, started, error.message, error.code)
        if response.status_code == 200:
            return _result(model, kind, 200, started)
        code, message = _upstream_error(content)
        if response.status_code == 400 and "output limit" in message:
            # A reasoning model answered but one token was too few to finish: it is deployed and serving.
            return _result(model, kind, 200, started)
        return _result(model, kind, response.status_code, started, message or f"HTTP {response.status_code}", code)


def _result(
    model: str, kind: str, status: int, started: float, error: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {
        "model": model,
        "ok": error is None,
        "operation": kind,
        "status": status,
        "latency_ms": round((time.perf_counter() - started) * 1000),
        "error": error,
        "error_code": code,
    }


def _upstream_error(content: bytes) -> tuple[str | None, str]:
    try:
        error = orjson.loads(content).get("error") or {}
    except (orjson.JSONDecodeError, AttributeError):
        return None, content[:200].decode(errors="replace")
    if not isinstance(error, dict):
        return None, str(error)[:200]
    return error.get("code"), str(error.get("message", ""))[:300]
