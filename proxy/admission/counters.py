"""The per-worker view of the attendees' days and the budget's shards: cached ETags, locks, the conditional write.

``Counters`` is what admitting (``proxy.admission.limits``) and settling
(``proxy.admission.settling``) share. It keeps, per entity, the ETag and
figures of this worker's last read or write, so that the next write needs no
read; a lock per entity, so that races happen only between instances, never
within one; and the requests waiting for the next group write. Every write
is conditional: a replace under the cached ETag (``If-Match``), or an insert
for an entity not stored yet; ``_written`` says whether it landed, and a
caller whose write lost a race (412, or 409 on an insert) reads again and
retries. These reads and writes go through ``proxy.storage.entities``, a
lean REST client, not the SDK.
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import Any

from azure.core.exceptions import ResourceExistsError, ResourceModifiedError, ResourceNotFoundError

from proxy.admission import budget
from proxy.admission import inflight as flights
from proxy.config.prices import PriceTable
from proxy.policy.events import Event
from proxy.storage.combining import Combiner
from proxy.storage.entities import TransactionRefused
from proxy.storage.tables import Tables

log = logging.getLogger("proxy.limits")

MAX_ATTEMPTS = 200
# (estimate, request id, ticket, its own time in epoch seconds) of a request waiting for the next group write
Waiting = tuple[int, str, "asyncio.Future[Any]", int]
# (request id, total tokens, reached upstream, succeeded) of a request to settle on its shard
Unsettled = tuple[str, int, bool, bool, int]  # ..., and its cost in nano-dollars


def absent(key: tuple[str, str]) -> tuple[str, dict[str, Any]]:
    """The state of an entity not stored (yet): no ETag, no figures; writing it inserts it."""
    return "", {"PartitionKey": key[0], "RowKey": key[1]}


class Counters:
    """Reads and conditionally writes the per-attendee day entities and the budget's shards."""

    def __init__(self, tables: Tables, prices: PriceTable | None = None) -> None:
        self._tables = tables
        self._prices = prices or PriceTable.load()
        self._rates: dict[tuple[str, ...], float] = {}
        self._entities = tables.usage_entities
        self._combiner = Combiner(tables.usage_entities, tables.ensure)
        self._cache: dict[tuple[str, str], tuple[str, dict[str, Any]]] = {}
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._waiting: dict[tuple[str, str], list[Waiting]] = {}
        # The shard of event budgets this worker admits on (proxy.admission.budget).
        self._home = random.randrange(budget.SHARDS)
        self._releases: set[asyncio.Task[None]] = set()
        # Settlements on shards not yet written (``_defer``), by shard.
        self._unsettled: dict[tuple[str, str], list[Unsettled]] = {}
        self._flushing: set[tuple[str, str]] = set()

    def _lock(self, key: tuple[str, str]) -> asyncio.Lock:
        lock = self._locks.get(key)
        if lock is None:
            if len(self._locks) > 50_000:
                self._forget_idle()
            lock = self._locks[key] = asyncio.Lock()
        return lock

    def _forget_idle(self) -> None:
        for key in [k for k, lock in self._locks.items() if not lock.locked() and not self._waiting.get(k)]:
            del self._locks[key]
            self._cache.pop(key, None)
            self._waiting.pop(key, None)

    async def read(self, event_id: str, user: str, day: str) -> dict[str, Any]:
        """The attendee's figures for a day (zeros when nothing is recorded)."""
        key = (event_id, f"{day}|{user}")
        _etag, entity = await self._fetch(key)
        return entity

    async def _fetch(self, key: tuple[str, str]) -> tuple[str, dict[str, Any]]:
        try:
            etag, entity = await self._entities.get(*key)
        except ResourceNotFoundError:
            return absent(key)
        state = self._cache[key] = (etag, flights.read(entity))
        return state

    async def _write(self, key: tuple[str, str], etag: str, entity: dict[str, Any]) -> str:
        """Replace ``entity`` under ``etag``, or insert it when it has none (not stored yet); its new ETag."""
        # With the writes of the event's other rows that wait meanwhile, in one transaction (proxy.storage.combining).
        return await self._combiner.write(flights.stored(entity), etag)

    async def _written(
        self, key: tuple[str, str], etag: str, entity: dict[str, Any], joining: dict[str, Any] | None = None
    ) -> bool:
        """Write ``entity`` (``_write``) and cache it; False when another write got there first (412, or 409 on
        an insert), after a short random pause so that racing instances spread out: read it again and retry.

        With ``joining`` (a new name's roster row, ``proxy.policy.attendees``), both in one transaction: they
        share the event's partition. A name registered meanwhile (409 on its row) leaves the entity to write alone.
        """
        if joining is not None:
            day = ("update", flights.stored(entity), {"etag": etag}) if etag else ("create", flights.stored(entity), {})
            try:
                results = await self._submit([day, ("create", joining, {})])
            except TransactionRefused as refused:
                if refused.index == 1 and refused.status_code == 409:
                    return await self._written(key, etag, entity)
                await asyncio.sleep(random.uniform(0, 0.005))
                return False
            self._cache[key] = (str(results[0]["etag"]), entity)
            return True
        try:
            new_etag = await self._write(key, etag, entity)
        except (ResourceModifiedError, ResourceExistsError):
            await asyncio.sleep(random.uniform(0, 0.005))
            return False
        self._cache[key] = (new_etag, entity)
        return True

    async def _join(self, joining: dict[str, Any]) -> bool:
        """Insert a new name's roster row without a day (its request refused, or its event without caps), with the
        event's other writes that wait meanwhile; True when this call created it, False when it existed."""
        try:
            await self._combiner.write(joining, "")
        except ResourceExistsError:
            return False
        return True

    async def _submit(self, operations: list[tuple[str, Any, dict[str, Any]]]) -> list[dict[str, Any]]:
        """Submit a transaction (``Tables.transact``). Safe to repeat: a transaction that did
        land fails the second time on a day's ETag (412, read again) or on its log entry
        (409, taken as stored), so nothing is counted twice."""
        return await self._tables.transact(operations)

    async def budget_totals(self, event: Event) -> dict[str, Any]:
        """The event's budgets and what is used of them (``proxy.admission.budget.totals``): one range query."""
        return budget.totals(event, list((await self._shards(event.id)).values()), self.rate(event))

    def rate(self, event: Event) -> float:
        """The dearest price of a token among the event's models (input or output), in nano-dollars: what a
        request in flight is counted at against the cost caps, so that its estimate is never below its cost.
        A model without a known price adds nothing: an event that caps cost refuses it before admission
        (``proxy.errors.ModelPriceUnknown``), so every request counted here has a price."""
        rate = self._rates.get(event.models)
        if rate is None:
            prices = [self._prices.known(model) for model in event.models]
            rate = max((max(p.input, p.output) * 1000 for p in prices if p is not None), default=0.0)
            self._rates[event.models] = rate
        return rate

    async def _shards(self, event_id: str) -> dict[int, dict[str, Any]]:
        return await budget.read_shards(self._tables, event_id)

    async def drain(self, timeout: float = 10.0) -> None:
        """Graceful shutdown: write the settlements deferred on shards (``_defer``), and the give-backs."""
        if self._releases:
            await asyncio.wait(set(self._releases), timeout=timeout)

    def _released(self, task: asyncio.Task[None]) -> None:
        self._releases.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # The reconciler gives it back once its lease is over.
            log.warning("a refused request's reservation was not given back: %s", task.exception())

    def _forget_settled(self, key: tuple[str, str], count: int) -> None:
        left = self._unsettled.get(key, [])
        del left[:count]
        if not left:
            self._unsettled.pop(key, None)
