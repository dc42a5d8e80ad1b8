"""What differs between the attendee's routes that reach upstream: one object per route.

The walk of a request (``Proxy.forward`` in ``proxy.edge.handlers``) is the
same for every route: credential, event, body, admission, upstream, relay,
settlement. At the steps where the routes differ, the walk asks the route's
object, never ``if kind == ...``:

- a ``Route`` (one per worker) turns the request's JSON body into a ``Call``
  (``prepare``): the body for upstream, checked and capped
  (``proxy.upstream.payload``), with what the request carries from before: a
  chat session's history (``proxy.conversations.sessions``: a session is a chat
  completion with ``session_id``), or the owner of a ``previous_response_id``
  (``proxy.conversations.responses``);
- the ``Call`` (one per request) sends that body upstream (``send``), relays
  a streamed answer (``relay``), reads a whole answer's ``usage`` into the
  record (``take_usage``) and says what is kept before the answer ends
  (``keep``: a session's turn, a stored response's owner), which
  ``proxy.ledger.ending`` stores, with the usage record, before the client
  sees the end.

The routes:

- ``ChatRoute`` (kind ``chat``): ``/openai/deployments/{model}/chat/completions``
  with failover; a stream ends with ``data: [DONE]``; with ``session_id``
  (``SessionCall``) the session's turn is kept.
- ``EmbeddingsRoute`` (kind ``embeddings``): ``.../{model}/embeddings``; never
  streamed, nothing kept.
- ``ResponsesRoute`` (kind ``responses``, ``ResponsesCall``): ``/openai/v1/responses``
  on one backend; ``usage`` in the Responses shape; a stream ends with
  ``response.completed``; the owner of a stored response is kept.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from typing import Any, Protocol

from proxy.conversations.responses import Owner, ResponsesApi
from proxy.conversations.responses import take_usage as take_responses_usage
from proxy.conversations.sessions import Sessions, Turn
from proxy.edge.streaming import relay
from proxy.ledger.ending import Answer, Keep
from proxy.ledger.usage import Kind, UsageRecord
from proxy.policy.events import Event
from proxy.upstream import payload as bodies
from proxy.upstream.client import Upstream
from proxy.upstream.transport import UpstreamResponse


class Route(Protocol):
    """One attendee route that reaches upstream; ``kind`` is what the usage log calls its requests."""

    kind: Kind

    async def prepare(self, payload: dict[str, Any], event: Event, user: str) -> Call:
        """The request's ``Call``: its body checked, capped and ready for upstream (400 or 404 when refused)."""
        ...


class Call:
    """One request on a route, from its prepared body to what is kept with its answer.

    This base is an operation on a model's deployment (chat completions and
    embeddings): sent to the model's backends with failover, a stream relayed
    as chat events, ``usage`` in OpenAI's shape, nothing kept.
    """

    __slots__ = ("operation", "prepared")

    def __init__(self, prepared: bodies.Prepared, operation: str) -> None:
        self.prepared = prepared
        self.operation = operation

    async def send(self, upstream: Upstream, model: str, request_id: str) -> UpstreamResponse:
        prepared = self.prepared
        return await upstream.send(model, self.operation, prepared.body, request_id, stream=prepared.stream)

    def relay(self, answer: Answer, response: UpstreamResponse) -> AsyncIterator[bytes]:
        return relay(answer, response, self.prepared.wants_usage)

    def take_usage(self, record: UsageRecord, answer: dict[str, Any]) -> None:
        """Read a whole answer's ``usage`` (and the model it names) into the record."""
        record.take_usage(answer.get("usage"), answer.get("model"))

    def keep(self, record: UsageRecord, body: bytes, answer: dict[str, Any] | None) -> Keep | None:
        """What to store with a whole answer before it is released (``Answer.complete``); None: only the record."""
        return None


class ChatRoute:
    """``/chat/completions``; with ``session_id``, a turn of a chat session."""

    kind: Kind = "chat"

    def __init__(self, sessions: Sessions) -> None:
        self._sessions = sessions

    async def prepare(self, payload: dict[str, Any], event: Event, user: str) -> Call:
        # The session's history goes in before the body is checked and sized: upstream receives both.
        session = await self._sessions.open(payload, event, user) if "session_id" in payload else None
        prepared = bodies.prepare_chat(payload, event.max_tokens, bodies.pseudonym(event.id, user))
        return Call(prepared, "chat/completions") if session is None else SessionCall(prepared, session)


class SessionCall(Call):
    """A chat completion in a session: the turn is read from the answer and stored before it ends."""

    __slots__ = ("session",)

    def __init__(self, prepared: bodies.Prepared, session: Turn) -> None:
        super().__init__(prepared, "chat/completions")
        self.session = session

    def relay(self, answer: Answer, response: UpstreamResponse) -> AsyncIterator[bytes]:
        return relay(answer, response, self.prepared.wants_usage, self.session)

    def keep(self, record: UsageRecord, body: bytes, answer: dict[str, Any] | None) -> Keep | None:
        return functools.partial(self.session.keep, record.status, body)


class EmbeddingsRoute:
    """``/embeddings``: never streamed, nothing kept."""

    kind: Kind = "embeddings"

    async def prepare(self, payload: dict[str, Any], event: Event, user: str) -> Call:
        return Call(bodies.prepare_embeddings(payload, bodies.pseudonym(event.id, user)), "embeddings")


class ResponsesRoute:
    """``POST /responses``: Azure OpenAI's v1 API on one backend; a stored response's owner kept."""

    kind: Kind = "responses"

    def __init__(self, responses: ResponsesApi) -> None:
        self._responses = responses

    async def prepare(self, payload: dict[str, Any], event: Event, user: str) -> Call:
        owner = Owner(event.id, user)
        prepared = await self._responses.prepare(payload, owner, event.max_tokens, bodies.pseudonym(event.id, user))
        return ResponsesCall(prepared, self._responses, owner)


class ResponsesCall(Call):
    """One ``POST /responses``: its own usage shape, stream and terminal event (``proxy.conversations.responses``)."""

    __slots__ = ("owner", "responses")

    def __init__(self, prepared: bodies.Prepared, responses: ResponsesApi, owner: Owner) -> None:
        super().__init__(prepared, "responses")
        self.responses = responses
        self.owner = owner

    async def send(self, upstream: Upstream, model: str, request_id: str) -> UpstreamResponse:
        return await upstream.send_v1("POST", "responses", request_id, body=self.prepared.body, label=model)

    def relay(self, answer: Answer, response: UpstreamResponse) -> AsyncIterator[bytes]:
        return self.responses.relay(answer, response, self.owner)

    def take_usage(self, record: UsageRecord, answer: dict[str, Any]) -> None:
        take_responses_usage(record, answer.get("usage"), answer.get("model"))

    def keep(self, record: UsageRecord, body: bytes, answer: dict[str, Any] | None) -> Keep | None:
        return self.responses.claim(answer, record, self.owner)
