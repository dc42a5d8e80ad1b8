"""Events: the model, its validation, and the store in Table Storage.

Layout in the ``proxyevents`` table:

- ``PartitionKey="event"``, ``RowKey=<event id>``: the event itself, with the
  keyed hash of its code (``proxy.config.hashing``; the code is never stored).
- ``PartitionKey="code"``, ``RowKey=<code hash>``: an index row pointing at the
  event id. A credential is looked up by this key, never by a filter built from
  input; the hash found on the event is compared in constant time.

Events stored before codes were keyed (plain SHA-256) are upgraded on their
code's first use: a code unknown under its keyed hash is looked up once more
under its old hash, and an event found that way is re-hashed (new index row,
event rewritten under its ETag, old index row deleted). An event never used
after the upgrade keeps its old hash until then; rotating its code removes it.

Every change to a stored event is conditional on the ETag it was read with
(``EventStore.modify``): a change that another write overtook (a block, a
rotation, a PATCH, from this process or another) is applied again to the event
as it now is, so no change answered with success is lost. After
``MODIFY_ATTEMPTS`` collisions in a row it gives up with 409 ``edit_conflict``.
A rotation claims the new code's index row first, points the event at it, and
only then releases the old one, so the event never refuses its current code;
an index row left behind by a crash opens nothing (the hashes are compared).

Lookups by code are cached per worker for ``EVENT_CACHE_SECONDS`` (at most 60),
so a change (disable, rotate, new window) takes effect on every instance
within that time. Unknown codes are cached for a few seconds too, so that a
flood of bad keys does not become a flood of storage reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import random
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo

import orjson
from azure.core import MatchConditions
from azure.core.exceptions import ResourceExistsError, ResourceModifiedError, ResourceNotFoundError
from azure.data.tables import UpdateMode

from proxy.config.hashing import EVENT_CODE, SecretHasher, legacy_sha256
from proxy.config.settings import SettingsError
from proxy.errors import EditConflict, InvalidRequest, NotFound
from proxy.policy.lookups import Lookups
from proxy.storage.tables import Tables, gathered, guarded

EVENT_ID_PATTERN = re.compile(r"[a-z0-9][a-z0-9-]{0,63}")
DEFAULT_MODELS = ("gpt-4o-mini", "text-embedding-3-small")
DEFAULT_MAX_TOKENS = 4096
DEFAULT_DAILY_REQUESTS = 1000
GENERATED_CODE_BYTES = 12  # 16 URL-safe characters
NEGATIVE_CACHE_SECONDS = 5.0
MODIFY_ATTEMPTS = 20

_EVENT_PK = "event"
_OPTIONAL_CAPS = ("daily_requests", "daily_tokens", "tpm", "event_requests", "event_tokens", "max_attendees",
                  "session_turns", "session_chars")  # fmt: skip
_CODE_PK = "code"
AUDIT_PREFIX = "~audit|"  # the audit entries' row keys (proxy.policy.audit) sort after every event id

# Makes the audit entry (proxy.policy.audit) of a change from the event before to the event after (None: none).
Audit = Callable[["Event | None", "Event | None"], dict[str, Any]]


def generate_code() -> str:
    """A fresh code from a secure random source, valid per the credential format."""
    return secrets.token_urlsafe(GENERATED_CODE_BYTES)


@dataclass(frozen=True, slots=True)
class Event:
    """One event: who may call, when, which models, within which caps."""

    id: str
    name: str
    code_hash: str
    starts_at: datetime
    ends_at: datetime
    time_zone: str = "UTC"
    models: tuple[str, ...] = DEFAULT_MODELS
    max_tokens: int = DEFAULT_MAX_TOKENS
    daily_requests: int | None = DEFAULT_DAILY_REQUESTS
    daily_tokens: int | None = None
    tpm: int | None = None
    event_requests: int | None = None
    event_tokens: int | None = None
    max_attendees: int | None = None
    # Cost caps in USD (proxy.config.prices): per attendee and day, and for the whole event.
    daily_cost: float | None = None
    event_cost: float | None = None
    # Chat sessions (proxy.conversations.sessions): turns and characters kept; None is the proxy's default.
    session_turns: int | None = None
    session_chars: int | None = None
    blocked: tuple[str, ...] = ()
    # Every attendee must use a personal key (proxy.policy.keys): CODE/name is refused with personal_key_required.
    attendee_keys: bool = False
    active: bool = True
    description: str = ""
    organizer: str = ""
    # Where budget alerts are POSTed ("" for none; proxy.admission.alerts). A secret: shown masked, never logged.
    alert_webhook: str = ""
    # Who may see and change it (proxy.policy.accounts): the account that created it, and the shares {name: role}.
    owner: str = ""
    shared: tuple[tuple[str, str], ...] = ()
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    # The stored entity's ETag when read or written ("" before): every write is conditional on it.
    etag: str = field(default="", compare=False, repr=False)

    def local(self, moment: datetime) -> str:
        """A moment shown in the event's time zone, for messages."""
        return moment.astimezone(ZoneInfo(self.time_zone)).strftime(f"%Y-%m-%d %H:%M {self.time_zone}")

    def public(self) -> dict[str, Any]:
        """The JSON shape shown to organizers (never the code or its hash)."""
        return {
            "id": self.id,
            "name": self.name,
            "start": self.starts_at.isoformat(),
            "end": self.ends_at.isoformat(),
            "time_zone": self.time_zone,
            "models": list(self.models),
            "max_tokens": self.max_tokens,
            "daily_requests": self.daily_requests,
            "daily_tokens": self.daily_tokens,
            "tpm": self.tpm,
            "event_requests": self.event_requests,
            "event_tokens": self.event_tokens,
            "max_attendees": self.max_attendees,
            "daily_cost": self.daily_cost,
            "event_cost": self.event_cost,
            "session_turns": self.session_turns,
            "session_chars": self.session_chars,
            "attendee_keys": self.attendee_keys,
            "active": self.active,
            "description": self.description,
            "organizer": self.organizer,
            # Its scheme and host only: the path of a Slack or Teams webhook is its token.
            "alert_webhook": _masked(self.alert_webhook) if self.alert_webhook else None,
            "owner": self.owner or None,
            "shared": dict(self.shared),
            "created_at": self.created_at.isoformat(),
        }

    def to_entity(self) -> dict[str, Any]:
        entity: dict[str, Any] = {
            "PartitionKey": _EVENT_PK,
            "RowKey": self.id,
            "name": self.name,
            "code_hash": self.code_hash,
            "starts_at": self.starts_at,
            "ends_at": self.ends_at,
            "time_zone": self.time_zone,
            "models": ",".join(self.models),
            "max_tokens": self.max_tokens,
            "active": self.active,
            "description": self.description,
            "organizer": self.organizer,
            "created_at": self.created_at,
            "blocked": orjson.dumps(self.blocked).decode(),
            "attendee_keys": self.attendee_keys,
            "owner": self.owner,
            "shared": orjson.dumps(dict(self.shared)).decode(),
        }
        if self.alert_webhook:
            entity["alert_webhook"] = self.alert_webhook
        for name in ("daily_cost", "event_cost"):
            value = getattr(self, name)
            if value is not None:
                entity[name] = float(value)
        # Table Storage has no null: an absent property means "no cap".
        for name in _OPTIONAL_CAPS:
            value = getattr(self, name)
            if value is not None:
                entity[name] = value
        return entity

    @classmethod
    def from_entity(cls, entity: dict[str, Any]) -> Event:
        return cls(
            id=entity["RowKey"],
            name=entity["name"],
            code_hash=entity["code_hash"],
            starts_at=_utc(entity["starts_at"]),
            ends_at=_utc(entity["ends_at"]),
            time_zone=entity.get("time_zone") or "UTC",
            models=tuple(m for m in entity.get("models", "").split(",") if m),
            max_tokens=int(entity["max_tokens"]),
            daily_requests=_optional_int(entity.get("daily_requests")),
            daily_tokens=_optional_int(entity.get("daily_tokens")),
            tpm=_optional_int(entity.get("tpm")),
            event_requests=_optional_int(entity.get("event_requests")),
            event_tokens=_optional_int(entity.get("event_tokens")),
            max_attendees=_optional_int(entity.get("max_attendees")),
            daily_cost=None if entity.get("daily_cost") is None else float(entity["daily_cost"]),
            event_cost=None if entity.get("event_cost") is None else float(entity["event_cost"]),
            session_turns=_optional_int(entity.get("session_turns")),
            session_chars=_optional_int(entity.get("session_chars")),
            blocked=tuple(orjson.loads(entity.get("blocked") or "[]")),
            attendee_keys=bool(entity.get("attendee_keys", False)),
            active=bool(entity.get("active", True)),
            description=entity.get("description") or "",
            organizer=entity.get("organizer") or "",
            alert_webhook=entity.get("alert_webhook") or "",
            owner=entity.get("owner") or "",
            shared=tuple(sorted(orjson.loads(entity.get("shared") or "{}").items())),
            created_at=_utc(entity.get("created_at") or entity["starts_at"]),
            etag=str(getattr(entity, "metadata", {}).get("etag", "")),
        )


def _masked(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}/…"


def _utc(value: datetime) -> datetime:
    return value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)


def check_event_id(value: str) -> str:
    if not EVENT_ID_PATTERN.fullmatch(value):
        raise NotFound(f"No event with id {value!r}.")
    return value


def new_event_id(name: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:40] or "event"
    return f"{slug}-{secrets.token_hex(3)}"


class EventStore:
    """Events in Table Storage, with the per-worker cache of code lookups."""

    def __init__(
        self, tables: Tables, hasher: SecretHasher | None, cache_seconds: float = 30.0, clock: Any = time.monotonic
    ) -> None:
        self._tables = tables
        if hasher is not None and not isinstance(hasher, SecretHasher):  # EventStore(tables, 0) was the old call
            raise TypeError("EventStore(tables, hasher, cache_seconds): the hasher is a SecretHasher or None")
        self._hasher = hasher  # None: the CLI without CODE_HASH_KEY, which can do all but touch a code
        self._cache_seconds = cache_seconds
        self._clock = clock
        self._by_code = Lookups(clock)  # event (or None) by code hash

    @property
    def hasher(self) -> SecretHasher | None:
        return self._hasher

    def hash_code(self, code: str) -> str:
        """The stored form of an event code: its keyed hash (``proxy.config.hashing``)."""
        return self.hash_secret(EVENT_CODE, code)

    def hash_secret(self, purpose: str, secret: str) -> str:
        """The stored form of a secret (a code, a personal key): its keyed hash for ``purpose``."""
        if self._hasher is None:
            raise SettingsError(
                "CODE_HASH_KEY is not set: codes and personal keys are stored as hashes keyed with the app's "
                "CODE_HASH_KEY, so creating an event, rotating a code or looking one up needs it. Set it to the "
                "app's value (in Azure: az functionapp config appsettings list -g RESOURCE_GROUP -n APP "
                "--query \"[?name=='CODE_HASH_KEY'].value | [0]\" -o tsv)."
            )
        return self._hasher.hash(purpose, secret)

    async def by_code(self, code: str, code_hash: str | None = None) -> Event | None:
        """The event whose code this is (``code_hash``: its ``hash_code``, if already made), or None.

        Cached; two point reads (three for an unknown code: its old hash is tried too, then the keyed one
        again in case a concurrent request has just upgraded it; and a few writes once per event created before
        keyed hashes, to upgrade it).
        """
        code_hash = code_hash or self.hash_code(code)

        async def load() -> Event | None:
            event = await self._lookup(code_hash)
            if event is None:
                event = await self._upgrade(legacy_sha256(EVENT_CODE, code), code_hash)
            return event

        return await self._by_code.get(code_hash, load, self._ttl)

    def _ttl(self, event: Event | None) -> float:
        return self._cache_seconds if event is not None else min(NEGATIVE_CACHE_SECONDS, self._cache_seconds)

    async def _lookup(self, code_hash: str) -> Event | None:
        try:
            index = await guarded(self._tables.events.get_entity(_CODE_PK, code_hash))
            event = await self.get(index["event_id"])
        except (ResourceNotFoundError, NotFound):
            return None
        # A rotated-out index row must not open the event: compare the hashes.
        return event if hmac.compare_digest(event.code_hash, code_hash) else None

    async def _upgrade(self, legacy_hash: str, code_hash: str) -> Event | None:
        """The event stored with this code's old, unkeyed hash, re-hashed with the key; None if there is none."""
        event = await self._lookup(legacy_hash)
        if event is None:
            # No old row, or another request upgraded it since this one missed the keyed row: look again.
            return await self._lookup(code_hash)
        try:
            await self._claim_code(code_hash, event.id)
        except InvalidRequest:  # claimed already: by a concurrent upgrade of this event, or by another event
            try:
                index = await guarded(self._tables.events.get_entity(_CODE_PK, code_hash))
            except ResourceNotFoundError:
                return None
            if index["event_id"] != event.id:
                return None
        rehashed = await self.modify(
            event.id, lambda e: replace(e, code_hash=code_hash) if e.code_hash == legacy_hash else e
        )
        if rehashed.code_hash != code_hash:
            return None  # rotated meanwhile: the code is no longer the event's
        await self._release_code(legacy_hash, event.id)
        return rehashed

    async def get(self, event_id: str) -> Event:
        check_event_id(event_id)
        try:
            entity = await guarded(self._tables.events.get_entity(_EVENT_PK, event_id))
        except ResourceNotFoundError:
            raise NotFound(f"No event with id {event_id!r}.") from None
        return Event.from_entity(entity)

    async def list_all(self) -> list[Event]:
        # The partition also holds the events' audit entries (proxy.policy.audit), whose row keys sort after every id.
        entities = self._tables.events.query_entities(
            "PartitionKey eq @pk and RowKey lt @audit", parameters={"pk": _EVENT_PK, "audit": AUDIT_PREFIX}
        )
        try:
            events = [Event.from_entity(entity) for entity in await gathered(entities)]
        except ResourceNotFoundError:
            return []
        return sorted(events, key=lambda e: (e.starts_at, e.id))

    async def create(self, event: Event, audit: Audit | None = None) -> Event:
        """Store a new event (its code must be free); the event with its ETag. With ``audit``, the entry it
        makes of (None, the event) is written in the same transaction (``proxy.policy.audit``)."""
        await self._claim_code(event.code_hash, event.id)
        if audit is None:
            stored = await self._tables.insert(self._tables.events, event.to_entity())
        else:
            operations = [("create", event.to_entity()), ("create", audit(None, event))]
            stored = (await self._tables.submit(self._tables.events, operations))[0]
        return replace(event, etag=str(stored["etag"]))

    async def save(self, event: Event, entry: dict[str, Any] | None = None) -> Event:
        """Write an event read from storage, if nobody wrote it since (its ETag); the event with its new ETag.

        Raises ``ResourceModifiedError`` when another write came first (``modify`` retries), and
        ``NotFound`` when the event was deleted meanwhile: a write never brings a deleted event back.
        """
        if not event.etag:
            raise ValueError("an event is saved under the ETag it was read with: get it from the store first")
        try:
            if entry is None:
                stored = await guarded(
                    self._tables.events.update_entity(
                        event.to_entity(), mode=UpdateMode.REPLACE, etag=event.etag,
                        match_condition=MatchConditions.IfNotModified,
                    )
                )  # fmt: skip
            else:  # the change and its audit entry together, or neither
                update = {
                    "mode": UpdateMode.REPLACE,
                    "etag": event.etag,
                    "match_condition": MatchConditions.IfNotModified,
                }
                operations = [("update", event.to_entity(), update), ("create", entry)]
                stored = (await self._tables.submit(self._tables.events, operations))[0]
        except ResourceNotFoundError:
            raise NotFound(f"No event with id {event.id!r}: it was deleted meanwhile.") from None
        self._by_code.drop(event.code_hash)
        return replace(event, etag=str(stored["etag"]))

    async def modify(self, event_id: str, change: Callable[[Event], Event], audit: Audit | None = None) -> Event:
        """Read the event, apply ``change`` and write the result under the ETag read, again and again while
        other writes come first; the event as stored. ``change`` must be a pure function of the event it is
        given: it may run several times. A change that changes nothing writes nothing. With ``audit``, the
        entry it makes of (event read, event changed) is written in the same transaction as the change."""
        for attempt in range(MODIFY_ATTEMPTS):
            event = await self.get(event_id)
            changed = change(event)
            if changed == event:
                return event
            try:
                entry = None if audit is None else audit(event, changed)
                return await self.save(replace(changed, etag=event.etag), entry)
            except ResourceModifiedError:
                await asyncio.sleep(random.uniform(0, 0.01 * (attempt + 1)))  # let the other writer finish
        raise EditConflict(
            f"The event {event_id!r} was changed by others at the same moment {MODIFY_ATTEMPTS} times in a row, "
            "so this change was not made. Try again."
        )

    async def rotate(
        self, event_id: str, new_hash: str, audit: Audit | None = None, guard: Callable[[Event], None] | None = None
    ) -> Event:
        """Point the event at a new code (by its hash); the old one stops working.

        The new index row is claimed first and the old one released last, so the event opens with its
        current code at every moment. A rotation that another write overtook is applied to the event as it
        then is (``modify``), and releases the code it replaced, whichever that was.
        """
        await self._claim_code(new_hash, event_id)
        replaced: set[str] = set()

        def point(event: Event) -> Event:
            if guard is not None:
                guard(event)
            if event.code_hash != new_hash:
                replaced.add(event.code_hash)
            return replace(event, code_hash=new_hash)

        try:
            rotated = await self.modify(event_id, point, audit)
        except (NotFound, EditConflict):
            try:
                written = (await self.get(event_id)).code_hash == new_hash  # by an attempt whose answer was lost
            except NotFound:
                written = False
            if not written:
                await self._release_code(new_hash, event_id)  # the claim points at nothing: free the code again
            raise
        for old_hash in replaced:
            await self._release_code(old_hash, event_id)
            self._by_code.drop(old_hash)
        return rotated

    async def delete(
        self, event_id: str, audit: Audit | None = None, guard: Callable[[Event], None] | None = None
    ) -> Event:
        """Delete the event, then its code's index row; the event as it was. Conditional on its ETag, so the
        code released is the one the deleted event had, whatever rotation came between. ``guard`` may refuse
        the event as read; ``audit``'s entry of (event, None) is written in the same transaction."""
        for attempt in range(MODIFY_ATTEMPTS):
            event = await self.get(event_id)
            if guard is not None:
                guard(event)
            condition: dict[str, Any] = {"etag": event.etag, "match_condition": MatchConditions.IfNotModified}
            try:
                if audit is None:
                    await guarded(self._tables.events.delete_entity(_EVENT_PK, event.id, **condition))
                else:
                    operations = [("delete", {"PartitionKey": _EVENT_PK, "RowKey": event.id}, condition),
                                  ("create", audit(event, None))]  # fmt: skip
                    await self._tables.submit(self._tables.events, operations)
            except ResourceModifiedError:
                await asyncio.sleep(random.uniform(0, 0.01 * (attempt + 1)))
                continue
            except ResourceNotFoundError:
                raise NotFound(f"No event with id {event_id!r}.") from None
            await self._release_code(event.code_hash, event.id)
            self._by_code.drop(event.code_hash)
            return event
        raise EditConflict(f"The event {event_id!r} kept changing while it was being deleted; try again.")

    async def _claim_code(self, code_hash: str, event_id: str) -> None:
        """Take a code's index row for an event: 400 when another event has the code."""
        try:
            index = {"PartitionKey": _CODE_PK, "RowKey": code_hash, "event_id": event_id}
            await self._tables.insert(self._tables.events, index)
        except ResourceExistsError:
            raise InvalidRequest("This code is already used by another event; choose another.", param="code") from None

    async def _release_code(self, code_hash: str, event_id: str) -> None:
        """Delete a code's index row if it still points at ``event_id``, under the ETag read: released once
        (by a rotation that another overtook, both replacing it), the code may since be another event's, whose
        row a second release must not delete."""
        try:
            index = await guarded(self._tables.events.get_entity(_CODE_PK, code_hash))
        except ResourceNotFoundError:
            return
        if index.get("event_id") != event_id:
            return
        with contextlib.suppress(ResourceModifiedError):  # released and claimed again meanwhile: not ours
            await guarded(
                self._tables.events.delete_entity(
                    _CODE_PK, code_hash, etag=index.metadata["etag"], match_condition=MatchConditions.IfNotModified
                )
            )
