"""Personal keys: an attendee makes a name theirs in one event.

``POST /api/v1/keys`` with ``{"code", "name"}`` gives a key (``ek-`` and 32
URL-safe characters: 192 random bits), shown once. Where it is kept:

- The name's roster row (``proxyusage``, ``PartitionKey=<event id>``,
  ``RowKey="user|<name>"``, ``proxy.policy.attendees``) holds ``key_hash``, the keyed
  hash of the key. This row is the authority: a key opens its name only while
  the row holds the key's hash (compared in constant time), and a name whose
  row holds a hash is *claimed*: ``CODE/name`` is refused for it (401
  ``personal_key_required``). With GitHub sign-in the row also holds the
  GitHub account's id (``github_id``).
- An index row (``proxyevents``, ``PartitionKey="key"``, ``RowKey=<key
  hash>``) names the event and the name: a key is looked up by this point read,
  never by a filter built from input. An index row alone opens nothing.

Registering is exact under concurrency. The index row is written first (it
opens nothing yet); then the claim, by one conditional write: a new name's row
is created in the roster's transaction, which raises the roster's count under
its ETag (so ``max_attendees`` holds exactly, ``proxy.policy.attendees``), and a name
already on the roster without a key gets the hash by a merge under the row's
ETag. Of any number of simultaneous registrations of one name, on any number
of instances, one wins; the others find the hash and get 409 ``name_taken``.
A registration whose client leaves before the claim leaves nothing (its index
row is deleted); one whose claim landed leaves the name claimed by a key nobody
read, which the organizer's reset frees.

An organizer's reset removes the hash from the row (under its ETag), then the
index row: the key stops working at once on the instance that did the reset,
and on every other instance within ``EVENT_CACHE_SECONDS`` (its cache), the
same bound as a block or a code rotation; the name can be registered again.

Lookups are cached per worker for ``EVENT_CACHE_SECONDS``: a key costs no
storage operation per request in the steady state, and two sequential reads
(the index row, then the event and the name's row together) once per cache
lifetime, as a code does. Whether a ``CODE/name`` name is claimed is read
per event, not per name: the event's names and which hold a key, one range
query per event and cache lifetime (``claimed``), whatever the number of
attendees, so an attendee's request costs no read for it even when it comes
less often than that. The same read tells the roster which names are
registered, so it need not read their rows. A claim made on another instance
refuses ``CODE/name`` here within that time.
Unknown keys are cached for a few seconds, and count as failed lookups for
the guessing throttle (``proxy.policy.guessing``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import secrets
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from azure.core import MatchConditions
from azure.core.exceptions import ResourceModifiedError, ResourceNotFoundError
from azure.data.tables import UpdateMode

from proxy.config.hashing import PERSONAL_KEY
from proxy.errors import AttendeeBlocked, NameTaken, NotFound, StorageUnavailable
from proxy.policy.attendees import USER_PREFIX, Roster, roster_rows
from proxy.policy.credentials import KEY_PREFIX
from proxy.policy.events import NEGATIVE_CACHE_SECONDS, Event, EventStore
from proxy.policy.lookups import Lookups
from proxy.storage.tables import Tables, guarded

KEY_BYTES = 24  # 32 URL-safe characters, 192 bits
KEY_PARTITION = "key"
CLAIM_ATTEMPTS = 20


def generate_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(KEY_BYTES)


class PersonalKeys:
    """Registering, looking up and resetting personal keys, with the per-worker caches of lookups."""

    def __init__(
        self,
        tables: Tables,
        events: EventStore,
        roster: Roster,
        cache_seconds: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._tables = tables
        self._events = events
        self._roster = roster
        self._cache_seconds = cache_seconds
        self._keys = Lookups(clock)  # key hash: (event, name) or None
        self._names = Lookups(clock)  # event id: {registered name: whether it has a key}

    def hash(self, key: str) -> str:
        """The stored form of a personal key: its keyed hash (``proxy.config.hashing``), as codes are kept."""
        return self._events.hash_secret(PERSONAL_KEY, key)

    async def lookup(self, key_hash: str) -> tuple[Event, str] | None:
        """The event and name this key opens, or None. Cached; two sequential reads when not."""
        return await self._keys.get(key_hash, lambda: self._lookup(key_hash), self._ttl)

    async def claimed(self, event_id: str, user: str) -> bool:
        """Whether the name has a personal key in the event (then ``CODE/name`` is refused). Cached per event."""
        names = await self._names.get(event_id, lambda: self._registered(event_id), lambda _: self._cache_seconds)
        keyed = names.get(user)
        if keyed is None:
            return False
        self._roster.seen(event_id, user)  # registered: admitting it needs no read of its row
        return keyed

    async def _registered(self, event_id: str) -> dict[str, bool]:
        """The event's registered names, each with whether it holds a key: one range query."""
        rows = await roster_rows(self._tables, event_id, "key_hash")
        return {str(row["user"]): bool(row.get("key_hash")) for row in rows}

    async def register(self, event: Event, user: str, github_id: str | None = None) -> str:
        """Claim the name in the event with a new key; the key (shown once, only its hash is kept).

        Raises ``NameTaken`` when the name has a key (unless ``github_id`` is the GitHub account that holds it:
        its new key then replaces the old), ``AttendeeBlocked``, or ``AttendeeLimitReached`` for a new name past
        ``max_attendees``.
        """
        if user in event.blocked:
            raise AttendeeBlocked(
                f"The organizer of '{event.name}' has blocked the name '{user}'. Ask them if this is a mistake."
            )
        key = generate_key()
        key_hash = self.hash(key)
        index = {"PartitionKey": KEY_PARTITION, "RowKey": key_hash, "event_id": event.id, "user": user}
        await self._tables.insert(self._tables.events, index)  # opens nothing until the name's row has the hash
        try:
            replaced = await self._claim(event, user, key_hash, github_id)
        except BaseException:
            with contextlib.suppress(Exception):
                await self._delete_index(key_hash)
            raise
        if replaced:
            await self._delete_index(replaced)
            self._keys.drop(replaced)
        self._names.drop(event.id)  # read again, with this claim, by the next request
        return key

    async def _claim(self, event: Event, user: str, key_hash: str, github_id: str | None) -> str | None:
        """Put the key's hash on the name's row, conditionally; the hash it replaced (same GitHub account)."""
        claim: dict[str, Any] = {"key_hash": key_hash, "github_id": github_id or "", "key_at": datetime.now(UTC)}
        for _ in range(CLAIM_ATTEMPTS):
            try:
                row = await guarded(self._tables.usage.get_entity(event.id, USER_PREFIX + user))
            except ResourceNotFoundError:
                if await self._roster.join(event, user, _typed(claim)):
                    return None
                continue  # registered meanwhile: read it
            held = str(row.get("key_hash") or "")
            if held and hmac.compare_digest(held, key_hash):
                return None  # our own claim, landed by a write whose answer was lost
            if held and not (github_id and str(row.get("github_id") or "") == github_id):
                raise NameTaken(
                    f"The name '{user}' already has a personal key in '{event.name}'. Use that key, or choose another "
                    "name; if the key is yours and lost, the organizer can reset it."
                )
            if not await self._merge(event.id, user, claim, row.metadata["etag"]):
                continue  # another registration or a reset came first: read again
            return held or None
        raise StorageUnavailable("Too many registrations of this name at once; try again in a moment.")

    async def reset(self, event_id: str, user: str) -> bool:
        """Remove the name's key (the name can be registered again); whether it had one."""
        for _ in range(CLAIM_ATTEMPTS):
            try:
                row = await guarded(self._tables.usage.get_entity(event_id, USER_PREFIX + user))
            except ResourceNotFoundError:
                return False
            held = str(row.get("key_hash") or "")
            if not held:
                self._names.drop(event_id)
                return False
            if not await self._merge(event_id, user, {"key_hash": "", "github_id": ""}, row.metadata["etag"]):
                continue
            self._keys.drop(held)
            self._names.drop(event_id)
            await self._delete_index(held)
            return True
        raise StorageUnavailable("The name kept changing while its key was being reset; try again.")

    async def keyed_names(self, event_id: str) -> set[str]:
        """The names of the event that have a personal key (for the organizer's list)."""
        return {user for user, keyed in (await self._registered(event_id)).items() if keyed}

    async def _merge(self, event_id: str, user: str, fields: dict[str, Any], etag: str | None) -> bool:
        """Write ``fields`` onto the name's row if nobody wrote it since ``etag``; whether it was written."""
        entity = {"PartitionKey": event_id, "RowKey": USER_PREFIX + user, **fields}
        try:
            await guarded(
                self._tables.usage.update_entity(
                    entity, mode=UpdateMode.MERGE, etag=etag, match_condition=MatchConditions.IfNotModified
                )
            )
        except (ResourceModifiedError, ResourceNotFoundError):
            return False
        return True

    def _ttl(self, found: tuple[Event, str] | None) -> float:
        return self._cache_seconds if found is not None else min(NEGATIVE_CACHE_SECONDS, self._cache_seconds)

    async def _lookup(self, key_hash: str) -> tuple[Event, str] | None:
        try:
            index = await guarded(self._tables.events.get_entity(KEY_PARTITION, key_hash))
        except ResourceNotFoundError:
            return None
        event_id, user = str(index["event_id"]), str(index["user"])
        try:
            event, row = await asyncio.gather(self._events.get(event_id), self._row(event_id, user))
        except NotFound:
            return None  # the event was deleted
        held = str(row.get("key_hash") or "") if row else ""
        if not held or not hmac.compare_digest(held, key_hash):
            return None  # reset, or an index row left by a registration that lost
        self._roster.seen(event_id, user)  # its row, read: the name needs no registering here
        return event, user

    async def _row(self, event_id: str, user: str) -> dict[str, Any] | None:
        try:
            _, row = await self._tables.usage_entities.get(event_id, USER_PREFIX + user)
        except ResourceNotFoundError:
            return None
        return row

    async def _delete_index(self, key_hash: str) -> None:
        with contextlib.suppress(ResourceNotFoundError):
            await guarded(self._tables.events.delete_entity(KEY_PARTITION, key_hash))


def _typed(claim: dict[str, Any]) -> dict[str, Any]:
    """The claim as the roster's lean client writes it (JSON: the date typed as azure-data-tables would)."""
    moment: datetime = claim["key_at"]
    return {
        **claim,
        "key_at": moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "key_at@odata.type": "Edm.DateTime",
    }
