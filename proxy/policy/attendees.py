"""Attendees of an event: the roster of names seen, ``max_attendees``, and blocked names.

Rows in the event's ``proxyusage`` partition (prefixes that sort after the
request log's ``log|``, so the reports' ``RowKey lt 'log|'`` never sees them):

- ``RowKey="user|<name>"``: one per distinct name that sent a request, with
  ``first_seen``;
- ``RowKey="roster"``: ``count``, the number of those names when the last was
  registered under ``max_attendees``.

Under ``max_attendees``, a new name is registered by one entity group
transaction that inserts its row and rewrites the roster under its ETag,
refused (403 ``attendee_limit_reached``) when the names registered (counted
from their rows, one range query) have reached the limit: two instances can
never both take the last place. Without a limit there is nothing to count, so
a new name's row is inserted alone and names never contend on the roster row
(an existing row, 409, means another request registered it). A limit set
later holds from when every worker has seen it (``EVENT_CACHE_SECONDS``);
names registered before count, as they are counted from their rows. Names new to a worker at the
same moment are registered together, one transaction for all of them (group
commit); only the first request of each name ever writes here. A worker
remembers the names it has seen, so a known name costs nothing, and a name new
to this worker costs one point read, or none when the event's names, read for
the check for personal keys (``proxy.policy.keys``), include it (``seen``).
Without ``max_attendees``, a new name is not registered here: its row rides
in the transaction that inserts its first day (an event with caps), or is
inserted alone by the admission, which then knows the name has no day stored
(an event without caps: ``Admission.new_day``); ``proxy.admission.limits``. So
a new attendee's admission costs two storage calls: the read of its row, not
found, and that write.

Blocked names are kept on the event itself (``proxy.policy.events``), which every
worker caches for ``EVENT_CACHE_SECONDS``: a block or an unblock takes effect
within that time, at no cost per request. A blocked name keeps its place on
the roster.
"""

from __future__ import annotations

import asyncio
import random
from datetime import UTC, datetime
from typing import Any

from azure.core import MatchConditions
from azure.core.exceptions import ResourceNotFoundError
from azure.data.tables import UpdateMode

from proxy.errors import AttendeeBlocked, AttendeeLimitReached, StorageUnavailable
from proxy.policy.events import Event
from proxy.storage.entities import TransactionRefused
from proxy.storage.tables import Tables, gathered

USER_PREFIX = "user|"
USER_END = "user}"
ROSTER_ROW = "roster"
MAX_NAMES_PER_WRITE = 99  # an entity group transaction holds 100 operations, one of them the roster
MAX_ATTEMPTS = 100
_KNOWN_LIMIT = 200_000

Waiting = tuple[str, asyncio.Future[bool], dict[str, Any] | None]


class Roster:
    """Registers attendee names per event, exact under ``max_attendees`` across instances."""

    def __init__(self, tables: Tables) -> None:
        self._tables = tables
        self._known: set[tuple[str, str]] = set()
        # Names waiting for the next group write: (name, ticket, properties of its row or None).
        self._waiting: dict[str, list[Waiting]] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def admit(self, event: Event, user: str) -> dict[str, Any] | None:
        """Let a name in: raise ``AttendeeBlocked``, or ``AttendeeLimitReached`` for a new name past the limit.

        A new name of an event without ``max_attendees`` is not registered here: its row is returned, for the
        admission (``proxy.admission.limits``) to insert with the name's first day in one transaction (or alone,
        in an event without caps) and to report with ``seen`` once stored. Otherwise None: the name is in.
        """
        if user in event.blocked:
            raise AttendeeBlocked(
                f"The organizer of '{event.name}' has blocked the name '{user}'. Ask them if this is a mistake."
            )
        name = (event.id, user)
        if name in self._known:
            return None
        if await self._registered(event.id, user):
            self._remember(event.id, user)
            return None
        if event.max_attendees is None:
            return self.row(event.id, user)
        await self._register(event, user, None)
        self._remember(event.id, user)
        return None

    @staticmethod
    def row(event_id: str, user: str, properties: dict[str, Any] | None = None) -> dict[str, Any]:
        """A name's row as registering inserts it."""
        return {"PartitionKey": event_id, "RowKey": USER_PREFIX + user, "user": user,
                **_first_seen(datetime.now(UTC)), **(properties or {})}  # fmt: skip

    async def join(self, event: Event, user: str, properties: dict[str, Any]) -> bool:
        """Register a new name with ``properties`` on its row (a personal key's claim, ``proxy.policy.keys``): True when
        this call created the row, False when the name had one already (then the row is as it was). Raises
        ``AttendeeLimitReached`` for a new name past the limit. Of simultaneous calls for one name, one creates."""
        created = await self._register(event, user, properties)
        self._remember(event.id, user)
        return created

    def seen(self, event_id: str, user: str) -> None:
        """The name's row was read elsewhere and exists (``proxy.policy.keys``), or was stored by its admission
        (the row ``admit`` returned): admitting it needs no read."""
        self._remember(event_id, user)

    def _remember(self, event_id: str, user: str) -> None:
        if len(self._known) > _KNOWN_LIMIT:
            self._known.clear()
        self._known.add((event_id, user))

    async def _register(self, event: Event, user: str, properties: dict[str, Any] | None) -> bool:
        """Register the name in the next group write; True when its row was created for these properties."""
        ticket: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        ticket.add_done_callback(lambda done: done.cancelled() or done.exception())
        waiting = self._waiting.setdefault(event.id, [])
        waiting.append((user, ticket, properties))
        lock = self._locks.setdefault(event.id, asyncio.Lock())
        async with lock:
            if not ticket.done():
                group, self._waiting[event.id] = waiting, []
                write = asyncio.ensure_future(self._register_group(event, group))
                await asyncio.shield(write)
        return await ticket

    async def _register_group(self, event: Event, group: list[Waiting]) -> None:
        # Per name, the one ticket whose properties its row is created with: the first that has some.
        creators: dict[str, tuple[asyncio.Future[bool], dict[str, Any]]] = {}
        for user, ticket, properties in group:
            if user not in creators or (properties is not None and not creators[user][1]):
                creators[user] = (ticket, properties or {})
        try:
            names = list(creators)
            refused: set[str] = set()
            existed: set[str] = set()
            while names:
                batch, names = names[:MAX_NAMES_PER_WRITE], names[MAX_NAMES_PER_WRITE:]
                rows = {user: creators[user][1] for user in batch}
                batch_refused, batch_existed = await self._insert(event, batch, rows)
                refused |= batch_refused
                existed |= batch_existed
        except Exception as error:
            failure = error if isinstance(error, StorageUnavailable) else StorageUnavailable(
                "The attendee list could not be updated; try again in a moment."
            )  # fmt: skip
            for _, ticket, _ in group:
                if not ticket.done():
                    ticket.set_exception(failure)
            if not isinstance(error, StorageUnavailable):
                raise
            return
        for user, ticket, _ in group:
            if ticket.done():
                continue
            if user in refused:
                ticket.set_exception(
                    AttendeeLimitReached(
                        f"'{event.name}' is limited to {event.max_attendees} attendees, and they have all joined "
                        f"already; the name '{user}' is not one of them. Use the name you joined with, or ask the "
                        "organizer."
                    )
                )
            else:
                ticket.set_result(user not in existed and creators[user][0] is ticket)

    async def _insert(
        self, event: Event, names: list[str], rows: dict[str, dict[str, Any]]
    ) -> tuple[set[str], set[str]]:
        """Register names (at most 99, each row with its properties) in one transaction with the roster; the
        names refused, and those whose rows existed already."""
        existed: set[str] = set()
        limited = event.max_attendees is not None
        for _ in range(MAX_ATTEMPTS):
            etag, count = await self._roster(event.id) if limited else ("", 0)
            room = len(names) if event.max_attendees is None else max(0, event.max_attendees - count)
            taken, refused = names[:room], set(names[room:])
            for user in list(refused):  # registered meanwhile by another instance: in, with no place needed
                if await self._registered(event.id, user):
                    self._remember(event.id, user)
                    refused.discard(user)
                    existed.add(user)
                    names.remove(user)
            if not taken:
                return refused, existed
            operations: list[tuple[str, Any, dict[str, Any]]] = []
            if limited:
                roster = {"PartitionKey": event.id, "RowKey": ROSTER_ROW, "count": count + len(taken)}
                condition = {"mode": UpdateMode.REPLACE, "etag": etag, "match_condition": MatchConditions.IfNotModified}
                operations.append(("update", roster, condition) if etag else ("create", roster, {}))
            for user in taken:
                operations.append(("create", self.row(event.id, user, rows.get(user)), {}))
            try:
                await self._submit(operations)
            except TransactionRefused as error:
                first_name = 1 if limited else 0  # the index of the first name's row in the transaction
                if error.status_code == 409 and error.index >= first_name:
                    # Registered meanwhile by another instance: it is in, and needs no place.
                    known = taken[error.index - first_name]
                    self._remember(event.id, known)
                    existed.add(known)
                    names = [name for name in names if name != known]
                elif error.status_code not in (409, 412):
                    raise StorageUnavailable("The attendee list could not be updated.") from error
                await asyncio.sleep(random.uniform(0, 0.005))
                continue
            return refused, existed
        raise StorageUnavailable("Too much contention on the attendee list; try again in a moment.")

    async def _registered(self, event_id: str, user: str) -> bool:
        try:
            await self._tables.usage_entities.get(event_id, USER_PREFIX + user)
        except ResourceNotFoundError:
            return False
        return True

    async def _roster(self, event_id: str) -> tuple[str, int]:
        """The roster row's ETag (under which names are registered) and the number of names registered."""
        try:
            etag, _ = await self._tables.usage_entities.get(event_id, ROSTER_ROW)
        except ResourceNotFoundError:
            etag = ""
        # Counted from the rows: names registered while the event had no limit wrote no count.
        return etag, len(await roster(self._tables, event_id))

    async def _submit(self, operations: list[tuple[str, Any, dict[str, Any]]]) -> None:
        """Submit a transaction (``Tables.transact``). Retrying is safe: a transaction that
        did land fails the second time on the roster's ETag (412) or on a name's row (409),
        both handled above."""
        await self._tables.transact(operations)


async def roster(tables: Tables, event_id: str) -> dict[str, datetime]:
    """The names registered for an event, with when each was first seen."""
    return {str(row["user"]): row["first_seen"] for row in await roster_rows(tables, event_id, "first_seen")}


async def roster_rows(tables: Tables, event_id: str, *fields: str) -> list[Any]:
    """The rows of the names registered for an event: ``user`` and ``fields`` (one range query)."""
    query = tables.usage.query_entities(
        "PartitionKey eq @pk and RowKey ge @first and RowKey lt @after",
        parameters={"pk": event_id, "first": USER_PREFIX, "after": USER_END},
        select=["user", *fields],
    )
    try:
        return await gathered(query)
    except ResourceNotFoundError:
        return []


def _first_seen(now: datetime) -> dict[str, str]:
    # Typed as a date, as azure-data-tables would write it, so queries read it back as a datetime.
    return {"first_seen": now.strftime("%Y-%m-%dT%H:%M:%S.%fZ"), "first_seen@odata.type": "Edm.DateTime"}
