"""Relaying a server-sent event stream from upstream, chunk by chunk.

Each read from upstream is forwarded as soon as it holds complete events
(``data: ...\\n\\n``); nothing waits for more than its own event. The usage
chunk (``"choices": []`` with a ``usage`` object) is read for the record and
dropped when the client did not ask for it. A stream that breaks off before
``data: [DONE]`` ends with an OpenAI-shaped error event, never a clean end, so
SDKs raise instead of returning a truncated answer.

The last event, ``data: [DONE]``, is held back until the request's usage is
stored (``UsageRecorder.commit``): a client that saw ``[DONE]`` has its answer
recorded, whatever happens to the worker next. If storage refuses the record,
the stream ends with a ``storage_unavailable`` error event instead. A bug
while relaying ends it with an ``internal_error`` event naming the request id.
A chat session's turn (``proxy.sessions``) is read from the events as they
pass and stored before ``[DONE]`` too.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import httpx
import orjson

from proxy.errors import ProxyError, StorageUnavailable, UpstreamError, internal_error
from proxy.sessions import Turn
from proxy.usage import UsageRecord, UsageRecorder

log = logging.getLogger("proxy.streaming")

_DONE = b"data: [DONE]"
_USAGE = b'"usage"'
_NULL_USAGE = (b'"usage":null', b'"usage": null')


async def relay(
    response: httpx.Response,
    record: UsageRecord,
    wants_usage: bool,
    recorder: UsageRecorder,
    session: Turn | None = None,
) -> AsyncIterator[bytes]:
    """Yield the client's stream; always closes upstream and stores the record (and the session's turn)."""
    pending = b""
    ending = b""  # the [DONE] event, sent once the record is stored
    broken = False
    client_gone = False
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
        client_gone = True  # the client disconnected: nothing more to send
        raise
    except Exception:
        log.exception("internal error while relaying a stream (request %s)", record.request_id)
        failure = internal_error(record.request_id)
    finally:
        await response.aclose()
        record.latency_ms = (time.perf_counter() - record.perf_start) * 1000
        if not ending or failure is not None:
            record.status = 499 if client_gone else 500 if failure is not None else 502
            if record.total_tokens == 0:
                # No usage chunk arrived: count the events relayed, less the
                # first (prompt filter) and role chunks, as completion tokens.
                record.completion_tokens = max(0, chunks - 2)
                record.total_tokens = record.prompt_tokens + record.completion_tokens
            recorder.submit(record)
    if failure is None and ending:
        try:
            await (recorder.commit(record) if session is None else session.commit(record, recorder))
        except StorageUnavailable as refused:
            failure = refused
        else:
            yield ending
            return
    if failure is None:
        reason = "broke off" if broken else "ended without [DONE]"
        message = f"The answer from Azure OpenAI {reason}; it is incomplete. Retry the request."
        failure = UpstreamError(message)
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
            usage_only = isinstance(chunk, dict) and record.take_usage(chunk.get("usage")) and not chunk.get("choices")
            if usage_only and not wants_usage:
                continue
        kept.append(event + b"\n\n")
    return b"".join(kept)
