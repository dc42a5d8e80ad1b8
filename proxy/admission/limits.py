"""Admission: a request reserved against its attendee's daily caps and its event's budget, exact across instances.

``Ledger`` admits (``admit``, ``admit_all``, ``admit_budget``) and, through
what it inherits, settles (``proxy.admission.settling``); the day entity it
writes and what the caps allow are ``proxy.admission.days``'s, its reads and
conditional writes ``proxy.admission.counters``'s. The event's budgets live in
shards of their own (``proxy.admission.budget``), admitted by ``admit_budget``
concurrently with the attendee's day (``admit_all``).

Storage cost per request, on the critical path:

- no cap at all (no daily request, token or TPM cap): 0 operations, or for a
  name the roster has not registered (``joining``) the insert of its row, after
  which settling inserts its first day without reading it (``Admission.new_day``);
- otherwise 1 conditional write, the ETag and figures being cached from this
  worker's previous write (the writes of other attendees of the event that wait
  meanwhile travel with it in one transaction, ``proxy.storage.combining``);
  +1 read the first time a worker sees the attendee that day, and +1 read and
  write per lost race with another instance;
- a new attendee (a name the roster has not registered, ``joining``): 1
  transaction that inserts its first day and its roster row together (they share
  the event's partition), with no read: a name not registered has no day stored;
- a refusal is confirmed by a fresh read (1 operation) so that a stale cache
  never refuses a request that another instance's refund would allow.

Requests of one attendee are serialised per worker by a lock, so races happen
only between instances, never within one; those that queue behind a write are
admitted together by the next one (group commit), so a burst from one
attendee costs one write per round trip, not one per request.
"""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime
from typing import Any

from azure.core import MatchConditions
from azure.data.tables import UpdateMode

from proxy.admission import budget, days
from proxy.admission import inflight as flights
from proxy.admission.counters import MAX_ATTEMPTS, Waiting, absent
from proxy.admission.days import Admission, Finished, Settlement, day_of, has_caps
from proxy.admission.settling import Settling
from proxy.errors import CapExceeded, StorageUnavailable
from proxy.policy.events import Event
from proxy.storage.entities import TransactionRefused

MAX_MOVES = 8  # moves of spare into the home shard that landed, per group write, before refusing
_UNCHANGED = MatchConditions.IfNotModified


class Ledger(Settling):
    """Admits requests against the per-attendee day entities and the event budget's shards, and settles them."""

    async def admit(
        self,
        event: Event,
        user: str,
        now: datetime,
        estimate: int,
        request_id: str,
        joining: dict[str, Any] | None = None,
    ) -> Admission:
        """Reserve one request against the caps, or raise ``CapExceeded``.

        Requests of one attendee that arrive while a reservation is being
        written wait for it, then are reserved together in the next write:
        one storage operation admits them all (group commit). ``joining`` is
        the roster row of a name not registered yet (``Roster.admit``): it is
        inserted with the name's first day, or alone if the request is refused.
        """
        day = day_of(now, event.time_zone)
        minute = int(now.timestamp()) // 60
        if not has_caps(event):  # nothing to reserve; a new name joins now, and its day is known not stored
            new_day = joining is not None and await self._join(joining)
            return Admission(request_id, day, minute, estimate, None, None, reserved=False, new_day=new_day)
        key = (event.id, f"{day}|{user}")
        result: Admission = await self._grouped(
            key,
            (estimate, request_id, int(now.timestamp())),
            lambda group: self._admit_group(event, user, key, now, group, joining),
            lambda admission: self._give_back(event.id, user, admission, None),
        )
        return result

    async def admit_all(
        self,
        event: Event,
        user: str,
        now: datetime,
        estimate: int,
        request_id: str,
        joining: dict[str, Any] | None = None,
    ) -> Admission:
        """Admit against the attendee's caps and the event's budget (both at once), or raise ``CapExceeded``.

        When one admits and the other refuses, what was taken is given back
        in the background. So is what a write that failed with
        ``StorageUnavailable`` may have taken: its answer lost, it may have
        landed all the same. Giving back is idempotent (only an entry still
        in flight is given back), so a write that did not land costs nothing.
        """
        if not budget.has_budget(event):
            try:
                return await self.admit(event, user, now, estimate, request_id, joining)
            except StorageUnavailable:
                if has_caps(event):
                    self._give_back(
                        event.id, user, self._untaken(now, estimate, request_id, True, event.time_zone), None
                    )
                raise
        attendee_task = asyncio.ensure_future(self.admit(event, user, now, estimate, request_id, joining))
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
                if not await self._written(key, etag, updated):
                    state, fresh = None, False
                    continue
                self._forget_settled(key, len(settling))
            for (estimate, _, ticket, _), outcome in zip(group, outcomes, strict=True):
                if outcome is None:
                    ticket.set_result(key[1])
                else:
                    ticket.set_exception(refusal or budget.exhausted(event, shards, estimate, rate))
            return
        raise StorageUnavailable("Too much contention on the event's budget; try again in a moment.")

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
        joining: dict[str, Any] | None = None,
    ) -> None:
        day, minute = day_of(now, event.time_zone), int(now.timestamp()) // 60
        state = self._cache.get(key)
        fresh = False
        if state is None and joining is not None:
            # A name not registered has no day stored: no read. Were it wrong, the insert fails (409) and reads.
            state, fresh = absent(key), True
        for _ in range(MAX_ATTEMPTS):
            if state is None:
                state = await self._fetch(key)
                fresh = True
            etag, updated = state
            outcomes: list[Admission | CapExceeded] = []
            landed = flights.decode(updated)
            for estimate, request_id, _, _ in group:
                if request_id in landed:  # an earlier attempt of this write landed, its answer lost
                    outcomes.append(Admission(request_id, day, minute, estimate, *days.remaining(event, updated), True))
                    continue
                refusal = days.refusal(event, updated, now, minute, estimate, self.rate(event)) or flights.full(
                    flights.decode(updated)
                )
                if refusal is not None:
                    outcomes.append(refusal)
                    continue
                updated = days.admitted(updated, user, day, minute, estimate, request_id, now)
                outcomes.append(
                    Admission(request_id, day, minute, estimate, *days.remaining(event, updated), reserved=True)
                )
            if not fresh and any(isinstance(o, CapExceeded) for o in outcomes):
                state = None  # confirm against storage before refusing anyone
                continue
            if updated is not state[1]:
                if not await self._written(key, etag, updated, joining):
                    state, fresh = None, False
                    continue
            elif joining is not None and any(isinstance(o, CapExceeded) for o in outcomes):
                await self._join(joining)  # refused, so no day to carry it: the name joins all the same
            for (_, _, ticket, _), outcome in zip(group, outcomes, strict=True):
                if isinstance(outcome, CapExceeded):
                    ticket.set_exception(outcome)
                else:
                    ticket.set_result(outcome)
            return
        raise StorageUnavailable("Too much contention on the usage counters; try again in a moment.")


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
