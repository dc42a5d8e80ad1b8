"""Settling: finished requests added to their attendees' days, their log entries stored, their shards settled.

Finished requests are settled in batches (an answer's end waits for its own,
``proxy.ledger.usage``): one conditional write per attendee and batch, whatever
the number of requests it carries, and one request-log insert per request, all
in one entity group transaction per event, so the log and the days never
disagree.
A request's shard of the event's budget (``proxy.admission.budget``) is
settled after it, with the next write there (``_defer``). ``release_stale``
is the reconciler's (``proxy.ledger.reconcile``): it gives back the slots of
requests whose worker was killed before it could settle them. What a day
becomes is ``proxy.admission.days``'s arithmetic; the reads and conditional
writes are ``proxy.admission.counters``'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from datetime import UTC, datetime, timedelta
from typing import Any

from azure.core import MatchConditions
from azure.core.exceptions import ResourceExistsError, ResourceNotFoundError
from azure.data.tables import UpdateMode

from proxy.admission import budget, days, requestlog
from proxy.admission import inflight as flights
from proxy.admission.counters import MAX_ATTEMPTS, Counters, Unsettled, absent, log
from proxy.admission.days import Finished, day_row, keeps_slot
from proxy.errors import StorageRefused, StorageUnavailable
from proxy.storage.entities import TransactionRefused

MAX_OPERATIONS = 100  # per entity group transaction
FLUSH_DELAY_SECONDS = 0.05


class Settling(Counters):
    """Settles finished requests on their days, their log entries and their shards; gives back stale slots."""

    async def settle(self, event_id: str, finished: list[Finished]) -> None:
        """Add finished requests to their attendees' days and store their log entries, atomically.

        One entity group transaction per event (``MAX_OPERATIONS`` operations
        at most, more transactions beyond): each attendee's day replaced under
        its ETag, and each request's log entry inserted. Either all of it is
        stored or none, so the log and the days always agree. A log entry that
        already exists means an earlier attempt whose answer was lost did
        land; that request is done. Races with other instances are retried.
        A transaction Table Storage refuses as invalid is split, so that one
        request's refusal does not keep the others from being stored.
        """
        for item in finished:
            if not item.admission.reserved and not item.settlement.reached_upstream and item.log is None:
                item.stored = True  # nothing for its day nor the log: only its shard, below, if it has one
        part: list[Finished] = []
        rows: set[str] = set()
        for item in (item for item in finished if not item.stored):
            operations = len(rows | set(_rows(item))) + len(part) + 1
            if part and operations > MAX_OPERATIONS:
                await self._transact_apart(event_id, part)
                part, rows = [], set()
            part.append(item)
            rows.update(_rows(item))
        if part:
            await self._transact_apart(event_id, part)
        for item in finished:
            if item.admission.shard is not None and item.stored:
                self._defer(event_id, item)

    async def _transact_apart(self, event_id: str, part: list[Finished]) -> None:
        """``_transact``; when Table Storage refuses it as invalid (400, 413), each request apart."""
        try:
            await self._transact(event_id, part)
        except StorageRefused as refusal:
            if len(part) == 1:
                await self._refused(event_id, part[0], refusal)
                return
            for item in part:
                if not item.stored:
                    await self._transact_apart(event_id, [item])

    async def _refused(self, event_id: str, item: Finished, refusal: StorageRefused) -> None:
        """Store what storage takes of a request whose transaction it refuses: its log entry, then its day.

        Never tried again: the same write would be refused again, and a
        worker that kept it would refuse every request meanwhile. It counts as
        stored when its log entry is (or, without one, its day), and is logged
        as an error either way, for the operator.
        """
        item.refused = True
        logged = False
        if item.log is not None:
            try:
                await self._entities.insert(item.log)
                logged = True
            except ResourceExistsError:
                logged = True
            except StorageUnavailable:
                pass
        day = Finished(item.user, item.admission, item.settlement, None)
        with contextlib.suppress(StorageUnavailable):
            await self._transact(event_id, [day])
        item.stored = logged or (item.log is None and day.stored)
        log.error(
            "Table Storage refused the usage of request %s in event %s (%d); stored apart: log entry %s, day %s",
            item.admission.request_id,
            event_id,
            refusal.status_code,
            "yes" if logged else "no" if item.log is not None else "none",
            "yes" if day.stored else "no",
        )

    def _defer(self, event_id: str, item: Finished) -> None:
        """Settle a request on its shard of the event's budget soon, with the next write there.

        Not in the settling transaction: every request of the worker shares
        that shard, so writing it there would serialise all settlements behind
        one another and behind admissions. Until then the shard holds the
        request's estimate, never below its tokens, so the budget only errs on
        the safe side; a worker killed meanwhile leaves the request's log
        entry, from which ``release_stale`` settles it.
        """
        key = (event_id, str(item.admission.shard))
        settlement = item.settlement
        entry = (item.admission.request_id, settlement.total_tokens, settlement.reached_upstream, settlement.succeeded,
                 settlement.cost_nanos)  # fmt: skip
        self._unsettled.setdefault(key, []).append(entry)
        if key not in self._flushing:
            self._flushing.add(key)
            flush = asyncio.create_task(self._flush(key))
            self._releases.add(flush)
            flush.add_done_callback(self._released)

    async def _flush(self, key: tuple[str, str]) -> None:
        """Write a shard's deferred settlements that no admission has carried meanwhile."""
        try:
            backoff = FLUSH_DELAY_SECONDS
            while self._unsettled.get(key):
                await asyncio.sleep(backoff)  # admissions in the meantime carry them for free
                async with self._lock(key):
                    settling = list(self._unsettled.get(key, ()))
                    if not settling:
                        break
                    try:
                        await self._write_settled(key, settling)
                    except StorageUnavailable:
                        backoff = min(backoff * 2, 2.0)
                        continue
                    self._forget_settled(key, len(settling))
                    backoff = FLUSH_DELAY_SECONDS
        finally:
            self._flushing.discard(key)

    async def _write_settled(self, key: tuple[str, str], settling: list[Unsettled]) -> None:
        state = self._cache.get(key)
        for _ in range(MAX_ATTEMPTS):
            if state is None:
                state = await self._fetch(key)
            etag, entity = state
            updated = entity
            for entry in settling:
                updated = budget.settled(updated, *entry)
            if not etag or updated is entity:
                return
            if not await self._written(key, etag, updated):
                state = None
                continue
            return
        raise StorageUnavailable("Too much contention on the event's budget.")

    async def _transact(self, event_id: str, finished: list[Finished]) -> None:
        keys = sorted({(event_id, row) for item in finished for row in _rows(item)})
        # Days known not to be stored (Admission.new_day): inserted without a read. Were that wrong, the insert
        # is refused (409) and the retry reads them.
        new = {(event_id, day_row(item)) for item in finished if item.admission.new_day}
        pending = list(finished)
        async with contextlib.AsyncExitStack() as locks:
            for key in keys:  # in order: two writers never wait for each other's locks
                await locks.enter_async_context(self._lock(key))
            for _ in range(MAX_ATTEMPTS):
                operations: list[tuple[str, Any, dict[str, Any]]] = []
                updates: list[tuple[tuple[str, str], dict[str, Any]]] = []
                for key in keys:
                    state = self._cache.get(key)
                    if state is None:
                        state = absent(key) if key in new else await self._fetch(key)
                    etag, updated = state
                    for item in pending:
                        if key[1] == day_row(item):
                            updated = days.settled(updated, item.user, item.admission, item.settlement)
                    if updated is state[1]:
                        continue
                    updates.append((key, updated))
                    if etag:
                        options = {
                            "mode": UpdateMode.REPLACE,
                            "etag": etag,
                            "match_condition": MatchConditions.IfNotModified,
                        }
                        operations.append(("update", flights.stored(updated), options))
                    else:
                        operations.append(("create", flights.stored(updated), {}))
                logged = requestlog.rows([item for item in pending if item.log is not None])
                operations.extend(("create", row, {}) for row, _ in logged)
                if not operations:
                    for item in pending:
                        item.stored = True
                    return
                try:
                    results = await self._submit(operations)
                except TransactionRefused as error:
                    failed = error.index - len(updates)
                    if error.status_code == 409 and 0 <= failed < len(logged):
                        for item in logged[failed][1]:  # by an earlier attempt, with their settlement
                            item.stored = True
                            pending.remove(item)
                    else:  # another instance wrote a day first (412, or 409 on a create): read it again
                        new.clear()
                        for key, _ in updates:
                            self._cache.pop(key, None)
                        await asyncio.sleep(random.uniform(0, 0.005))
                    continue
                for (key, updated), result in zip(updates, results, strict=False):
                    self._cache[key] = (str(result["etag"]), updated)
                for item in pending:
                    item.stored = True
                return
        raise StorageUnavailable("Too much contention on the usage counters.")

    async def release_stale(self, event_id: str, row_key: str, cutoff: float, forget_before: float) -> int:
        """Give back the slots of requests admitted before ``cutoff`` (epoch s) and never settled.

        Entries released before ``forget_before`` are dropped: their worker is long gone.
        """
        key = (event_id, row_key)
        async with self._lock(key):
            for _ in range(MAX_ATTEMPTS):
                etag, entity = await self._fetch(key)
                inflight = flights.decode(entity)
                at, released = flights.admitted_at, flights.released
                stale = [rid for rid, entry in inflight.items() if at(entry) < cutoff and not released(entry)]
                forgotten = [rid for rid, entry in inflight.items() if at(entry) < forget_before and released(entry)]
                if not etag or not (stale or forgotten):
                    return 0
                if row_key.startswith(budget.SHARD_PREFIX):
                    updated = await self._settled_from_log(event_id, entity, inflight, stale, forgotten)
                else:
                    updated = days.released(entity, inflight, stale, forgotten)
                if not await self._written(key, etag, updated):
                    continue
                return len(stale)
        raise StorageUnavailable("Too much contention on the usage counters.")

    async def _settled_from_log(
        self,
        event_id: str,
        shard: dict[str, Any],
        inflight: dict[str, list[int]],
        stale: list[str],
        forgotten: list[str],
    ) -> dict[str, Any]:
        """A shard with its stale requests settled from their log entries, or given back if they have none.

        A request whose log entry exists was settled on its attendee's day, and
        its worker died before settling it on the shard (``_defer``): its slot
        stays taken and its tokens count.
        """
        lost: list[str] = []
        for request_id in stale:
            # Its log entry is under the event's local day of its admission: the UTC date, or one either side.
            admitted = datetime.fromtimestamp(flights.admitted_at(inflight[request_id]), UTC)
            logged = None
            for offset in (0, -1, 1):
                day = (admitted + timedelta(days=offset)).date().isoformat()
                try:
                    _, logged = await self._entities.get(event_id, requestlog.row_key(day, request_id))
                    break
                except ResourceNotFoundError:
                    continue
            if logged is None:
                lost.append(request_id)
                continue
            succeeded = keeps_slot(int(logged.get("status", 0)))
            cost = round(float(logged.get("cost", 0) or 0) * 1_000_000_000)
            shard = budget.settled(shard, request_id, int(logged.get("total_tokens", 0)), True, succeeded, cost)
        return budget.released(shard, lost, forgotten)


def _rows(item: Finished) -> tuple[str, ...]:
    """The rows a finished request changes in the settling transaction (its shard is settled after it)."""
    return (day_row(item),)
