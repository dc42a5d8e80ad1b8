"""How every answer that reached upstream ends: one path, which a cancellation cannot skip.

Once upstream has the request, ``proxy.edge.handlers`` wraps it in an ``Answer``:
chat, embeddings and Responses, streamed or not, with a chat session or
without. An answer ends exactly once, in one of two ways.

- ``complete``: upstream's answer is complete (a body read in full, a stream
  up to its last event). What goes with it is kept first (a chat session's
  turn, a stored response's owner), then its usage record is committed, and
  only then may the end of the answer reach the client. With something to
  keep, this runs in a task of its own, shielded: a client that leaves
  meanwhile (its stream's task is cancelled) does not stop it, so the turn and
  the record are stored whatever the client does. Without, the record is
  queued before the first await (``UsageRecorder.commit``), which no
  cancellation can skip either, and costs no task.
- ``abandon``: the answer ends before it is complete: the client left
  (``CLIENT_GONE``, 499), upstream broke off (502) or was too slow (504), or a
  bug (500). It never awaits, so no cancellation can cut it short: the record
  is queued at once (``UsageRecorder.submit``), and the caller closes the
  upstream response right after, so that Azure OpenAI stops generating.

Streams (chat and Responses alike) are relayed by ``Answer.relay``, which
holds their one ending: the kind's own generator yields what the client gets
and holds back the last event (``Answer.ending``: ``data: [DONE]``, or the
Responses terminal event), which goes out only once ``complete`` has stored
the record; a stream that broke off, a bug, or storage refusing ends with the
kind's error event instead. ``AnswerStream`` is the streamed answer's
response: however the server stops sending it (the client left, the stream
was never even started), it abandons its answer, so no stream that reached
upstream goes unrecorded.

The charging rule: a request that reached Azure OpenAI is charged, whatever
the client does afterwards. Its slot stays taken (daily request cap, event
request budget) and its tokens count (``UsageRecord.estimate``): upstream's
``usage`` when it came; otherwise an estimate, marked ``estimated`` in the
request log: the prompt as ceil(bytes / 4) of the body sent upstream
(session history and chained context included), plus one completion token per
content event relayed so far. Only when upstream itself failed (an error
status, a stream it broke off) or storage refused the record is the slot
given back; its tokens still count.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable

import httpx
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from proxy.admission.days import CLIENT_GONE
from proxy.errors import ProxyError, StorageUnavailable, UpstreamError, internal_error
from proxy.ledger.usage import UsageRecord, UsageRecorder
from proxy.upstream.transport import UpstreamResponse

log = logging.getLogger("proxy.ending")

Keep = Callable[[], Awaitable[None]]


class Answer:
    """One request that reached upstream, from then until its record is stored; it ends once."""

    def __init__(self, record: UsageRecord, recorder: UsageRecorder, response: UpstreamResponse | None) -> None:
        self.record = record
        self._recorder = recorder
        self._response = response
        self.relayed = 0  # completion tokens relayed so far (streams), for the estimate
        self.ending = b""  # a stream's last event, held back until the record is stored
        self.ended = False

    def abandon(self, status: int) -> None:
        """End the answer before it is complete: queue its record, charged as the module says. Never awaits."""
        if self.ended:
            return
        self.ended = True
        record = self.record
        record.status = status
        record.latency_ms = (time.perf_counter() - record.perf_start) * 1000
        record.estimate(self.relayed)
        self._recorder.submit(record)

    async def close(self) -> None:
        """Close the upstream response (a stream cut short closes its connection: Azure stops generating)."""
        if self._response is not None:
            await self._response.aclose()

    async def complete(self, keep: Keep | None = None) -> None:
        """Keep what goes with the answer, then commit its record; runs to its end even if the caller is cancelled.

        Raises ``StorageUnavailable`` when storage refused the turn, the owner
        or the record: the answer is then withheld, and its record kept as a
        failed request (503).
        """
        if self.ended:
            raise RuntimeError(f"answer {self.record.request_id} ended twice")
        self.ended = True
        self.record.latency_ms = (time.perf_counter() - self.record.perf_start) * 1000
        self.record.estimate(self.relayed)
        if keep is None:
            # The record is queued before the first await (``UsageRecorder.commit``): nothing to shield,
            # and no task on the hot path of plain chat, streams and embeddings.
            await self._recorder.commit(self.record)
            return
        ending = asyncio.ensure_future(self._complete(keep))
        ending.add_done_callback(_seen)
        await asyncio.shield(ending)

    async def relay(
        self, events: AsyncIterator[bytes], keep: Keep | None, error_event: Callable[[ProxyError], bytes]
    ) -> AsyncIterator[bytes]:
        """Yield a stream to the client, and end the answer however the stream stops.

        ``events`` yields what the client gets as upstream sends it, and leaves
        the last event in ``ending``; ``keep`` is what to store before it goes
        out; ``error_event`` the kind's error event, which ends a stream that
        could not complete (the SDKs raise on it, never return a truncated answer).
        """
        request_id = self.record.request_id
        broken = False
        failure: ProxyError | None = None
        try:
            async for chunk in events:
                yield chunk
        except httpx.TransportError:
            log.warning("upstream stream broke off (request %s)", request_id)
            broken = True
        except (GeneratorExit, asyncio.CancelledError):
            self.abandon(CLIENT_GONE)  # the client disconnected: nothing more to send
            raise
        except ProxyError as error:  # storage refused what goes with the answer (a stored response's owner)
            failure = error
        except Exception:
            log.exception("internal error while relaying a stream (request %s)", request_id)
            failure = internal_error(request_id)
        finally:
            await self.close()
        if failure is None and self.ending:
            try:
                await self.complete(keep)
            except StorageUnavailable as refused:
                failure = refused
            else:
                yield self.ending
                return
        if failure is None:
            reason = "broke off" if broken else "ended before its last event"
            failure = UpstreamError(f"The answer from Azure OpenAI {reason}; it is incomplete. Retry the request.")
        self.abandon(failure.status)  # a no-op when storage refused the completed answer
        yield error_event(failure)

    async def _complete(self, keep: Keep) -> None:
        try:
            await keep()
        except StorageUnavailable:
            self.record.status = 503  # the answer is withheld: a failed request
            self._recorder.submit(self.record)
            raise
        except Exception:
            log.exception("internal error while ending an answer (request %s)", self.record.request_id)
            self.record.status = 500
            self._recorder.submit(self.record)
            raise
        await self._recorder.commit(self.record)


class AnswerStream(StreamingResponse):
    """A streamed answer that is abandoned (client gone) however the server stops sending it."""

    def __init__(self, answer: Answer, content: AsyncIterable[bytes], headers: dict[str, str]) -> None:
        super().__init__(content, media_type="text/event-stream", headers=headers)
        self.answer = answer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            # A no-op when the stream ended; otherwise the client left, perhaps before the first byte.
            self.answer.abandon(CLIENT_GONE)
            await self.answer.close()


def _seen(ending: asyncio.Future[None]) -> None:
    """Retrieve an ending's error when its caller had left (the record is queued for a retry already)."""
    if not ending.cancelled():
        ending.exception()
