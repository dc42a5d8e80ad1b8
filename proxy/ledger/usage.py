"""Usage: recording each upstream request, its log entry and its attendee's day stored together.

An answer's end reaches its client only once its usage is stored. A
finished request hands a ``UsageRecord`` to the ``UsageRecorder`` and waits
for it (``commit``); all the records pending at that moment are stored
together, so requests that finish together share their writes. Both halves
of a record live in ``proxyusage``, in its event's partition: the request's
log entry (attendee, model, kind, stream, status, tokens, latency, time,
backend: its own row, ``RowKey="log|<YYYY-MM-DD>|<request id>"``, or with the
others of its transaction in one, ``proxy.admission.requestlog``) and its attendee's day
(``RowKey="<YYYY-MM-DD>|<user>"``, see ``proxy.admission.days``). One entity group
transaction per event writes both, so the log and the days never disagree,
and a retried write finds the log entry already there instead of counting a
request twice.

What a kill can do, then: lose nothing a client received in full, since the
end of every answer waits for its record; charge a request whose record was
stored an instant before the kill and whose last bytes were still on their
way; and leave the slot of a request that was cut off reserved, until
``proxy.ledger.reconcile`` gives it back. During a storage outage, an answer whose
record cannot be stored is withheld (503 ``storage_unavailable``, or an error
event instead of a stream's ``[DONE]``) and kept as a failed request for a
retry; new requests are refused before they reach upstream until storage
takes the backlog, so memory holds only what was in flight.

The reports organizers read are ``proxy.ledger.reports``'s.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from proxy.admission import requestlog
from proxy.admission.days import Admission, Finished, Settlement, keeps_slot
from proxy.admission.limits import Ledger
from proxy.config.prices import Priced, PriceTable, usd
from proxy.errors import StorageUnavailable
from proxy.observability.telemetry import Telemetry
from proxy.storage.tables import Tables

log = logging.getLogger("proxy.usage")

# One write at a time, the records that finish meanwhile going together in the next: make bench's chat at
# concurrency 64 with caps served 391 req/s this way, against 354-377 with 2 or 4 (smaller transactions, more).
CONCURRENT_BATCHES = 1
CONCURRENT_SETTLES = 32
MAX_BACKOFF_SECONDS = 2.0

Kind = Literal["chat", "embeddings", "responses"]  # what the request log calls a request (proxy.edge.routes)


@dataclass(slots=True)
class UsageRecord:
    """One request's outcome, as written to storage."""

    event_id: str
    user: str
    model: str
    kind: Kind
    stream: bool
    admission: Admission
    request_id: str
    started_at: datetime
    perf_start: float = 0.0
    status: int = 0
    latency_ms: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    reached_upstream: bool = False
    backend: str = ""  # the upstream backend that answered (proxy.config.backends)
    upstream_status: int = 0  # what upstream answered (0: the client left before it did)
    prompt_estimate: int = 0  # ceil(bytes / 4) of the body sent upstream, and what chained context it carries
    measured: bool = False  # the tokens are upstream's (its ``usage``), not the estimate
    estimated: bool = False
    cached_tokens: int = 0  # of the prompt tokens, those upstream served from its prompt cache
    upstream_model: str = ""  # the model upstream's answer names (gpt-4o-mini-2024-07-18): its price applies
    priced: Priced | None = None  # set when the record is settled (proxy.config.prices)
    stored: bool = field(default=False, repr=False)
    refused: bool = field(default=False, repr=False)  # storage refused it as invalid (Ledger._refused)

    def log_entity(self) -> dict[str, Any]:
        """This request's entry in the request log."""
        return {
            "PartitionKey": self.event_id,
            "RowKey": requestlog.row_key(self.admission.day, self.request_id),
            "request_id": self.request_id,
            "time": self.started_at.isoformat(),
            "user": self.user,
            "model": self.model,
            "kind": self.kind,
            "stream": self.stream,
            "status": self.status,
            "latency_ms": round(self.latency_ms, 1),
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
            "estimated": self.estimated,
            "backend": self.backend,
            "cached_tokens": self.cached_tokens,
            # The model it was priced as ("" when none was known) and its cost, USD.
            "priced_as": self.priced.model if self.priced else "",
            "cost": usd(self.priced.cost_nanos) if self.priced else 0.0,
        }

    def take_usage(self, usage: object, model: object = None) -> bool:
        """Read upstream's ``usage`` object (and the ``model`` its answer names) into this record;
        False if it is not one.

        Embeddings report no ``completion_tokens``: they count as 0. Cached prompt
        tokens come from ``prompt_tokens_details.cached_tokens``.
        """
        if not isinstance(usage, dict):
            return False
        prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens", 0)
        if not (isinstance(prompt, int) and isinstance(completion, int)):
            return False
        total = usage.get("total_tokens")
        self.prompt_tokens, self.completion_tokens = prompt, completion
        self.total_tokens = total if isinstance(total, int) else prompt + completion
        details = usage.get("prompt_tokens_details")
        cached = details.get("cached_tokens") if isinstance(details, dict) else None
        self.cached_tokens = min(cached, prompt) if isinstance(cached, int) and cached > 0 else 0
        if isinstance(model, str) and model:
            self.upstream_model = model
        self.measured = True
        return True

    def estimate(self, relayed: int) -> None:
        """Charge the estimate when upstream's ``usage`` never came: the prompt estimate, and ``relayed``
        completion tokens (the content events relayed so far). Nothing for what never reached upstream,
        nor for an answer upstream refused (an error status: it bills nothing)."""
        if self.measured or not self.reached_upstream or self.upstream_status >= 300:
            return
        self.prompt_tokens, self.completion_tokens = self.prompt_estimate, relayed
        self.total_tokens = self.prompt_tokens + relayed
        self.estimated = True

    def finished(self, prices: PriceTable) -> Finished:
        self.priced = prices.price(
            self.upstream_model, self.model, self.prompt_tokens, self.cached_tokens, self.completion_tokens
        )
        log_entity = self.log_entity() if self.reached_upstream else None
        return Finished(self.user, self.admission, self.settlement(), log_entity)

    def settlement(self) -> Settlement:
        priced = self.priced or Priced("", 0)
        return Settlement(
            model=self.model,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            total_tokens=self.total_tokens,
            reached_upstream=self.reached_upstream,
            succeeded=self.reached_upstream and keeps_slot(self.status),
            backend=self.backend,
            cached_tokens=self.cached_tokens,
            cost_nanos=priced.cost_nanos,
            unpriced=self.reached_upstream and priced.unpriced,
        )


def _refused() -> StorageUnavailable:
    return StorageUnavailable("Table Storage refused this request's usage record, so its answer was withheld.")


class UsageRecorder:
    """Stores finished requests: at once and together (group commit), retrying what fails.

    ``commit`` is for answers being delivered: it returns once the record is
    stored, so the caller can release the end of the answer after it, and
    raises ``StorageUnavailable`` when storage refused it. ``submit`` is for
    requests that ended without a full answer (errors, clients gone): it
    returns at once and the record is stored in the background.

    Every record pending when a write starts goes into that write: one
    request-log insert per request, and one conditional write per attendee and
    day, however many of that attendee's requests it carries. Up to
    ``CONCURRENT_BATCHES`` writes run at once (one: a request that finishes
    during a write goes in the next, with all the others that finished
    meanwhile). A record that storage could
    not take is retried with backoff; while any is waiting, ``check_storage``
    refuses new requests, so no answer goes out whose usage cannot be recorded,
    and the backlog holds at most the requests that were in flight when
    storage went away.
    """

    def __init__(self, tables: Tables, ledger: Ledger, prices: PriceTable, telemetry: Telemetry | None = None) -> None:
        self._tables = tables
        self._prices = prices
        self._telemetry = telemetry or Telemetry()
        self._ledger = ledger
        self._pending: list[UsageRecord] = []
        self._waiters: dict[int, asyncio.Future[None]] = {}
        self._writing = 0
        self._backlog: list[UsageRecord] = []
        self._retrier: asyncio.Task[None] | None = None
        self._settling = asyncio.Semaphore(CONCURRENT_SETTLES)
        self._idle = asyncio.Event()
        self._idle.set()
        self._batches: set[asyncio.Task[None]] = set()

    @property
    def _retrying(self) -> bool:
        return self._retrier is not None and not self._retrier.done()

    @property
    def unstored(self) -> int:
        """Records not yet stored: pending, being written or waiting for a retry."""
        return len(self._pending) + self._writing + len(self._backlog)

    def check_storage(self) -> None:
        """Refuse a new request while records wait for storage to come back."""
        if self._retrying:
            raise StorageUnavailable(
                "Table Storage cannot be reached right now, so usage cannot be recorded; the request was not "
                "sent. Try again shortly."
            )

    async def commit(self, record: UsageRecord) -> None:
        """Store the record now, with whatever else is pending; raise ``StorageUnavailable`` if refused."""
        done = asyncio.get_running_loop().create_future()
        self._waiters[id(record)] = done
        self._enqueue(record)
        # Awaited as it is: the future is this caller's alone (``_resolve`` passes over one cancelled), the write
        # is the batch's task, which a caller that goes away does not cancel. A shield would cost the answer one
        # more turn of the event loop.
        with self._telemetry.span("usage commit"):
            await done

    def submit(self, record: UsageRecord) -> None:
        """Queue a record for storing; never blocks and never raises."""
        self._enqueue(record)

    def _enqueue(self, record: UsageRecord) -> None:
        self._pending.append(record)
        self._idle.clear()
        if len(self._batches) < CONCURRENT_BATCHES:
            self._start_batch()

    def _start_batch(self) -> None:
        batch, self._pending = self._pending, []
        self._writing += len(batch)
        task = asyncio.create_task(self._write_batch(batch))
        self._batches.add(task)
        task.add_done_callback(self._batch_done)

    def _ended(self, task: asyncio.Task[None] | None) -> None:
        """A batch is done with its write: the next one leaves if records wait for it."""
        self._batches.discard(task)
        if self._pending and len(self._batches) < CONCURRENT_BATCHES:
            self._start_batch()

    def _batch_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("usage writer failed", exc_info=task.exception())
        self._ended(task)  # done already by the task itself, unless it was cancelled before it ran
        if not self._batches and not self._pending and not self._retrying:
            self._idle.set()

    async def _write_batch(self, batch: list[UsageRecord]) -> None:
        failure: StorageUnavailable | None = None
        written = False
        try:
            await self.write(batch)
            written = True
        except StorageUnavailable as error:
            failure = error
        except Exception:  # a bug: say so, and let no waiter hang
            log.exception("usage writer failed; %d records not stored", len(batch))
        finally:
            self._writing -= len(batch)
            # The next batch leaves first: its task then runs before the callers told below, each of which goes
            # on with its answer before yielding (and ``_batch_done``, a callback, would start it a turn later).
            self._ended(asyncio.current_task())
            if failure is not None:
                self._failed(batch, failure)
            elif written:
                for record in batch:
                    self._resolve(record, _refused() if record.refused and not record.stored else None)
            for record in batch:  # cancelled, or a bug: the caller answers with an error
                self._resolve(record, StorageUnavailable("The usage record could not be stored."))

    def _failed(self, batch: list[UsageRecord], error: StorageUnavailable) -> None:
        """Answer the waiters of records storage did not take, and keep the records for a retry.

        A record storage did not take is withheld from its client, so it is
        kept as a failed request (status 503): its slot given back, its tokens
        counted. (Storage may have taken it after all, its answer lost: then
        the retry finds its log entry and the record stays as first stored.)
        """
        for record in batch:
            if record.stored or record.refused:  # a refused one would be refused again: not kept
                self._resolve(record, None if record.stored else _refused())
                continue
            if id(record) in self._waiters:
                record.status = 503
            self._resolve(record, error)
            self._backlog.append(record)
        if not self._retrying:
            self._retrier = asyncio.create_task(self._retry())

    def _resolve(self, record: UsageRecord, error: StorageUnavailable | None) -> None:
        waiter = self._waiters.pop(id(record), None)
        if waiter is None or waiter.done():
            return
        if error is None:
            waiter.set_result(None)
        else:
            waiter.set_exception(error)

    async def _retry(self) -> None:
        backoff = 0.1
        while self._backlog:
            log.warning(
                "usage write delayed: storage unavailable; %d records waiting, retrying in %.1f s",
                len(self._backlog),
                backoff,
            )
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF_SECONDS)
            batch, self._backlog = self._backlog, []
            self._writing += len(batch)
            try:
                await self.write(batch)
            except StorageUnavailable:
                self._backlog = batch + self._backlog
                continue
            finally:
                self._writing -= len(batch)
            log.warning("usage write resumed: %d delayed records stored", len(batch))
        if not self._batches and not self._pending:
            self._idle.set()
        self._retrier = None

    async def write(self, batch: list[UsageRecord]) -> None:
        """Store records now: per event, their log entries and attendees' days in one transaction."""
        events: dict[str, list[UsageRecord]] = {}
        for record in batch:
            if not record.stored:
                events.setdefault(record.event_id, []).append(record)
        if len(events) == 1:  # the usual batch: in this task, not one more (each costs turns of the event loop)
            [(event_id, records)] = events.items()
            await self._settle(event_id, records)
            return
        # Every write is waited for before any is retried, so no write is in flight twice.
        outcomes = await asyncio.gather(
            *(self._settle(event_id, records) for event_id, records in events.items()), return_exceptions=True
        )
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome

    async def _settle(self, event_id: str, records: list[UsageRecord]) -> None:
        finished = [record.finished(self._prices) for record in records]
        try:
            # A few dozen events at a time, so that a write over many events never
            # holds the event loop away from the requests in flight for long.
            async with self._settling:
                await self._ledger.settle(event_id, finished)
        finally:
            for record, item in zip(records, finished, strict=True):
                record.stored, record.refused = item.stored, item.refused

    async def drain(self, timeout: float = 30.0) -> bool:
        """Wait until everything is stored (graceful shutdown); True when nothing is left."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            log.error("usage drain timed out with %d records not stored", self.unstored)
            return False
        return True
