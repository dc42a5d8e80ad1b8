"""Request bodies: reading them within the size limit and the worker's memory budget, and the fields the proxy owns.

Two bounds keep one attendee from exhausting an instance's memory. Each body
is at most ``MAX_REQUEST_BYTES`` (413 ``request_too_large``; default 28 MiB,
see ``proxy.config.settings``). And all the bodies a worker holds at once are at
most ``BODY_MEMORY_BYTES`` (``BodyBudget``): a body that would pass it is
refused before it is read (as it is read, when no length is declared), with
503 ``server_busy`` and ``Retry-After: 1``
(the official SDKs retry it). A body is held from its first byte until its
request's handler returns, which is when the bytes read, the parsed object and
the body sent upstream are all let go (a streamed answer keeps none of them).
Bodies over ``SMALL_BODY_BYTES`` may fill only three quarters of the budget,
and one attendee's only half of that: the last quarter stays for ordinary
requests, and the other half of the rest for other attendees' large ones, so
others are served while one sends large images as fast as they can.

Every field the client sent is forwarded untouched except ``stream_options``
(``include_usage`` is added to streams), ``max_tokens`` /
``max_completion_tokens`` (checked against the event's cap; when the client
sent neither, ``max_completion_tokens`` is set to it), and ``user`` and
``safety_identifier`` (the attendee's identity upstream, for abuse monitoring:
``user`` is always set to a pseudonym of event and attendee, and
``safety_identifier``, when the client sent one, is replaced by the same
pseudonym, never forwarded as the attendee wrote it); ``session_id`` is kept by
``proxy.conversations.sessions`` and never forwarded.
``messages`` may arrive as a JSON string holding the array and ``stop`` as a
string or an array; both are normalised.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.requests import Request

from proxy.errors import InvalidRequest, MaxTokensExceedsCap, RequestTooLarge, ServerBusy

SMALL_BODY_BYTES = 256 * 1024
MIB = 1024 * 1024


class BodyBudget:
    """The bytes of request bodies one worker holds at once, shared by its concurrent requests.

    One event loop runs a worker's requests, so the counts need no lock.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.large_ceiling = capacity - capacity // 4
        self.owner_share = self.large_ceiling // 2
        self.held = 0
        self.by_owner: dict[str, int] = {}

    def hold(self, request: Request, size: int, owner: str | None = None) -> None:
        """Let ``request`` hold ``size`` bytes of body in all (declared, or read so far), or 503 ``server_busy``."""
        more = size - getattr(request.state, "body_bytes", 0)
        if more <= 0:
            return
        large = size > SMALL_BODY_BYTES
        if large and owner is not None and self.by_owner.get(owner, 0) + more > self.owner_share:
            raise ServerBusy(
                f"Your requests already hold {self.by_owner.get(owner, 0) // MIB} MiB of request bodies on this proxy "
                f"instance, as much as one attendee may ({self.owner_share // MIB} MiB); retry once an answer has "
                "come back. Images sent by URL rather than inline (base64) keep a request small."
            )
        if self.held + more > (self.large_ceiling if large else self.capacity):
            raise ServerBusy(
                f"This proxy instance is holding as many request bodies as its memory allows "
                f"({self.capacity // MIB} MiB); retry in a second. Images sent by URL rather than "
                "inline (base64) keep a request small."
            )
        self.held += more
        request.state.body_bytes = size
        request.state.body_budget = self
        if owner is not None:
            self.by_owner[owner] = self.by_owner.get(owner, 0) + more
            request.state.body_owner = owner

    def release(self, request: Request) -> None:
        held = getattr(request.state, "body_bytes", 0)
        self.held -= held
        request.state.body_bytes = 0
        owner: str | None = getattr(request.state, "body_owner", None)
        if owner is not None and held:
            left = self.by_owner.pop(owner) - held
            if left:
                self.by_owner[owner] = left


def release_body(request: Request) -> None:
    """Give back what ``request``'s body held of its worker's budget (once its handler has returned)."""
    budget: BodyBudget | None = getattr(request.state, "body_budget", None)
    if budget is not None:
        budget.release(request)


async def read_json(
    request: Request, limit: int, budget: BodyBudget | None = None, owner: str | None = None
) -> dict[str, Any]:
    """The body as a JSON object; 413 past ``limit`` bytes, 503 past ``budget`` (or ``owner``'s share of it),
    400 if not an object."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit():
        if int(declared) > limit:
            raise _too_large(limit)
        if budget is not None:
            budget.hold(request, int(declared), owner)  # refused before a byte is read
    body = await _read_limited(request, limit, budget, owner)
    if not body:
        raise InvalidRequest("The request body is empty; send a JSON object.")
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise InvalidRequest("The request body is not valid JSON.") from None
    if not isinstance(payload, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    return payload


async def _read_limited(request: Request, limit: int, budget: BodyBudget | None, owner: str | None) -> bytearray:
    body = bytearray()  # grown in place: no list of chunks joined into a second copy
    async for chunk in request.stream():
        size = len(body) + len(chunk)
        if size > limit:
            raise _too_large(limit)
        if budget is not None:
            budget.hold(request, size, owner)  # no-op within a declared length
        body += chunk
    return body


def _too_large(limit: int) -> RequestTooLarge:
    return RequestTooLarge(f"The request body is larger than this proxy's limit of {limit // 1024} KiB.")


def pseudonym(event_id: str, user: str) -> str:
    """The stable ``user`` sent upstream: one id per attendee, not their name."""
    return hashlib.sha256(f"{event_id}/{user}".encode()).hexdigest()[:32]


def set_identity(payload: dict[str, Any], user_id: str) -> None:
    """Put the attendee's pseudonym in the fields that tell upstream who is asking."""
    payload["user"] = user_id
    if "safety_identifier" in payload:
        payload["safety_identifier"] = user_id


def requested_model(payload: dict[str, Any], deployment: str | None) -> str:
    """The deployment named by the path (Azure style) or by ``model`` (OpenAI style)."""
    if deployment is not None:
        return deployment
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("'model' is required: name one of the event's models.", param="model")
    return model


@dataclass(slots=True)
class Prepared:
    """A body ready for upstream, and what the proxy needs to know of it."""

    body: bytes
    stream: bool
    wants_usage: bool
    max_tokens: int
    context_tokens: int = 0  # what upstream prepends that the body does not hold (``previous_response_id``)

    def estimates(self, choices: object) -> tuple[int, int]:
        """What the request may cost, its prompt and in all: ceil(bytes / 4) of the body for the prompt, plus
        the context upstream prepends (a chained response's), and ``max_tokens`` for each of ``n`` choices."""
        prompt = -(-len(self.body) // 4) + self.context_tokens
        return prompt, prompt + self.max_tokens * (choices if type(choices) is int and choices > 0 else 1)


def chat_messages(payload: dict[str, Any]) -> list[Any]:
    """``messages`` as a non-empty list, parsed in place when it arrived as a JSON string."""
    messages = payload.get("messages")
    if isinstance(messages, str):
        try:
            messages = orjson.loads(messages)
        except orjson.JSONDecodeError:
            raise InvalidRequest("'messages' is a string but not a JSON array.", param="messages") from None
        payload["messages"] = messages
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("'messages' must be a non-empty array of messages.", param="messages")
    return messages


def prepare_chat(payload: dict[str, Any], cap: int, user_id: str) -> Prepared:
    chat_messages(payload)
    stop = payload.get("stop")
    if stop is not None and not isinstance(stop, str | list):
        raise InvalidRequest("'stop' must be a string or an array of strings.", param="stop")
    if isinstance(stop, list) and not all(isinstance(s, str) for s in stop):
        raise InvalidRequest("'stop' must be a string or an array of strings.", param="stop")
    stream = payload.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise InvalidRequest("'stream' must be true or false.", param="stream")
    asked = None
    for field in ("max_tokens", "max_completion_tokens"):
        value = payload.get(field)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InvalidRequest(f"'{field}' must be a positive integer.", param=field)
        if value > cap:
            raise MaxTokensExceedsCap(
                f"'{field}' is {value}, above this event's cap of {cap} tokens per request. Ask for {cap} or fewer.",
                param=field,
            )
        asked = value if asked is None else max(asked, value)
    if asked is None:
        # max_completion_tokens, not max_tokens: reasoning models (o-series, gpt-5) refuse max_tokens,
        # and the others take either (Azure OpenAI GA API 2024-10-21 and later).
        payload["max_completion_tokens"] = cap
    options = payload.pop("stream_options", None)
    wants_usage = isinstance(options, dict) and options.get("include_usage") is True
    if stream:
        payload["stream_options"] = (
            {**options, "include_usage": True} if isinstance(options, dict) else {"include_usage": True}
        )
    set_identity(payload, user_id)
    return Prepared(orjson.dumps(payload), bool(stream), wants_usage, asked or cap)


def prepare_embeddings(payload: dict[str, Any], user_id: str) -> Prepared:
    if "input" not in payload:
        raise InvalidRequest("'input' is required: a string or an array of strings.", param="input")
    if "session_id" in payload:  # never sent upstream (proxy.conversations.sessions)
        raise InvalidRequest("'session_id' is for chat completions, not embeddings.", param="session_id")
    set_identity(payload, user_id)
    return Prepared(orjson.dumps(payload), False, False, 0)
