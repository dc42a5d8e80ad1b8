"""Relaying a server-sent event stream from upstream, chunk by chunk.

Each read from upstream is forwarded as soon as it holds complete events
(``data: ...\\n\\n``); nothing waits for more than its own event. The usage
chunk (``"choices": []`` with a ``usage`` object) is read for the record and
dropped when the client did not ask for it. A stream that breaks off before
``data: [DONE]`` ends with an OpenAI-shaped error event, never a clean end, so
SDKs raise instead of returning a truncated answer.

The last event, ``data: [DONE]``, is held back until the request's usage is
stored (``Answer.complete``): a client that saw ``[DONE]`` has its answer
recorded, whatever happens to the worker next. If storage refuses the record,
the stream ends with a ``storage_unavailable`` error event instead. A bug
while relaying ends it with an ``internal_error`` event naming the request id.
A chat session's turn (``proxy.sessions``) is read from the events as they
pass and stored before ``[DONE]`` too. A client that leaves is charged
(``proxy.ending``): upstream's usage if it came, else the estimate.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import httpx
import orjson

from proxy.ending import Answer
from proxy.errors import ProxyError, StorageUnavailable, UpstreamError, internal_error
from proxy.limits import CLIENT_GONE
from proxy.sessions import Turn
from proxy.usage import UsageRecord

log = logging.getLogger("proxy.streaming")

_DONE = b"data: [DONE]"
_USAGE = b'"usage"'
_NULL_USAGE = (b'"usage":null', b'"usage": null')


async def relay(
    answer: Answer, response: httpx.Response, wants_usage: bool, session: Turn | None = None
) -> AsyncIterator[bytes]:
    """Yield the client's stream; the answer ends through ``proxy.ending`` however the stream stops."""
    record = answer.record
    pending = b""
    ending = b""  # the [DONE] event, sent once the record is stored
    broken = False
    failure: ProxyError | None = None
    chunks = 0
    try:
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
                complete, ending = complete[:done_at], complete[done_at:]
            if complete:
                yield complete
        if not ending and pending.strip().startswith(_DONE):  # a last event without its blank line
            ending = pending.rstrip(b"\r\n") + b"\n\n"
    except httpx.TransportError:
        log.warning("upstream stream broke off (request %s)", record.request_id)
        broken = True
    except (GeneratorExit, asyncio.CancelledError):
        answer.abandon(CLIENT_GONE)  # the client disconnected: nothing more to send
        raise
    except Exception:
        log.exception("internal error while relaying a stream (request %s)", record.request_id)
        failure = internal_error(record.request_id)
    finally:
        await answer.close()
    if failure is None and ending:
        try:
            await answer.complete(None if session is None else lambda: session.keep(record.status))
        except StorageUnavailable as refused:
            failure = refused
        else:
            yield ending
            return
    if failure is None:
        reason = "broke off" if broken else "ended without [DONE]"
        message = f"The answer from Azure OpenAI {reason}; it is incomplete. Retry the request."
        failure = UpstreamError(message)
    answer.abandon(failure.status)  # a no-op when storage refused the completed answer
    yield b"data: " + failure.body() + b"\n\n"


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
