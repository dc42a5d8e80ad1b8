"""Usage: recording each upstream request, and the reports organizers read.

Recording happens off the response's critical path. A finished request hands a
``UsageRecord`` to the ``UsageRecorder``; its workers write the request row
(``proxyrequests``, ``PartitionKey=<event id>``,
``RowKey="<YYYY-MM-DD>|<request id>"``, an insert, so a retried write is
recorded once) and settle the attendee's day in ``proxy.limits``. A storage
outage delays these writes (retried with backoff, without limit) and never
drops them; ``drain()`` waits for everything pending at graceful shutdown.

Reports read the per-attendee day entities of ``proxyusage`` only (one
partition query per event), never the request rows, so they stay fast for
large events.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import orjson
from azure.core.exceptions import ResourceExistsError, ResourceNotFoundError

from proxy.errors import StorageUnavailable
from proxy.limits import Admission, Ledger, Settlement
from proxy.storage import Tables, gathered

log = logging.getLogger("proxy.usage")

WORKERS = 16
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
    _row_written: bool = field(default=False, repr=False)

    def row(self) -> dict[str, Any]:
        return {
            "PartitionKey": self.event_id,
            "RowKey": f"{self.admission.day}|{self.request_id}",
            "user": self.user,
            "model": self.model,
            "kind": self.kind,
            "stream": self.stream,
            "status": self.status,
            "latency_ms": round(self.latency_ms, 1),
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
            "time": self.started_at,
            "request_id": self.request_id,
        }

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
    """A queue of records and the workers that write them, retrying until stored."""

    def __init__(self, tables: Tables, ledger: Ledger) -> None:
        self._tables = tables
        self._ledger = ledger
        self._queue: asyncio.Queue[UsageRecord] | None = None
        self._workers: list[asyncio.Task[None]] = []

    @property
    def pending(self) -> int:
        return 0 if self._queue is None else self._queue.qsize()

    def submit(self, record: UsageRecord) -> None:
        """Queue a record; never blocks and never raises."""
        if self._queue is None:
            self._queue = asyncio.Queue()
            self._workers = [asyncio.create_task(self._work()) for _ in range(WORKERS)]
        self._queue.put_nowait(record)

    async def _work(self) -> None:
        assert self._queue is not None
        while True:
            record = await self._queue.get()
            try:
                await self._store(record)
            finally:
                self._queue.task_done()

    async def _store(self, record: UsageRecord) -> None:
        backoff = 0.1
        while True:
            try:
                await self.write(record)
                return
            except StorageUnavailable:
                log.warning("usage write delayed: storage unavailable; retrying in %.1f s", backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_SECONDS)

    async def write(self, record: UsageRecord) -> None:
        """Write one record now: its request row (once), then its day's figures."""
        if record.reached_upstream and not record._row_written:
            # A conflict means an earlier attempt wrote it and its answer was lost.
            with contextlib.suppress(ResourceExistsError):
                await self._tables.insert(self._tables.requests, record.row())
            record._row_written = True
        await self._ledger.settle(record.event_id, record.user, record.admission, record.settlement())

    async def drain(self, timeout: float = 30.0) -> bool:
        """Wait until every queued record is stored; True when nothing is left."""
        if self._queue is None:
            return True
        try:
            await asyncio.wait_for(self._queue.join(), timeout)
        except TimeoutError:
            log.error("usage drain timed out with %d records pending", self._queue.qsize())
            return False
        finally:
            for worker in self._workers:
                worker.cancel()
            await asyncio.gather(*self._workers, return_exceptions=True)
            self._queue, self._workers = None, []
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


def report_csv(data: dict[str, Any]) -> str:
    """The report's rows as CSV with a header line, totals last."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([data["by"], *FIGURES])
    for row in data["rows"]:
        writer.writerow([row["key"], *(row[f] for f in FIGURES)])
    writer.writerow(["TOTAL", *(data["totals"][f] for f in FIGURES)])
    return out.getvalue()


def utc_now() -> datetime:
    return datetime.now(UTC)
