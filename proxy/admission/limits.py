"""Caps per attendee and day (the event's local day), exact across any number of instances.

One entity per (event, attendee, day) in the ``proxyusage`` table, the day being the event's
local date (its ``time_zone``; UTC when it has none), so daily caps reset at its midnight;
``PartitionKey=<event id>``, ``RowKey="<YYYY-MM-DD>|<user>"``, holds:

- ``reserved``: requests admitted against the daily request cap. A request is
  admitted by a conditional write (``If-Match`` on the entity's ETag, or an
  insert for the first request of the day) that raises ``reserved`` by one
  while it is below the cap. Two instances can never both win the same ETag,
  so with a cap of N exactly N writes succeed, however many instances race.
  A request that fails (upstream error, timeout, broken stream) gives its
  slot back when its usage is settled; one whose client left after upstream
  had it keeps it (``proxy.ledger.ending``).
- ``requests``, ``failed``, ``prompt_tokens``, ``completion_tokens``,
  ``total_tokens``, ``models`` and ``backends`` (JSON, the same figures per
  model and per upstream backend): the day's recorded usage, which is also
  what the usage reports read.
- ``inflight``: the requests admitted and not yet settled, as ``{request id:
  [estimate, admitted at (epoch seconds)]}`` (``[..., 1]`` once released),
  written by the same conditional writes; stored as JSON cut into pieces
  (``inflight``, ``inflight1``...), so that thousands fit (``proxy.admission.inflight``). An admission's write that is
  sent
  again (its connection dropped after it landed) fails on the ETag, and the
  fresh read finds the request's entry: it is admitted, once. Settling
  removes a request's entry, which makes settlement idempotent (a retried
  write whose first attempt did land finds the entry gone and adds nothing
  twice). An entry older than the
  reservation lease belongs to a worker that was killed before it could
  settle: ``proxy.ledger.reconcile`` gives its slot back and marks it released (a
  request that outlived its lease after all takes its slot again when it
  settles), and forgets it one lease later.
- ``tpm_minute`` and ``tpm_tokens``: a fixed one-minute window for the tokens
  per minute limit. Before the call the request books an estimate (body size
  / 4 for the prompt, plus the max tokens it may produce); settling replaces
  the estimate by the tokens upstream reported. Because the window lives in
  the same entity and is written under the same ETag, it is exact across
  instances too; the only slack is that an estimate can be above or below the
  real figure until the request settles.
- The daily token cap counts ``total_tokens`` plus the estimates of the
  ``inflight`` entries not released (``booked_tokens``), and admits a request
  while that sum is below the cap. Settlement happens before an answer's end
  reaches its client, so the next request sees the answer's tokens. The day's
  total therefore passes the cap by at most the tokens of the last request
  admitted, as long as estimates are not below upstream's figures (docs/organizers.md,
  *Budgets: how exact*).
- The event's budgets live in shards of their own (``proxy.admission.budget``), admitted
  by ``admit_budget`` concurrently with the attendee's day (``admit_all``).

Storage cost per request, on the critical path:

- no cap at all (no daily request, token or TPM cap): 0 operations;
- otherwise 1 conditional write, the ETag and figures being cached from this
  worker's previous write; +1 read the first time a worker sees the attendee
  that day, and +1 read and write per lost race with another instance;
- a refusal is confirmed by a fresh read (1 operation) so that a stale cache
  never refuses a request that another instance's refund would allow.

Off the critical path, requests are settled in batches: one conditional write
per attendee and flush, whatever the number of requests it carries (and one
request-log insert per event and flush, see ``proxy.ledger.usage``). These reads and
writes go through ``proxy.storage.entities``, a lean REST client, not the SDK.

Requests of one attendee are serialised per worker by a lock, so races happen
only between instances, never within one; those that queue behind a write are
admitted together by the next one (group commit), so a burst from one
attendee costs one write per round trip, not one per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import random
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import orjson
from azure.core import MatchConditions
from azure.core.exceptions import ResourceExistsError, ResourceModifiedError, ResourceNotFoundError
from azure.data.tables import UpdateMode

from proxy.admission import budget
from proxy.admission import inflight as flights
from proxy.config.prices import PriceTable
from proxy.errors import CapExceeded, StorageRefused, StorageUnavailable
from proxy.policy.events import Event
from proxy.storage.entities import TransactionRefused
from proxy.storage.tables import Tables

log = logging.getLogger("proxy.limits")

MAX_ATTEMPTS = 200
MAX_OPERATIONS = 100  # per entity group transaction
_UNCHANGED = MatchConditions.IfNotModified
_UNAVAILABLE = "Table Storage cannot be reached right now; usage could not be stored."

# (estimate, request id, ticket, its own time in epoch seconds) of a request waiting for the next group write
Waiting = tuple[int, str, "asyncio.Future[Any]", int]
FLUSH_DELAY_SECONDS = 0.05
# (request id, total tokens, reached upstream, succeeded) of a request to settle on its shard
Unsettled = tuple[str, int, bool, bool, int]  # ..., and its cost in nano-dollars
MAX_MOVES = 8  # moves of spare into the home shard that landed, per group write, before refusing
_COUNTERS = ("reserved", "requests", "failed", "prompt_tokens", "completion_tokens", "total_tokens")
CLIENT_GONE = 499  # the client left after upstream had the request (nginx's "client closed request")


def keeps_slot(status: int) -> bool:
    """Whether a request that reached upstream keeps its slot: an answer delivered, or one its client left
    (``proxy.ledger.ending``); upstream's own failures and answers storage refused give it back."""
    return 200 <= status < 300 or status == CLIENT_GONE


def day_of(moment: datetime, zone: str = "UTC") -> str:
    """The date of ``moment`` in the time zone ``zone``: an event's days are its local days."""
    return moment.astimezone(_zone(zone)).date().isoformat()


def next_midnight(moment: datetime, zone: str = "UTC") -> datetime:
    """The next midnight after ``moment`` in ``zone``, when an event's daily caps reset."""
    local = _zone(zone)
    return datetime.combine(moment.astimezone(local).date() + timedelta(days=1), time(0), tzinfo=local)


def seconds_to_midnight(moment: datetime, zone: str = "UTC") -> int:
    return max(1, int((next_midnight(moment, zone) - moment).total_seconds() + 0.999))


@functools.lru_cache(maxsize=512)
def _zone(name: str) -> ZoneInfo:
    return ZoneInfo(name)


def has_caps(event: Event) -> bool:
    caps = (event.daily_requests, event.daily_tokens, event.tpm, event.daily_cost)
    return any(cap is not None for cap in caps)


@dataclass(slots=True)
class Admission:
    """What a request was admitted with: shown in headers and settled later."""

    request_id: str
    day: str
    minute: int
    estimate: int
    remaining_requests: int | None
    remaining_tokens: int | None
    reserved: bool
    shard: str | None = None  # the event budget's shard it was admitted on (proxy.admission.budget)


@dataclass(slots=True)
class Finished:
    """A finished request as the ledger stores it: its day's figures and its log entry."""

    user: str
    admission: Admission
    settlement: Settlement
    log: dict[str, Any] | None
    stored: bool = False
    refused: bool = False  # Table Storage refused its transaction as invalid (``Ledger._refused``)


@dataclass(slots=True)
class Settlement:
    """What one finished request adds to the attendee's day."""

    model: str
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    reached_upstream: bool
    succeeded: bool
    backend: str = ""  # the upstream backend that answered (proxy.config.backends)
    cached_tokens: int = 0
    cost_nanos: int = 0  # USD x 1e9 (proxy.config.prices)
    unpriced: bool = False  # reached upstream, and no price was known for its model


class Ledger:
    """Reads and conditionally writes the per-attendee day entities."""

    def __init__(self, tables: Tables, prices: PriceTable | None = None) -> None:
        self._tables = tables
        self._prices = prices or PriceTable.load()
        self._rates: dict[tuple[str, ...], float] = {}
        self._entities = tables.usage_entities
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
            return "", {"PartitionKey": key[0], "RowKey": key[1]}
        state = self._cache[key] = (etag, flights.read(entity))
        return state

    async def admit(self, event: Event, user: str, now: datetime, estimate: int, request_id: str) -> Admission:
        """Reserve one request against the caps, or raise ``CapExceeded``.

        Requests of one attendee that arrive while a reservation is being
        written wait for it, then are reserved together in the next write:
        one storage operation admits them all (group commit).
        """
        day = day_of(now, event.time_zone)
        minute = int(now.timestamp()) // 60
        if not has_caps(event):
            return Admission(request_id, day, minute, estimate, None, None, reserved=False)
        key = (event.id, f"{day}|{user}")
        result: Admission = await self._grouped(
            key,
            (estimate, request_id, int(now.timestamp())),
            lambda group: self._admit_group(event, user, key, now, group),
            lambda admission: self._give_back(event.id, user, admission, None),
        )
        return result

    async def admit_all(self, event: Event, user: str, now: datetime, estimate: int, request_id: str) -> Admission:
        """Admit against the attendee's caps and the event's budget (both at once), or raise ``CapExceeded``.

        When one admits and the other refuses, what was taken is given back
        in the background. So is what a write that failed with
        ``StorageUnavailable`` may have taken: its answer lost, it may have
        landed all the same. Giving back is idempotent (only an entry still
        in flight is given back), so a write that did not land costs nothing.
        """
        if not budget.has_budget(event):
            try:
                return await self.admit(event, user, now, estimate, request_id)
            except StorageUnavailable:
                if has_caps(event):
                    self._give_back(
                        event.id, user, self._untaken(now, estimate, request_id, True, event.time_zone), None
                    )
                raise
        attendee_task = asyncio.ensure_future(self.admit(event, user, now, estimate, request_id))
        shard_task = asyncio.ensure_future(self.admit_budget(event, now, estimate, request_id))
        try:
            await asyncio.wait((attendee_task, shard_task))
        except asyncio.CancelledError:  # the client went away: what either took is given back
            if attendee_task.done() and _taken(attendee_task):
                self._give_back(event.id, user, attendee_task.result(), None)
            if shard_task.done() and _taken(shard_task):
                self._give_back(
                    event.id,
                    user,
                    self._untaken(now, estimate, request_id, False, event.time_zone),
                    shard_task.result(),
                )
            attendee_task.cancel()  # those still waiting leave their queue, or give back (_grouped)
            shard_task.cancel()
            raise
        attendee, shard = (task.exception() or task.result() for task in (attendee_task, shard_task))
        if isinstance(attendee, Admission) and isinstance(shard, str):
            attendee.shard = shard
            return attendee
        maybe_reserved = isinstance(attendee, StorageUnavailable) and has_caps(event)
        taken = (
            attendee
            if isinstance(attendee, Admission)
            else self._untaken(now, estimate, request_id, maybe_reserved, event.time_zone)
        )
        maybe_shard = budget.shard_row(self._home) if isinstance(shard, StorageUnavailable) else None
        self._give_back(event.id, user, taken, shard if isinstance(shard, str) else maybe_shard)
        error = attendee if isinstance(attendee, BaseException) else shard
        assert isinstance(error, BaseException)
        raise error

    @staticmethod
    def _untaken(now: datetime, estimate: int, request_id: str, reserved: bool, zone: str) -> Admission:
        return Admission(request_id, day_of(now, zone), int(now.timestamp()) // 60, estimate, None, None, reserved)

    def _give_back(self, event_id: str, user: str, taken: Admission, shard: str | None) -> None:
        """Give back in the background what an admission took (or may have taken) for a request never sent."""
        taken.shard = shard
        if not taken.reserved and shard is None:
            return
        untaken = Settlement("", 0, 0, 0, reached_upstream=False, succeeded=False)
        release = asyncio.create_task(self.settle(event_id, [Finished(user, taken, untaken, None)]))
        self._releases.add(release)
        release.add_done_callback(self._released)

    async def drain(self, timeout: float = 10.0) -> None:
        """Graceful shutdown: write the settlements deferred on shards (``_defer``), and the give-backs."""
        if self._releases:
            await asyncio.wait(set(self._releases), timeout=timeout)

    def _released(self, task: asyncio.Task[None]) -> None:
        self._releases.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # The reconciler gives it back once its lease is over.
            log.warning("a refused request's reservation was not given back: %s", task.exception())

    async def admit_budget(self, event: Event, now: datetime, estimate: int, request_id: str) -> str:
        """Reserve one request and its estimate on this worker's shard of the event's budget; its row key."""
        key = (event.id, budget.shard_row(self._home))
        result: str = await self._grouped(
            key,
            (estimate, request_id, int(now.timestamp())),
            lambda group: self._admit_shard_group(event, key, now, group),
            lambda shard: self._give_back(
                event.id, "", self._untaken(now, estimate, request_id, False, event.time_zone), shard
            ),
        )
        return result

    async def _grouped(
        self,
        key: tuple[str, str],
        request: tuple[int, str, int],
        write_group: Callable[[list[Waiting]], Awaitable[None]],
        give_back: Callable[[Any], None],
    ) -> Any:
        """Wait for a turn on ``key``; whoever gets it writes for everyone waiting (group commit).

        A caller that goes away (its client gone) while it waits leaves the
        queue; one that goes away while its group is being written has what
        the write gave it handed to ``give_back``, since nobody will settle it.
        """
        ticket: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        # Mark a refusal as seen even if its caller went away (client disconnected).
        ticket.add_done_callback(lambda done: done.cancelled() or done.exception())
        waiting = self._waiting.setdefault(key, [])
        entry = (request[0], request[1], ticket, request[2])
        waiting.append(entry)
        try:
            async with self._lock(key):
                if not ticket.done():
                    group, self._waiting[key] = waiting, []
                    # Shielded: a leader whose client goes away must not strand the others.
                    write = asyncio.ensure_future(write_group(group))
                    write.add_done_callback(_resolve_all(group))
                    await asyncio.shield(write)
        except asyncio.CancelledError:
            if waiting is self._waiting.get(key) and entry in waiting:
                waiting.remove(entry)  # not in a write yet: never admitted
                ticket.cancel()
            else:
                ticket.add_done_callback(lambda done: give_back(done.result()) if _taken(done) else None)
            raise
        return ticket.result()

    async def _admit_shard_group(self, event: Event, key: tuple[str, str], now: datetime, group: list[Waiting]) -> None:
        state = self._cache.get(key)
        rate = self.rate(event)
        fresh, moves_left = False, MAX_MOVES
        shards: dict[int, dict[str, Any]] = {}
        refusal: CapExceeded | None = None
        for _ in range(MAX_ATTEMPTS):
            if state is None:
                state = await self._fetch(key)
                fresh = True
            etag, updated = state
            if not etag:
                updated = budget.empty_shard(key[0], budget.shard_index(key[1]))
            landed = flights.decode(updated)
            crowded = flights.full(landed, len(group))
            if crowded is not None:
                if not fresh:
                    state = None
                    continue
                for _, _, ticket, _ in group:
                    ticket.set_exception(crowded)
                return
            settling = list(self._unsettled.get(key, ()))  # carried by this write
            for entry in settling:
                updated = budget.settled(updated, *entry)
            outcomes: list[int | None] = []  # None: admitted; else the estimate refused
            for estimate, request_id, _, at in group:
                if request_id in landed:  # an earlier attempt of this write landed, its answer lost
                    outcomes.append(None)
                elif budget.fits(event, updated, estimate, rate):
                    # Its own time, not the leader's: the reconciler finds its log entry by that day.
                    updated = budget.admitted(updated, request_id, estimate, at)
                    outcomes.append(None)
                else:
                    outcomes.append(estimate)
            refused = [estimate for estimate in outcomes if estimate is not None]
            if refused and not fresh:
                state = None  # confirm against storage before refusing anyone
                continue
            if refused and refusal is None and moves_left:
                shards = await self._shards(key[0])
                home = budget.shard_index(key[1])
                # Plan from storage plus what only this worker knows: its settlements not yet written
                # there, whose estimates storage still books (a move writes them along).
                planned = shards[home]
                for entry in settling:
                    planned = budget.settled(planned, *entry)
                shards[home] = {**planned, "etag": shards[home]["etag"]}
                # Room for the whole group: those that fitted this attempt are not written yet, so the
                # home in storage does not count them.
                fitted = [
                    estimate
                    for (estimate, request_id, _, _), outcome in zip(group, outcomes, strict=True)
                    if outcome is None and request_id not in landed
                ]
                want = (len(fitted) + len(refused), sum(fitted) + sum(refused),
                        math.ceil((sum(fitted) + sum(refused)) * rate))  # fmt: skip
                least = (len(fitted) + 1, sum(fitted) + min(refused), math.ceil((sum(fitted) + min(refused)) * rate))
                plan = budget.moves(event, shards, home, want, least, rate)
                if plan is None:
                    refusal = budget.exhausted(event, shards, min(refused), rate)
                else:
                    # A move that lost a race with another write (the other workers' homes are written
                    # all the time) is planned again from a fresh read; only moves that land count.
                    if not plan or await self._move(key[0], shards, plan):
                        moves_left -= 1
                    state = None  # read this shard again: spare moved in, or storage had it already
                    continue
            if updated is not state[1] and None in outcomes:
                try:
                    new_etag = await self._write(key, etag, updated)
                except (ResourceModifiedError, ResourceExistsError):
                    state, fresh = None, False
                    await asyncio.sleep(random.uniform(0, 0.005))
                    continue
                self._cache[key] = (new_etag, updated)
                self._forget_settled(key, len(settling))
            for (estimate, _, ticket, _), outcome in zip(group, outcomes, strict=True):
                if outcome is None:
                    ticket.set_result(key[1])
                else:
                    ticket.set_exception(refusal or budget.exhausted(event, shards, estimate, rate))
            return
        raise StorageUnavailable("Too much contention on the event's budget; try again in a moment.")

    async def budget_totals(self, event: Event) -> dict[str, Any]:
        """The event's budgets and what is used of them (``proxy.admission.budget.totals``): one range query."""
        return budget.totals(event, list((await self._shards(event.id)).values()), self.rate(event))

    def rate(self, event: Event) -> float:
        """The dearest price of a token among the event's models (input or output), in nano-dollars: what a
        request in flight is counted at against the cost caps, so that its estimate is never below its cost.
        A model without a known price counts 0 (its requests are flagged as unpriced in the reports)."""
        rate = self._rates.get(event.models)
        if rate is None:
            prices = [self._prices.known(model) for model in event.models]
            rate = max((max(p.input, p.output) * 1000 for p in prices if p is not None), default=0.0)
            self._rates[event.models] = rate
        return rate

    async def _shards(self, event_id: str) -> dict[int, dict[str, Any]]:
        return await budget.read_shards(self._tables, event_id)

    async def _move(
        self, event_id: str, shards: dict[int, dict[str, Any]], plan: Mapping[int, tuple[int, ...]]
    ) -> bool:
        """Move spare between shards in one transaction; False when a lost race left things as they were."""
        operations: list[tuple[str, Any, dict[str, Any]]] = []
        written: list[tuple[tuple[str, str], dict[str, Any]]] = []
        for index, gives in sorted(plan.items()):
            shard = shards[index]
            updated = budget.moved(shard, gives)
            written.append(((event_id, updated["RowKey"]), updated))
            if shard["etag"]:
                options = {"mode": UpdateMode.REPLACE, "etag": shard["etag"], "match_condition": _UNCHANGED}
                operations.append(("update", flights.stored(updated), options))
            else:
                operations.append(("create", flights.stored(updated), {}))
        try:
            results = await self._submit(operations)
        except TransactionRefused:
            await asyncio.sleep(random.uniform(0, 0.01))
            return False
        for (key, updated), result in zip(written, results, strict=False):
            self._cache[key] = (str(result["etag"]), updated)
        return True

    async def _admit_group(
        self,
        event: Event,
        user: str,
        key: tuple[str, str],
        now: datetime,
        group: list[Waiting],
    ) -> None:
        day, minute = day_of(now, event.time_zone), int(now.timestamp()) // 60
        state = self._cache.get(key)
        fresh = False
        for _ in range(MAX_ATTEMPTS):
            if state is None:
                state = await self._fetch(key)
                fresh = True
            etag, updated = state
            outcomes: list[Admission | CapExceeded] = []
            landed = flights.decode(updated)
            for estimate, request_id, _, _ in group:
                if request_id in landed:  # an earlier attempt of this write landed, its answer lost
                    outcomes.append(Admission(request_id, day, minute, estimate, *_remaining(event, updated), True))
                    continue
                refusal = _refusal(event, updated, now, minute, estimate, self.rate(event)) or flights.full(
                    flights.decode(updated)
                )
                if refusal is not None:
                    outcomes.append(refusal)
                    continue
                updated = _admitted(updated, user, day, minute, estimate, request_id, now)
                outcomes.append(
                    Admission(request_id, day, minute, estimate, *_remaining(event, updated), reserved=True)
                )
            if not fresh and any(isinstance(o, CapExceeded) for o in outcomes):
                state = None  # confirm against storage before refusing anyone
                continue
            if updated is not state[1]:
                try:
                    new_etag = await self._write(key, etag, updated)
                except (ResourceModifiedError, ResourceExistsError):
                    state, fresh = None, False
                    await asyncio.sleep(random.uniform(0, 0.005))
                    continue
                self._cache[key] = (new_etag, updated)
            for (_, _, ticket, _), outcome in zip(group, outcomes, strict=True):
                if isinstance(outcome, CapExceeded):
                    ticket.set_exception(outcome)
                else:
                    ticket.set_result(outcome)
            return
        raise StorageUnavailable("Too much contention on the usage counters; try again in a moment.")

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
            try:
                self._cache[key] = (await self._write(key, etag, updated), updated)
            except ResourceModifiedError:
                state = None
                await asyncio.sleep(random.uniform(0, 0.005))
                continue
            return
        raise StorageUnavailable("Too much contention on the event's budget.")

    def _forget_settled(self, key: tuple[str, str], count: int) -> None:
        left = self._unsettled.get(key, [])
        del left[:count]
        if not left:
            self._unsettled.pop(key, None)

    async def _transact(self, event_id: str, finished: list[Finished]) -> None:
        keys = sorted({(event_id, row) for item in finished for row in _rows(item)})
        pending = list(finished)
        async with contextlib.AsyncExitStack() as locks:
            for key in keys:  # in order: two writers never wait for each other's locks
                await locks.enter_async_context(self._lock(key))
            for _ in range(MAX_ATTEMPTS):
                operations: list[tuple[str, Any, dict[str, Any]]] = []
                updates: list[tuple[tuple[str, str], dict[str, Any]]] = []
                for key in keys:
                    state = self._cache.get(key) or await self._fetch(key)
                    etag, updated = state
                    for item in pending:
                        if key[1] == _day_row(item):
                            updated = _settled(updated, item.user, item.admission, item.settlement)
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
                logged = [item for item in pending if item.log is not None]
                operations.extend(("create", item.log, {}) for item in logged)
                if not operations:
                    for item in pending:
                        item.stored = True
                    return
                try:
                    results = await self._submit(operations)
                except TransactionRefused as error:
                    failed = error.index - len(updates)
                    if error.status_code == 409 and 0 <= failed < len(logged):
                        logged[failed].stored = True  # by an earlier attempt, with its settlement
                        pending.remove(logged[failed])
                    else:  # another instance wrote a day first (412, or 409 on a create): read it again
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

    async def _submit(self, operations: list[tuple[str, Any, dict[str, Any]]]) -> list[dict[str, Any]]:
        """Submit a transaction (``Tables.transact``). Safe to repeat: a transaction that did
        land fails the second time on a day's ETag (412, read again) or on its log entry
        (409, taken as stored), so nothing is counted twice."""
        return await self._tables.transact(operations)

    async def release_stale(self, event_id: str, row_key: str, cutoff: float, forget_before: float) -> int:
        """Give back the slots of requests admitted before ``cutoff`` (epoch s) and never settled.

        Entries released before ``forget_before`` are dropped: their worker is long gone.
        """
        key = (event_id, row_key)
        async with self._lock(key):
            for _ in range(MAX_ATTEMPTS):
                etag, entity = await self._fetch(key)
                inflight = flights.decode(entity)
                at = flights.admitted_at
                stale = [rid for rid, entry in inflight.items() if at(entry) < cutoff and not _released(entry)]
                forgotten = [rid for rid, entry in inflight.items() if at(entry) < forget_before and _released(entry)]
                if not etag or not (stale or forgotten):
                    return 0
                if row_key.startswith(budget.SHARD_PREFIX):
                    updated = await self._settled_from_log(event_id, entity, inflight, stale, forgotten)
                else:
                    updated = self._released_day(entity, inflight, stale, forgotten)
                try:
                    self._cache[key] = (await self._write(key, etag, updated), updated)
                except ResourceModifiedError:
                    await asyncio.sleep(random.uniform(0, 0.005))
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
                    _, logged = await self._entities.get(event_id, f"log|{day}|{request_id}")
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

    @staticmethod
    def _released_day(
        entity: dict[str, Any], inflight: dict[str, list[int]], stale: list[str], forgotten: list[str]
    ) -> dict[str, Any]:
        updated = _base(entity, str(entity.get("user", "")), str(entity.get("day", "")))
        inflight = dict(inflight)
        for request_id in stale:
            estimate, admitted_at = inflight[request_id][:2]
            inflight[request_id] = [estimate, admitted_at, 1]
            updated["reserved"] = max(0, updated["reserved"] - 1)
            if updated["tpm_minute"] == admitted_at // 60:
                updated["tpm_tokens"] = max(0, updated["tpm_tokens"] - estimate)
        for request_id in forgotten:
            del inflight[request_id]
        updated["inflight"] = inflight
        return updated

    async def _write(self, key: tuple[str, str], etag: str, entity: dict[str, Any]) -> str:
        stored = flights.stored(entity)
        if etag:
            return await self._entities.replace(stored, etag)
        try:
            return await self._entities.insert(stored)
        except ResourceNotFoundError:  # no table yet: an empty Azurite, say
            await self._tables.ensure()
            return await self._entities.insert(stored)


def _day_row(item: Finished) -> str:
    return f"{item.admission.day}|{item.user}"


def _rows(item: Finished) -> tuple[str, ...]:
    """The rows a finished request changes in the settling transaction (its shard is settled after it)."""
    return (_day_row(item),)


def _refusal(
    event: Event, entity: dict[str, Any], now: datetime, minute: int, estimate: int, rate: float = 0.0
) -> CapExceeded | None:
    if event.daily_requests is not None and entity.get("reserved", 0) >= event.daily_requests:
        return CapExceeded(
            f"You have used all {event.daily_requests} requests allowed per attendee today in "
            f"'{event.name}'. The cap resets at midnight in the event's time zone, {_reset(event, now)}.",
            code="daily_request_cap_exceeded",
            retry_after=seconds_to_midnight(now, event.time_zone),
        )
    if event.daily_tokens is not None and booked_tokens(entity) >= event.daily_tokens:
        return CapExceeded(
            f"You have used your {event.daily_tokens} tokens for today in '{event.name}'. "
            f"The budget resets at midnight in the event's time zone, {_reset(event, now)}.",
            code="daily_token_cap_exceeded",
            retry_after=seconds_to_midnight(now, event.time_zone),
        )
    if event.daily_cost is not None and booked_cost(entity, rate) >= round(event.daily_cost * 1_000_000_000):
        used = booked_cost(entity, rate) / 1_000_000_000
        return CapExceeded(
            f"You have used your ${event.daily_cost:,.2f} for today in '{event.name}' (${used:,.4f}, counting "
            f"requests still running at their highest price). The cap resets at midnight in the event's time "
            f"zone, {_reset(event, now)}.",
            code="daily_cost_cap_exceeded",
            retry_after=seconds_to_midnight(now, event.time_zone),
        )
    if event.tpm is not None and entity.get("tpm_minute") == minute:
        booked = entity.get("tpm_tokens", 0)
        if booked > 0 and booked + estimate > event.tpm:
            wait = 60 - int(now.timestamp()) % 60
            return CapExceeded(
                f"Rate limit: {event.tpm} tokens per minute per attendee in '{event.name}'; this request "
                f"may use about {estimate} more (prompt estimate plus max_tokens). Retry in {wait} s, "
                "or ask for fewer max_tokens.",
                code="rate_limited",
                retry_after=wait,
            )
    return None


def _resolve_all(group: list[Waiting]) -> Callable[[asyncio.Future[None]], None]:
    """A callback that fails every ticket still open when a group write ends in an error."""

    def resolve(write: asyncio.Future[None]) -> None:
        error = None if write.cancelled() else write.exception()
        if error is None and not write.cancelled():
            return
        if not isinstance(error, StorageUnavailable):
            error = StorageUnavailable("The usage counters could not be updated; try again in a moment.")
        for _, _, ticket, _ in group:
            if not ticket.done():
                ticket.set_exception(error)

    return resolve


def _taken(ticket: asyncio.Future[Any]) -> bool:
    """Whether a ticket was resolved with what its write took (not refused, not failed)."""
    return not ticket.cancelled() and ticket.exception() is None


def _remaining(event: Event, entity: dict[str, Any]) -> tuple[int | None, int | None]:
    """Requests and tokens left today under the event's caps (None: no cap)."""
    requests = None if event.daily_requests is None else event.daily_requests - entity["reserved"]
    tokens = None if event.daily_tokens is None else max(0, event.daily_tokens - booked_tokens(entity))
    return requests, tokens


def booked_cost(entity: dict[str, Any], rate: float) -> int:
    """The day's cost as the daily cost cap counts it (nano-dollars): recorded (per model, ``models``), plus the
    requests in flight at ``rate``, the dearest price per token of the event's models."""
    models = entity.get("models") or "{}"
    rows: dict[str, list[int]] = orjson.loads(models) if isinstance(models, str) else models
    recorded = sum(row[5] for row in rows.values() if len(row) > 5)
    return round(recorded + flights.booked(flights.decode(entity)) * rate)


def booked_tokens(entity: dict[str, Any]) -> int:
    """The day's tokens as the daily token cap counts them: recorded, plus the estimates in flight."""
    return int(entity.get("total_tokens", 0)) + flights.booked(flights.decode(entity))


def _reset(event: Event, now: datetime) -> str:
    """When the daily caps reset, as a person reads it: the event's midnight, and that moment in UTC."""
    midnight = next_midnight(now, event.time_zone)
    in_utc = midnight.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return f"{event.local(midnight)}" + ("" if event.time_zone == "UTC" else f" ({in_utc})")


def _base(entity: dict[str, Any], user: str, day: str) -> dict[str, Any]:
    updated = {"PartitionKey": entity["PartitionKey"], "RowKey": entity["RowKey"], "user": user, "day": day}
    for name in _COUNTERS:
        updated[name] = int(entity.get(name, 0))
    updated["models"] = entity.get("models", "{}")
    updated["backends"] = entity.get("backends", "{}")
    updated["tpm_minute"] = int(entity.get("tpm_minute", 0))
    updated["tpm_tokens"] = int(entity.get("tpm_tokens", 0))
    updated["inflight"] = flights.decode(entity)  # shared: copied by whoever changes it
    return updated


def _admitted(
    entity: dict[str, Any], user: str, day: str, minute: int, estimate: int, request_id: str, now: datetime
) -> dict[str, Any]:
    updated = _base(entity, user, day)
    updated["reserved"] += 1
    inflight = dict(updated["inflight"])
    inflight[request_id] = [estimate, int(now.timestamp())]
    updated["inflight"] = inflight
    if updated["tpm_minute"] != minute:
        updated["tpm_minute"], updated["tpm_tokens"] = minute, 0
    updated["tpm_tokens"] += estimate
    return updated


def _released(entry: list[int]) -> bool:
    return flights.released(entry)


def _settled(entity: dict[str, Any], user: str, admission: Admission, settlement: Settlement) -> dict[str, Any]:
    if not admission.reserved and not settlement.reached_upstream:
        return entity  # nothing taken and nothing used: a request refused by the event's budget, say
    updated = _base(entity, user, admission.day)
    if admission.reserved:
        inflight = dict(updated["inflight"])
        entry = inflight.pop(admission.request_id, None)
        if entry is None:
            return entity  # settled already: a retried write whose first attempt had landed
        updated["inflight"] = inflight
        released = _released(entry)
        if settlement.succeeded and released:
            updated["reserved"] += 1  # it outlived its lease after all: it takes its slot again
        elif not settlement.succeeded and not released:
            updated["reserved"] = max(0, updated["reserved"] - 1)
        if updated["tpm_minute"] == admission.minute:
            booked = 0 if released else admission.estimate
            updated["tpm_tokens"] = max(0, updated["tpm_tokens"] - booked + settlement.total_tokens)
    if not settlement.reached_upstream:
        return updated
    updated["requests"] += 1
    updated["failed"] += 0 if settlement.succeeded else 1
    figures = (settlement.prompt_tokens, settlement.completion_tokens, settlement.total_tokens)
    updated["prompt_tokens"] += figures[0]
    updated["completion_tokens"] += figures[1]
    updated["total_tokens"] += figures[2]
    # Per model and per backend: requests, prompt, completion, total, cached tokens, cost (nano-USD), unpriced.
    row_figures = (1, *figures, settlement.cached_tokens, settlement.cost_nanos, int(settlement.unpriced))
    for name, key in (("models", settlement.model), ("backends", settlement.backend)):
        grouped: dict[str, list[int]] = orjson.loads(updated[name])
        row = grouped.setdefault(key, [])
        row.extend([0] * (len(row_figures) - len(row)))  # rows stored before cost was tracked had 4
        for index, value in enumerate(row_figures):
            row[index] += value
        updated[name] = orjson.dumps(grouped).decode()
    return updated
