"""Relaying a server-sent event stream from upstream, chunk by chunk.

Each read from upstream is forwarded as soon as it holds complete events
(``data: ...\\n\\n``); nothing waits for more than its own event. The usage
chunk (``"choices": []`` with a ``usage`` object) is read for the record and
dropped when the client did not ask for it. A stream that breaks off before
``data: [DONE]`` ends with an OpenAI-shaped error event, never a clean end, so
SDKs raise instead of returning a truncated answer.

The last event, ``data: [DONE]``, is held back until the request's usage is
stored (``Answer.relay``, the ending every stream shares): a client that saw ``[DONE]`` has its answer
recorded, whatever happens to the worker next. If storage refuses the record,
the stream ends with a ``storage_unavailable`` error event instead. A bug
while relaying ends it with an ``internal_error`` event naming the request id.
A chat session's turn (``proxy.conversations.sessions``) is read from the events as they
pass and stored before ``[DONE]`` too. A client that leaves is charged
(``proxy.ledger.ending``): upstream's usage if it came, else the estimate.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator

import orjson

from proxy.conversations.sessions import Turn
from proxy.errors import ProxyError
from proxy.ledger.ending import Answer
from proxy.ledger.usage import UsageRecord
from proxy.upstream.transport import UpstreamResponse

_DONE = b"data: [DONE]"
_USAGE = b'"usage"'
_NULL_USAGE = (b'"usage":null', b'"usage": null')


def relay(
    answer: Answer, response: UpstreamResponse, wants_usage: bool, session: Turn | None = None
) -> AsyncIterator[bytes]:
    """The client's stream; the answer ends through ``Answer.relay`` however the stream stops."""
    keep = None if session is None else functools.partial(_keep_turn, session, answer.record)
    return answer.relay(_events(answer, response, wants_usage, session), keep, _error_event)


async def _events(
    answer: Answer, response: UpstreamResponse, wants_usage: bool, session: Turn | None
) -> AsyncIterator[bytes]:
    """Upstream's events for the client as they come; ``data: [DONE]`` held back in ``answer.ending``."""
    record = answer.record
    pending = b""
    chunks = 0
    async for data in response.aiter_raw():
        pending += data
        end = pending.rfind(b"\n\n")
        if end < 0:
            continue
        complete, pending = pending[: end + 2], pending[end + 2 :]
        if session is not None:
            session.observe(complete)
        if _USAGE in complete:
            complete = _take_usage(complete, record, wants_usage)
        chunks += complete.count(b"\n\n")
        # The events relayed, less the first (prompt filter) and role chunks: the completion so far.
        answer.relayed = max(0, chunks - 2)
        done_at = complete.find(_DONE)
        if done_at >= 0:
            complete, answer.ending = complete[:done_at], complete[done_at:]
        if complete:
            yield complete
    if not answer.ending and pending.strip().startswith(_DONE):  # a last event without its blank line
        answer.ending = pending.rstrip(b"\r\n") + b"\n\n"


async def _keep_turn(session: Turn, record: UsageRecord) -> None:
    await session.keep(record.status)


def _error_event(failure: ProxyError) -> bytes:
    return b"data: " + failure.body() + b"\n\n"


def _take_usage(complete: bytes, record: UsageRecord, wants_usage: bool) -> bytes:
    """Read the usage event's figures; drop it unless the client asked for it."""
    kept: list[bytes] = []
    for event in complete.split(b"\n\n")[:-1]:
        if _USAGE in event and not any(n in event for n in _NULL_USAGE) and event.startswith(b"data: {"):
            try:
                chunk = orjson.loads(event[6:])
            except orjson.JSONDecodeError:
                chunk = None
            taken = isinstance(chunk, dict) and record.take_usage(chunk.get("usage"), chunk.get("model"))
            usage_only = taken and isinstance(chunk, dict) and not chunk.get("choices")
            if usage_only and not wants_usage:
                continue
        kept.append(event + b"\n\n")
    return b"".join(kept)
