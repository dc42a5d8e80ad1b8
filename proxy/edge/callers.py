"""Who is calling: an attendee's credential resolved to an event and a name.

The credential (``proxy.policy.credentials``) is ``CODE/name`` or a personal key
(``proxy.policy.keys``). A code is looked up by its keyed hash in the events' cache
(``proxy.policy.events``); a key by its keyed hash in the keys' cache. Both go
through the guessing throttle (``proxy.policy.guessing``): an unknown code or key is
a failed lookup for the client's address, and a throttled address gets the
same 429 for any code or key it has not used itself.

``CODE/name`` is then refused with 401 ``personal_key_required`` when the
event requires keys (``attendee_keys``) or when the name has a key (a claimed
name); a key stands for its event and name on every route, so usage, caps,
sessions, stored responses and blocks are theirs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from starlette.requests import Request

from proxy.edge.access import Access
from proxy.errors import EventDisabled, EventEnded, EventNotStarted, InvalidEventCode, PersonalKeyRequired
from proxy.observability.telemetry import Telemetry
from proxy.policy.credentials import PersonalKey, read_credential
from proxy.policy.events import Event, EventStore
from proxy.policy.guessing import FailedLookups, client_address
from proxy.policy.keys import PersonalKeys


@dataclass(slots=True)
class Caller:
    event: Event
    user: str


def check_open(event: Event, now: datetime) -> None:
    """Refuse an event that is switched off or outside its window (403, the time in its time zone)."""
    if not event.active:
        raise EventDisabled(f"The event '{event.name}' has been switched off by its organizer.")
    if now < event.starts_at:
        raise EventNotStarted(f"The event '{event.name}' starts at {event.local(event.starts_at)}.")
    if now >= event.ends_at:
        raise EventEnded(f"The event '{event.name}' ended at {event.local(event.ends_at)}.")


class Callers:
    """Resolves credentials on the worker's event store, keys and throttle."""

    def __init__(
        self,
        events: EventStore,
        keys: PersonalKeys,
        failed_lookups: FailedLookups,
        telemetry: Telemetry,
        clock: Callable[[], datetime],
    ) -> None:
        self.events, self.keys, self.failed_lookups = events, keys, failed_lookups
        self.telemetry, self._clock = telemetry, clock

    async def of(self, request: Request) -> Caller:
        """The caller of an attendee route; the access line gets its event and name (never the credential)."""
        credential = read_credential(request.headers)
        access: Access = request.state.access
        address = client_address(request.headers.get("x-forwarded-for"), request.client and request.client.host)
        if isinstance(credential, PersonalKey):
            return await self._key_holder(access, address, credential)
        access.attendee = credential.user
        event = await self.event_by_code(address, credential.code)
        access.event_id = event.id
        if event.attendee_keys:
            raise PersonalKeyRequired(
                f"'{event.name}' needs a personal key instead of CODE/name: register your name at /api/portal on "
                "this proxy (or POST /api/v1/keys), then use the key as your API key."
            )
        if await self.keys.claimed(event.id, credential.user):
            raise PersonalKeyRequired(
                f"The name '{credential.user}' has a personal key in '{event.name}': use that key (ek-...) as the "
                "API key instead of CODE/name. Lost it? The organizer can reset it."
            )
        return Caller(event, credential.user)

    async def event_by_code(self, address: str, code: str) -> Event:
        """The event of a code, through the guessing throttle; 401 when unknown."""
        code_hash = self.events.hash_code(code)
        # A throttled address gets the same 429 for any code it has not used itself, without a lookup (no oracle).
        self.failed_lookups.check(address, code_hash)
        with self.telemetry.span("event lookup"):
            event = await self.events.by_code(code, code_hash)
        if event is None:
            self.failed_lookups.failed(address)
            raise InvalidEventCode("This event code is not known. Check the code the organizer shared.")
        self.failed_lookups.succeeded(address, code_hash)
        return event

    async def open_event(self, address: str, code: str) -> Event:
        """The event of a code (``event_by_code``), refused when it is not open now (403)."""
        event = await self.event_by_code(address, code)
        check_open(event, self._clock())
        return event

    async def _key_holder(self, access: Access, address: str, credential: PersonalKey) -> Caller:
        """The event and name of a personal key; an unknown key counts as a failed lookup."""
        key_hash = self.keys.hash(credential.key)
        self.failed_lookups.check(address, key_hash)
        with self.telemetry.span("event lookup"):
            found = await self.keys.lookup(key_hash)
        if found is None:
            self.failed_lookups.failed(address)
            raise InvalidEventCode(
                "This personal key is not known: check it, or if the organizer reset it, register again at /api/portal."
            )
        self.failed_lookups.succeeded(address, key_hash)
        event, user = found
        access.attendee, access.event_id = user, event.id
        return Caller(event, user)
