"""The Responses API: request bodies, who owns a stored response, and its stream.

Attendees call ``POST /api/v1/responses`` (streamed or not) and ``GET`` /
``DELETE /api/v1/responses/{id}``, ``GET .../{id}/input_items``. The proxy
forwards them to Azure OpenAI's v1 API, ``{endpoint}/openai/v1/responses``,
which takes no dated ``api-version`` and names the deployment in ``model``
(https://learn.microsoft.com/en-us/azure/foundry/openai/how-to/responses and
https://learn.microsoft.com/en-us/azure/foundry/openai/api-version-lifecycle).
A create goes through the same path as chat (``proxy.edge.handlers``): event
window, model list, caps; ``max_output_tokens`` is the capped field (above the
cap: ``400 max_tokens_exceeds_cap``; absent: set to the cap), and ``user`` is
replaced by the attendee's pseudonym.

Privacy between attendees. Upstream keeps every stored response of the whole
Azure resource under one namespace, so the proxy keeps who made each one, in
the ``proxyrequests`` table, by key: ``PartitionKey=<event id>``,
``RowKey="response|<response id>"``, holding the attendee's name. Retrieve,
delete, input_items and ``previous_response_id`` first read that row (one
point read, never a filter built from input); a response of another attendee,
or of another event (another partition), answers ``404`` exactly as one that
never existed. The row is written before the client can see the response id:
before a non-streamed answer is released, and before a stream's
``response.created`` event is relayed. Fields that point at other state
upstream which the proxy cannot check are refused with a ``400`` naming the
field: ``conversation`` (server-side conversations) and input items of type
``item_reference`` (items of stored responses, by id). ``background`` is
refused too: a background response is billed after the request has ended, when
no usage could be recorded.

Usage comes from the response's ``usage`` (``input_tokens``,
``output_tokens``; for streams, from the ``response.completed`` event, or
``response.incomplete`` / ``response.failed``) and is recorded like chat, kind
``responses``, with the same durability: the terminal event (or the
non-streamed body) is released only once the record is stored. A Responses
stream is ``event: <type>`` / ``data: <json>`` pairs and ends with that
terminal event, without ``data: [DONE]``
(https://developers.openai.com/api/reference/resources/responses/streaming-events).
A stream that breaks off before it ends with an ``error`` event whose data
carries an ``error`` object, so the SDKs raise.

A create with ``previous_response_id`` makes upstream prepend the whole chain,
which its body does not hold: the ownership row names the request that made
the response continued, and the estimate the caps admit with adds that
request's logged input and output tokens (``Ownership.context_tokens``: one
more point read, for chained requests only).

Upstream keeps a stored response in the Azure OpenAI resource that made it,
so with several backends every Responses call goes to the same one, the first
by priority and weight (``Upstream.send_v1``), without failover. During a
storage outage the owner cannot be read, and these answer
``503 storage_unavailable``, never a 404.

Retrieve, delete and input_items cost no tokens: they are neither admitted
against the caps nor written to the usage log. Retrieve and input_items need
the event to be open; delete works with a valid credential at any time, so an
attendee can always erase what they stored.
"""

from __future__ import annotations

import contextlib
import functools
import hmac
import logging
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from azure.core.exceptions import ResourceExistsError, ResourceNotFoundError
from starlette.responses import Response

from proxy.admission.requestlog import row_key
from proxy.errors import (
    InvalidRequest,
    MaxTokensExceedsCap,
    NotFound,
    ProxyError,
    UpstreamError,
)
from proxy.ledger.ending import Answer, Keep
from proxy.ledger.usage import UsageRecord
from proxy.storage.tables import Tables, guarded
from proxy.upstream.client import Upstream, read_answer
from proxy.upstream.payload import Prepared, set_identity
from proxy.upstream.transport import UpstreamResponse

log = logging.getLogger("proxy.responses")

RESPONSE_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
ROW_PREFIX = "response|"
TERMINAL_EVENTS = frozenset({"response.completed", "response.incomplete", "response.failed"})
# Query parameters passed upstream, per route; the rest (``api-version``, ``stream``...) are the proxy's.
RETRIEVE_QUERY = frozenset({"include", "include[]", "include_obfuscation"})
INPUT_ITEMS_QUERY = frozenset({"limit", "order", "after", "before", "include", "include[]"})
_JSON = "application/json"
_TYPE_PREFIX = b'data: {"type":"'


@dataclass(frozen=True, slots=True)
class Owner:
    """The attendee a stored response belongs to."""

    event_id: str
    user: str


def not_found(response_id: str, param: str | None = None) -> NotFound:
    """The 404 for a response that does not exist, or is not the caller's: the same either way."""
    named = f" with id '{response_id}'" if RESPONSE_ID.fullmatch(response_id) else ""
    prefix = "Previous response" if param == "previous_response_id" else "Response"
    return NotFound(f"{prefix}{named} not found.", param=param)


class Ownership:
    """Who made each stored response, in ``proxyrequests`` (see the module docstring)."""

    def __init__(self, tables: Tables) -> None:
        self._tables = tables

    async def claim(self, owner: Owner, response_id: str, record: UsageRecord) -> None:
        entity = {
            "PartitionKey": owner.event_id,
            "RowKey": ROW_PREFIX + response_id,
            "user": owner.user,
            "model": record.model,
            "created_at": datetime.now(UTC),
            # Where its usage is logged: a request that continues it carries its tokens (``context_tokens``).
            "request_id": record.request_id,
            "day": record.admission.day,
        }
        with contextlib.suppress(ResourceExistsError):  # a retried write that had landed; ids are unique
            await self._tables.insert(self._tables.requests, entity)

    async def owns(self, owner: Owner, response_id: str) -> bool:
        return await self.row(owner, response_id) is not None

    async def row(self, owner: Owner, response_id: str) -> dict[str, Any] | None:
        """The ownership row of one of the caller's responses; None if it is not theirs, or not stored."""
        if not RESPONSE_ID.fullmatch(response_id):
            return None
        try:
            entity = await guarded(self._tables.requests.get_entity(owner.event_id, ROW_PREFIX + response_id))
        except ResourceNotFoundError:
            return None
        return entity if hmac.compare_digest(str(entity.get("user", "")).encode(), owner.user.encode()) else None

    async def context_tokens(self, owner: Owner, row: dict[str, Any]) -> int:
        """The tokens a request continuing this response carries: its input and output, as logged.

        Upstream prepends the whole chain (the input of the response continued already
        held its own predecessors'). 0 when its record is not stored yet (still being
        generated) or the row predates this field.
        """
        request_id, day = row.get("request_id"), row.get("day")
        if not isinstance(request_id, str) or not isinstance(day, str):
            return 0
        try:
            _, logged = await self._tables.usage_entities.get(owner.event_id, row_key(day, request_id))
        except ResourceNotFoundError:
            return 0
        return int(logged.get("prompt_tokens", 0)) + int(logged.get("completion_tokens", 0))

    async def forget(self, owner: Owner, response_id: str) -> None:
        with contextlib.suppress(ResourceNotFoundError):
            await guarded(self._tables.requests.delete_entity(owner.event_id, ROW_PREFIX + response_id))


class ResponsesApi:
    """Bodies, ownership and relaying for the Responses API routes."""

    def __init__(self, tables: Tables, upstream: Upstream) -> None:
        self.ownership = Ownership(tables)
        self._upstream = upstream

    async def prepare(self, payload: dict[str, Any], owner: Owner, cap: int, user_id: str) -> Prepared:
        """The body for upstream: 400 for a refused field, 404 for a ``previous_response_id`` not the caller's."""
        if payload.get("conversation") is not None:
            raise InvalidRequest(
                "'conversation' refers to a conversation kept upstream, which this proxy cannot check is yours. "
                "Chain responses with 'previous_response_id', or send the history in 'input'.",
                param="conversation",
            )
        background = payload.get("background")
        if background is True:
            raise InvalidRequest(
                "'background' responses are not available through this proxy (their usage could not be "
                "recorded). Use 'stream': true for long answers.",
                param="background",
            )
        if background is not None and background is not False:
            # Not a boolean ("true", 1): refused here, never forwarded for upstream to read as true.
            raise InvalidRequest("'background' must be false or left out.", param="background")
        if "session_id" in payload:
            raise InvalidRequest(
                "'session_id' is for chat completions. With the Responses API, chain turns with "
                "'previous_response_id'.",
                param="session_id",
            )
        items = payload.get("input")
        if isinstance(items, list) and any(isinstance(i, dict) and i.get("type") == "item_reference" for i in items):
            raise InvalidRequest(
                "Items of type 'item_reference' in 'input' point at items stored upstream, which this proxy "
                "cannot check are yours. Send the item itself, or use 'previous_response_id'.",
                param="input",
            )
        stream = payload.get("stream", False)
        if stream is not None and not isinstance(stream, bool):
            raise InvalidRequest("'stream' must be true or false.", param="stream")
        asked = payload.get("max_output_tokens")
        if asked is None:
            payload["max_output_tokens"] = asked = cap
        elif isinstance(asked, bool) or not isinstance(asked, int) or asked < 1:
            raise InvalidRequest("'max_output_tokens' must be a positive integer.", param="max_output_tokens")
        elif asked > cap:
            raise MaxTokensExceedsCap(
                f"'max_output_tokens' is {asked}, above this event's cap of {cap} tokens per request. "
                f"Ask for {cap} or fewer.",
                param="max_output_tokens",
            )
        previous = payload.get("previous_response_id")
        context = 0
        if previous is not None:
            row = await self.ownership.row(owner, previous) if isinstance(previous, str) else None
            if row is None:
                raise not_found(previous if isinstance(previous, str) else "", "previous_response_id")
            context = await self.ownership.context_tokens(owner, row)
        deployment = self._upstream.responses_deployment(str(payload.get("model")))
        if deployment is None:
            raise UpstreamError(
                f"The model '{payload.get('model')}' has no deployment on the backend that serves the Responses API "
                "(the first in AZURE_OPENAI_BACKENDS); the operator should add it there."
            )
        payload["model"] = deployment
        set_identity(payload, user_id)
        return Prepared(orjson.dumps(payload), bool(stream), False, asked, context_tokens=context)

    def claim(self, answer: dict[str, Any] | None, record: UsageRecord, owner: Owner) -> Keep | None:
        """What a whole answer (``None`` unless upstream answered 200) keeps before it is released
        (``Answer.complete``): its owner, when upstream stored it; None when nothing is stored."""
        response_id = answer.get("id") if answer is not None else None
        if not isinstance(response_id, str) or answer is None or answer.get("store", True) is False:
            return None
        return functools.partial(self.ownership.claim, owner, response_id, record)

    async def stored(
        self, method: str, owner: Owner, response_id: str, suffix: str, query: list[tuple[str, str]], request_id: str
    ) -> Response:
        """Retrieve, delete or list the input items of one of the caller's stored responses."""
        if not await self.ownership.owns(owner, response_id):
            raise not_found(response_id)
        allowed = INPUT_ITEMS_QUERY if suffix else RETRIEVE_QUERY
        passed = [(name, value) for name, value in query if name in allowed]
        response = await self._upstream.send_v1(method, f"responses/{response_id}{suffix}", request_id, query=passed)
        body = await read_answer(response)
        if response.status_code >= 500:
            raise UpstreamError(f"Azure OpenAI failed with status {response.status_code} after retries.")
        if method == "DELETE" and response.status_code in (200, 204, 404):
            await self.ownership.forget(owner, response_id)
        media_type = response.headers.get("content-type", _JSON)
        return Response(
            body, status_code=response.status_code, media_type=media_type, headers={"x-request-id": request_id}
        )

    def relay(self, answer: Answer, response: UpstreamResponse, owner: Owner) -> AsyncIterator[bytes]:
        """A Responses stream event by event; the terminal event waits for the usage record (``Answer.relay``).

        The ``response.created`` event waits for the ownership row, so that
        the id a client sees can be retrieved at once.
        """
        stream = _Stream(answer, response, owner, self.ownership)
        return answer.relay(stream.events(), None, stream.error_event)


class _Stream:
    """One Responses stream's events for the client, and the last sequence number seen."""

    def __init__(self, answer: Answer, response: UpstreamResponse, owner: Owner, ownership: Ownership) -> None:
        self._answer = answer
        self._response = response
        self._owner = owner
        self._ownership = ownership
        self.sequence = -1

    def error_event(self, failure: ProxyError) -> bytes:
        return error_event(failure, self.sequence + 1)

    async def events(self) -> AsyncIterator[bytes]:
        """Upstream's events as they come; the terminal event, and whatever follows it, held in ``answer.ending``."""
        answer, record = self._answer, self._answer.record
        async for complete in _complete_events(self._response):
            if answer.ending:
                answer.ending += complete
                continue
            out: list[bytes] = []
            for event in complete.split(b"\n\n")[:-1]:
                block = event + b"\n\n"
                if answer.ending:
                    answer.ending += block
                    continue
                self.sequence += 1
                kind = _event_type(event)
                if kind != "response.created" and kind not in TERMINAL_EVENTS:
                    if kind.endswith(".delta"):
                        answer.relayed += 1  # about one token each, for the estimate
                    out.append(block)
                    continue
                payload = _data(event)
                self.sequence = _sequence(payload, self.sequence)
                found = payload.get("response") if payload else None
                found = found if isinstance(found, dict) else {}
                if kind in TERMINAL_EVENTS:
                    take_usage(record, found.get("usage"), found.get("model"))
                    if kind == "response.failed":
                        record.status = 502
                    answer.ending = block
                    continue
                response_id = found.get("id")
                if isinstance(response_id, str) and found.get("store", True) is not False:
                    if out:
                        yield b"".join(out)
                        out = []
                    await self._ownership.claim(self._owner, response_id, record)
                out.append(block)
            if out:
                yield b"".join(out)


async def _complete_events(response: UpstreamResponse) -> AsyncIterator[bytes]:
    """Upstream's stream in runs of complete events (each ending in a blank line), as they arrive."""
    pending = b""
    async for data in response.aiter_raw():
        pending += data
        end = pending.rfind(b"\n\n")
        if end >= 0:
            complete, pending = pending[: end + 2], pending[end + 2 :]
            yield complete
    if pending.strip():  # a last event without its blank line
        yield pending.rstrip(b"\r\n") + b"\n\n"


def take_usage(record: UsageRecord, usage: object, model: object = None) -> bool:
    """Read a Responses ``usage`` (``input_tokens``, ``output_tokens``, ``input_tokens_details``) into the record."""
    if not isinstance(usage, dict):
        return False
    return record.take_usage(
        {
            "prompt_tokens": usage.get("input_tokens"),
            "completion_tokens": usage.get("output_tokens", 0),
            "total_tokens": usage.get("total_tokens"),
            "prompt_tokens_details": usage.get("input_tokens_details"),
        },
        model,
    )


def error_event(error: ProxyError, sequence: int) -> bytes:
    """A Responses ``error`` event; its ``error`` object makes the SDKs raise."""
    detail = orjson.loads(error.body())["error"]
    data = {
        "type": "error",
        "sequence_number": sequence,
        "code": error.code,
        "message": error.message,
        "param": error.param,
        "error": detail,
    }
    return b"event: error\ndata: " + orjson.dumps(data) + b"\n\n"


def _event_type(event: bytes) -> str:
    """An event's type, from its ``event:`` line or the start of its data, without parsing the JSON."""
    if event.startswith(b"event:"):
        line = event.split(b"\n", 1)[0]
        return line[6:].strip().decode("utf-8", "replace")
    if event.startswith(_TYPE_PREFIX):
        start = len(_TYPE_PREFIX)
        end = event.find(b'"', start)
        return event[start:end].decode("utf-8", "replace") if end > 0 else ""
    return ""


def _data(event: bytes) -> dict[str, Any] | None:
    for line in event.split(b"\n"):
        if line.startswith(b"data:"):
            return _json(line[5:].strip())
    return None


def _json(body: bytes) -> dict[str, Any] | None:
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return parsed if isinstance(parsed, dict) else None


def _sequence(payload: dict[str, Any] | None, last: int) -> int:
    number = payload.get("sequence_number") if payload else None
    return number if isinstance(number, int) else last + 1
