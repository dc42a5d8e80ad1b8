"""Usage: recording each upstream request, and the reports organizers read.

Recording happens off the response's critical path. A finished request hands a
``UsageRecord`` to the ``UsageRecorder``, which writes in batches every
``FLUSH_SECONDS``: the request log and the attendees' days (``proxy.limits``).
The log holds one JSON record per upstream request (event, attendee, model,
kind, stream, tokens, status, latency, time, request id), stored in chunks:
one ``proxyrequests`` entity per event and flush (``PartitionKey=<event id>``,
``RowKey="<YYYY-MM-DD>|<first request id>"``, the records in ``records``), so
a busy worker writes its log in one insert rather than one per request, and
a retried chunk conflicts instead of being recorded twice. A storage outage delays these writes (retried with
backoff, without limit) and never drops them; ``drain()`` stores everything
pending at graceful shutdown. Recorded tokens (for the daily token cap and
the TPM correction) therefore lag the answers by about ``FLUSH_SECONDS``.

Reports read the per-attendee day entities of ``proxyusage`` only (one
partition query per event), never the request log, so they stay fast for
large events.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import logging
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

import orjson
from azure.core.exceptions import ResourceExistsError, ResourceNotFoundError

from proxy.errors import StorageUnavailable
from proxy.limits import Admission, Ledger, Settlement
from proxy.storage import Tables, gathered

log = logging.getLogger("proxy.usage")

FLUSH_SECONDS = 0.2
CONCURRENT_WRITES = 4
LOG_CHUNK_CHARS = 30_000  # a string property holds 32 K characters
MAX_BACKOFF_SECONDS = 10.0

GroupBy = Literal["user", "model", "day"]
GROUPINGS: tuple[GroupBy, ...] = ("user", "model", "day")
FIGURES = ("requests", "prompt_tokens", "completion_tokens", "total_tokens")


@dataclass(slots=True)
class UsageRecord:
    """One request's outcome, as written to storage."""

    event_id: str
    user: str
    model: str
    kind: Literal["chat", "embeddings"]
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
    logged: bool = field(default=False, repr=False)
    settled: bool = field(default=False, repr=False)

    def log_entry(self) -> dict[str, Any]:
        """This request as one JSON record of the request log."""
        return {
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
        }

    def take_usage(self, usage: object) -> bool:
        """Read upstream's ``usage`` object into this record; False if it is not one.

        Embeddings report no ``completion_tokens``: they count as 0.
        """
        if not isinstance(usage, dict):
            return False
        prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens", 0)
        if not (isinstance(prompt, int) and isinstance(completion, int)):
            return False
        total = usage.get("total_tokens")
        self.prompt_tokens, self.completion_tokens = prompt, completion
        self.total_tokens = total if isinstance(total, int) else prompt + completion
        return True

    def settlement(self) -> Settlement:
        return Settlement(
            model=self.model,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            total_tokens=self.total_tokens,
            reached_upstream=self.reached_upstream,
            succeeded=self.reached_upstream and 200 <= self.status < 300,
        )


class UsageRecorder:
    """Collects finished requests and stores them in batches, retrying until stored.

    A flush waits ``flush_seconds`` after the first pending record so that a
    busy worker writes many records at once: one request-log entity per event
    (more if its records exceed one property), and one conditional write per
    attendee and day, however many of that attendee's requests it carries.
    """

    def __init__(self, tables: Tables, ledger: Ledger, flush_seconds: float = FLUSH_SECONDS) -> None:
        self._tables = tables
        self._ledger = ledger
        self._flush_seconds = flush_seconds
        self._pending: list[UsageRecord] = []
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._flusher: asyncio.Task[None] | None = None
        self._closing = False
        self._writing = asyncio.Semaphore(CONCURRENT_WRITES)

    def submit(self, record: UsageRecord) -> None:
        """Queue a record; never blocks and never raises."""
        self._pending.append(record)
        self._idle.clear()
        self._wakeup.set()
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._run())
            self._flusher.add_done_callback(_report_crash)

    async def _run(self) -> None:
        while True:
            await self._wakeup.wait()
            if not self._closing:
                await asyncio.sleep(self._flush_seconds)
            batch, self._pending = self._pending, []
            self._wakeup.clear()
            await self._store(batch)
            if not self._pending:
                self._idle.set()

    async def _store(self, batch: list[UsageRecord]) -> None:
        backoff = 0.1
        while True:
            try:
                await self.write(batch)
                return
            except StorageUnavailable:
                log.warning("usage write delayed: storage unavailable; retrying in %.1f s", backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_SECONDS)

    async def write(self, batch: list[UsageRecord]) -> None:
        """Store records now: the request log (once each), then each attendee's day."""
        logs: dict[tuple[str, str], list[UsageRecord]] = {}
        for record in batch:
            if record.reached_upstream and not record.logged:
                logs.setdefault((record.event_id, record.admission.day), []).append(record)
        for (event_id, day), records in logs.items():
            for chunk, entries in _log_chunks(records):
                await self._insert_log(event_id, day, chunk, entries)
        days: dict[tuple[str, str, str], list[UsageRecord]] = {}
        for record in batch:
            if not record.settled:
                days.setdefault((record.event_id, record.user, record.admission.day), []).append(record)
        # A few attendees at a time, so that a flush over hundreds of attendees never
        # holds the event loop away from the requests in flight for long; and every
        # attendee is waited for before any is retried, so no write is in flight twice.
        outcomes = await asyncio.gather(
            *(self._settle(key, records) for key, records in days.items()), return_exceptions=True
        )
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome

    async def _insert_log(self, event_id: str, day: str, chunk: list[UsageRecord], entries: str) -> None:
        entity = {
            "PartitionKey": event_id,
            # Keyed by its first request: a retried chunk conflicts instead of repeating.
            "RowKey": f"{day}|{chunk[0].request_id}",
            "count": len(chunk),
            "records": entries,
        }
        with contextlib.suppress(ResourceExistsError):
            await self._tables.insert(self._tables.requests, entity)
        for record in chunk:
            record.logged = True

    async def _settle(self, key: tuple[str, str, str], records: list[UsageRecord]) -> None:
        event_id, user, day = key
        async with self._writing:
            await self._ledger.settle(event_id, user, day, [(r.admission, r.settlement()) for r in records])
        for record in records:
            record.settled = True

    async def drain(self, timeout: float = 30.0) -> bool:
        """Store everything pending now; True when nothing is left."""
        if self._flusher is None:
            return True
        self._closing = True
        if self._flusher.done():  # a writer that crashed: start another if anything is left
            if not self._pending:
                self._flusher = None
                return True
            self._flusher = asyncio.create_task(self._run())
        self._wakeup.set()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            log.error("usage drain timed out with %d records pending", len(self._pending))
            return False
        finally:
            self._flusher.cancel()
            await asyncio.gather(self._flusher, return_exceptions=True)
            self._flusher = None
        return True


async def report(tables: Tables, event_id: str, by: GroupBy) -> dict[str, Any]:
    """``{"event_id", "totals", "rows"}`` grouped by user, model or day (DESIGN)."""
    rows: dict[str, dict[str, int]] = {}
    totals = dict.fromkeys(FIGURES, 0)
    entities = tables.usage.query_entities("PartitionKey eq @pk", parameters={"pk": event_id})
    try:
        for entity in await gathered(entities):
            if by == "model":
                for model, figures in orjson.loads(entity.get("models", "{}")).items():
                    _add(rows.setdefault(model, dict.fromkeys(FIGURES, 0)), figures)
            else:
                key = entity["user"] if by == "user" else entity["day"]
                _add(rows.setdefault(key, dict.fromkeys(FIGURES, 0)), [entity.get(f, 0) for f in FIGURES])
            _add(totals, [entity.get(f, 0) for f in FIGURES])
    except ResourceNotFoundError:
        pass
    return {
        "event_id": event_id,
        "by": by,
        "totals": totals,
        "rows": [{"key": key, **figures} for key, figures in sorted(rows.items())],
    }


def _add(target: dict[str, int], figures: list[int]) -> None:
    for name, value in zip(FIGURES, figures, strict=True):
        target[name] += int(value)


def _report_crash(flusher: asyncio.Task[None]) -> None:
    # A bug in the writer must be seen; the next submit starts a new flusher.
    if not flusher.cancelled() and flusher.exception() is not None:
        log.error("usage writer stopped", exc_info=flusher.exception())


def _log_chunks(records: list[UsageRecord]) -> list[tuple[list[UsageRecord], str]]:
    """Records in groups whose JSON fits one string property, with that JSON."""
    chunks: list[tuple[list[UsageRecord], str]] = []
    chunk: list[UsageRecord] = []
    encoded: list[bytes] = []
    size = 2
    for record in records:
        entry = orjson.dumps(record.log_entry())
        if chunk and size + len(entry) + 1 > LOG_CHUNK_CHARS:
            chunks.append((chunk, (b"[" + b",".join(encoded) + b"]").decode()))
            chunk, encoded, size = [], [], 2
        chunk.append(record)
        encoded.append(entry)
        size += len(entry) + 1
    if chunk:
        chunks.append((chunk, (b"[" + b",".join(encoded) + b"]").decode()))
    return chunks


async def request_log(tables: Tables, event_id: str) -> list[dict[str, Any]]:
    """Every recorded request of an event."""
    entities = tables.requests.query_entities("PartitionKey eq @pk", parameters={"pk": event_id})
    try:
        chunks = await gathered(entities)
    except ResourceNotFoundError:
        return []
    return [entry for entity in chunks for entry in orjson.loads(entity["records"])]


def report_csv(data: dict[str, Any]) -> str:
    """The report's rows as CSV with a header line, totals last."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([data["by"], *FIGURES])
    for row in data["rows"]:
        writer.writerow([row["key"], *(row[f] for f in FIGURES)])
    writer.writerow(["TOTAL", *(data["totals"][f] for f in FIGURES)])
    return out.getvalue()
