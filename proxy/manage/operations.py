"""The organizer's operations on events, shared by the CLI and the HTTP API.

Each takes plain JSON-like values and returns the JSON shapes of DESIGN
(*Organizers*), so ``python -m proxy.manage ... --json`` and
``/api/manage/...`` answer alike. Bad input raises ``InvalidRequest`` naming
the field; an unknown event raises ``NotFound``.

Each also takes the ``Actor`` who asks (``proxy.policy.accounts``; the CLI is
``ORGANIZER_KEY``): an event it may not see raises ``NotFound`` exactly as an
unknown one, a change it may not make ``Forbidden``. The check runs on the
event as read for the change (inside ``EventStore.modify``'s function), so a
share or unshare that lands meanwhile is honoured. Every change writes its
audit entry (``proxy.policy.audit``) in the same transaction as the change; share and
unshare (``share_event``, ``unshare_event``) and reading the log
(``audit_log``) live here too.

- ``create_event``: the public event plus its ``code``, shown this once (only
  a hash is stored). Without a ``code`` one is generated (16 characters from a
  secure random source).
- ``update_event``: PATCH semantics, each given field validated as on create;
  ``null`` clears ``daily_requests``, ``daily_tokens`` and ``tpm`` (no cap).
  The code cannot be changed here: ``rotate_code`` does that.
- ``rotate_code``: a new code (given or generated); the old one stops working
  on every instance within ``EVENT_CACHE_SECONDS``.

Every change is a read-modify-write under the event's ETag, retried when
another write came first (``EventStore.modify``): concurrent blocks, PATCHes
and rotations from any number of processes all land; after repeated
collisions the answer is 409 ``edit_conflict``, and nothing was changed.
- ``delete_event``: removes the event and its code, so the code stops working.
- ``list_attendees``, ``set_blocked``: the names seen (``proxy.policy.attendees``)
  and blocking one; a block applies on every instance within
  ``EVENT_CACHE_SECONDS``.
- ``reset_key``: a name's personal key stops working (``proxy.policy.keys``: at once
  on the instance that resets, within ``EVENT_CACHE_SECONDS`` on the others),
  and the name can be registered again.

A code the organizer chooses must not be easy to guess (``proxy.policy.guessing``);
an event whose ``end`` is already past is refused on create (an update may
move it there: that closes the event).

Decision: deleting an event keeps its usage (its ``proxyusage`` rows: the
attendees' days and the request log), so ``usage_report`` still answers for a deleted
event's id; it is 404 only when the event does not exist *and* has no usage.
Switching an event off (``active: false``) is the reversible way to close it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from proxy.admission.budget import has_budget, read_shards, totals
from proxy.config.prices import PriceTable
from proxy.errors import Forbidden, InvalidRequest, NotFound
from proxy.ledger.reports import GROUPINGS, GroupBy, hourly_report, report
from proxy.manage.models import AttendeePatch, EventCreate, EventUpdate, PlanQuery, RotateCode, Share, validated
from proxy.manage.plan import BICEP_PARAMS, bicep_quotas, parse_tpm, plan
from proxy.policy import audit
from proxy.policy.accounts import ENTRA_NAME, AccountStore, Actor, check_name, event_role, require_writer
from proxy.policy.attendees import roster
from proxy.policy.events import Audit, Event, EventStore, check_event_id, generate_code, new_event_id
from proxy.policy.guessing import check_chosen_code
from proxy.policy.keys import PersonalKeys
from proxy.storage.tables import Tables

EVENT_FIELDS = frozenset(EventCreate.model_fields)
USER_PATTERN = re.compile(r"[A-Za-z0-9._@+-]{1,128}")  # as in the credential (proxy.policy.credentials)
MAX_BLOCKED = 500
_EVENT_PARTITION = "event"  # audit entries of events' changes live beside the events (proxy.policy.audit)


async def create_event(store: EventStore, actor: Actor, fields: Mapping[str, Any]) -> dict[str, Any]:
    """Validate and store a new event, owned by ``actor``; the result holds its code, shown only now."""
    require_writer(actor, "create events")
    new = validated(EventCreate, fields)
    code = generate_code() if new.code is None else _chosen(new.code)
    _check_window(new.start, new.end)
    if new.end <= datetime.now(UTC):
        raise InvalidRequest(
            f"'end' ({new.end.isoformat()}) is already past: the event would never open. Give a later end.",
            param="end",
        )
    values = new.model_dump(exclude={"code", "start", "end", "models"})
    values["alert_webhook"] = values["alert_webhook"] or ""
    event = Event(
        id=new_event_id(new.name),
        code_hash=store.hash_code(code),
        starts_at=new.start,
        ends_at=new.end,
        models=tuple(new.models),
        owner=actor.name,
        **values,
    )
    await store.create(event, _audited(actor, "create"))
    return {**event.public(), "code": code}


async def update_event(store: EventStore, actor: Actor, event_id: str, fields: Mapping[str, Any]) -> dict[str, Any]:
    """Change the given fields of an event (PATCH); returns the public event."""
    if "code" in fields:
        raise InvalidRequest(
            "'code' cannot be changed by an update: use rotate-code (POST /api/manage/events/ID/rotate-code "
            "or 'python -m proxy.manage events rotate-code ID').",
            param="code",
        )
    changes = validated(EventUpdate, fields).changes()
    check_event_id(event_id)
    renamed = {"start": "starts_at", "end": "ends_at"}
    attributes = {renamed.get(name, name): value for name, value in changes.items()}
    if "models" in attributes:
        attributes["models"] = tuple(attributes["models"])
    for text in ("description", "organizer", "alert_webhook"):
        if text in attributes and attributes[text] is None:
            attributes[text] = ""

    def change(event: Event) -> Event:
        _writer(actor, event, "change events")
        updated = replace(event, **attributes)
        _check_window(updated.starts_at, updated.ends_at)
        return updated

    return (await store.modify(event_id, change, _audited(actor, "update"))).public()


async def rotate_code(store: EventStore, actor: Actor, event_id: str, new_code: str | None = None) -> dict[str, Any]:
    """Give the event a new code (``{"id", "code"}``, shown only now); the old one stops working."""
    event = await store.get(event_id)
    _writer(actor, event, "rotate codes")
    asked = validated(RotateCode, {"code": new_code}).code
    code = generate_code() if asked is None else _chosen(asked)
    code_hash = store.hash_code(code)
    if code_hash == event.code_hash:
        raise InvalidRequest("That is the event's current code; choose a different one.", param="code")
    await store.rotate(event.id, code_hash, _audited(actor, "rotate-code"), lambda e: _writer(actor, e, "rotate codes"))
    return {"id": event.id, "code": code}


async def delete_event(store: EventStore, actor: Actor, event_id: str) -> dict[str, Any]:
    """Delete the event and its code; its usage is kept for reports."""
    guard = lambda event: _writer(actor, event, "delete events")  # noqa: E731
    event = await store.delete(check_event_id(event_id), _audited(actor, "delete"), guard)
    return {"id": event.id, "deleted": True}


async def get_event(store: EventStore, actor: Actor, event_id: str) -> dict[str, Any]:
    return (await visible_event(store, actor, event_id)).public()


async def list_events(store: EventStore, actor: Actor) -> dict[str, Any]:
    """The events ``actor`` may see (every one for an admin)."""
    events = [event for event in await store.list_all() if _role(actor, event) is not None]
    caller = {"name": actor.name, "role": actor.role}  # so that a page shows what the caller may change
    return {"object": "list", "data": [event.public() for event in events], "account": caller}


async def visible_event(store: EventStore, actor: Actor, event_id: str) -> Event:
    """The event, if ``actor`` may see it; else 404, word for word as for an event that does not exist."""
    event = await store.get(event_id)
    if _role(actor, event) is None:
        raise NotFound(f"No event with id {event_id!r}.")
    return event


def check_grouping(value: Any) -> GroupBy:
    for grouping in GROUPINGS:
        if value == grouping:
            return grouping
    raise InvalidRequest(f"'by' must be one of {', '.join(GROUPINGS)}, got {value!r}", param="by")


async def usage_report(
    store: EventStore, tables: Tables, actor: Actor, event_id: str, by: Any = "user"
) -> dict[str, Any]:
    """The usage report; also for a deleted event whose usage was kept (see module docstring), to admins only
    (whom a deleted event was shared with is gone with it)."""
    grouping = check_grouping(by)
    check_event_id(event_id)
    try:
        event = await visible_event(store, actor, event_id)
    except NotFound:
        if not actor.admin:
            raise
        if grouping == "hour":
            data = await hourly_report(tables, event_id, "UTC", datetime.now(UTC))
        else:
            data = await report(tables, event_id, grouping)
        if not data["rows"]:
            raise
        return data
    if grouping == "hour":
        data = await hourly_report(tables, event_id, event.time_zone, datetime.now(UTC))
    else:
        data = await report(tables, event_id, grouping)
    if has_budget(event):
        # The event's totals against its budgets (requests admitted; tokens recorded plus in flight).
        data["budget"] = totals(event, list((await read_shards(tables, event_id)).values()))
    return data


async def plan_event(
    store: EventStore,
    tables: Tables,
    prices: PriceTable,
    actor: Actor,
    event_id: str,
    attendees: Any = None,
    tpm: list[str] | None = None,
    bicep_params: Path = BICEP_PARAMS,
) -> dict[str, Any]:
    """The pre-event plan (``proxy.manage.plan``): attendees given, else ``max_attendees``, else the names seen."""
    event = await visible_event(store, actor, event_id)
    try:
        quotas = {**bicep_quotas(bicep_params), **parse_tpm(tpm or [])}
    except ValueError as exc:
        raise InvalidRequest(str(exc), param="tpm") from None
    if attendees is not None:
        count = validated(PlanQuery, {"attendees": attendees}).attendees
        source = "given"
    elif event.max_attendees is not None:
        count, source = event.max_attendees, "max_attendees"
    else:
        count, source = len(await roster(tables, event_id)), "names seen so far"
        if count == 0:
            raise InvalidRequest(
                f"'{event.name}' has no max_attendees and no attendee yet: say how many you expect "
                "(--attendees N, or ?attendees=N).",
                param="attendees",
            )
    usage = {row["key"]: row for row in (await report(tables, event_id, "model"))["rows"]}
    return plan(event, count, source, quotas, prices, usage)


async def list_attendees(
    store: EventStore, tables: Tables, actor: Actor, event_id: str, keys: PersonalKeys
) -> dict[str, Any]:
    """Every name seen in the event (and every blocked one): first seen, requests and tokens, blocked, whether
    it has a personal key."""
    event = await visible_event(store, actor, event_id)
    seen = await roster(tables, event_id)
    keyed = await keys.keyed_names(event_id)
    usage = {row["key"]: row for row in (await report(tables, event_id, "user"))["rows"]}
    data = []
    for user in sorted(set(seen) | set(usage) | set(event.blocked)):
        figures = usage.get(user, {})
        first = seen.get(user)
        data.append(
            {
                "user": user,
                "first_seen": None if first is None else first.astimezone(UTC).isoformat(),
                "requests": figures.get("requests", 0),
                "total_tokens": figures.get("total_tokens", 0),
                "cost": figures.get("cost", 0.0),
                "blocked": user in event.blocked,
                "personal_key": user in keyed,
            }
        )
    return {"event_id": event.id, "object": "list", "max_attendees": event.max_attendees, "count": len(seen),
            "data": data}  # fmt: skip


async def set_blocked(store: EventStore, actor: Actor, event_id: str, user: Any, blocked: Any) -> dict[str, Any]:
    """Block or unblock one attendee name (``{"event_id", "user", "blocked"}``); applies within EVENT_CACHE_SECONDS."""
    _check_user(user)
    blocked = validated(AttendeePatch, {"blocked": blocked}).blocked

    def change(event: Event) -> Event:
        _writer(actor, event, "block attendees")
        names = set(event.blocked) | {user} if blocked else set(event.blocked) - {user}
        if len(names) > MAX_BLOCKED:
            raise InvalidRequest(f"At most {MAX_BLOCKED} names can be blocked per event.", param="user")
        return replace(event, blocked=tuple(sorted(names)))

    action = "block" if blocked else "unblock"
    flip = {"blocked": {"old": not blocked, "new": blocked}}
    event = await store.modify(check_event_id(event_id), change, _audited(actor, action, user, flip))
    return {"event_id": event.id, "user": user, "blocked": blocked}


async def reset_key(
    store: EventStore, tables: Tables, actor: Actor, keys: PersonalKeys, event_id: str, user: Any
) -> dict[str, Any]:
    """Remove a name's personal key (``{"event_id", "user", "reset"}``: whether it had one). Its audit entry
    is written after the reset, before the answer (``proxy.policy.audit``: the key's row is in another table)."""
    _check_user(user)
    event = await visible_event(store, actor, event_id)
    _writer(actor, event, "reset attendees' keys")
    reset = await keys.reset(event.id, user)
    changes = {"personal_key": {"old": True, "new": False}} if reset else {}
    entry = audit.entry(_EVENT_PARTITION, actor, "reset-key", event_id=event.id, target=user, changes=changes)
    await tables.insert(tables.events, entry)
    return {"event_id": event.id, "user": user, "reset": reset}


async def share_event(
    store: EventStore, accounts: AccountStore, actor: Actor, event_id: str, fields: Mapping[str, Any]
) -> dict[str, Any]:
    """Share an event with an account (or ``entra:<object id>``) as organizer or viewer; at once everywhere."""
    body = validated(Share, fields)
    name = body.organizer
    if not ENTRA_NAME.fullmatch(name):
        check_name(name, "organizer")
    event = await visible_event(store, actor, event_id)
    _writer(actor, event, "share events")
    if not ENTRA_NAME.fullmatch(name) and not await accounts.exists(name):
        raise InvalidRequest(
            f"No organizer account named '{name}' (see GET /api/manage/organizers).", param="organizer"
        )

    def change(event: Event) -> Event:
        _writer(actor, event, "share events")
        shares = dict(event.shared) | {name: body.role}
        return replace(event, shared=tuple(sorted(shares.items())))

    shared = await store.modify(event.id, change, _audited(actor, "share", name))
    return {"event_id": shared.id, "owner": shared.owner or None, "shared": dict(shared.shared)}


async def unshare_event(store: EventStore, actor: Actor, event_id: str, name: str) -> dict[str, Any]:
    """Stop sharing an event with ``name``; at once everywhere."""

    def change(event: Event) -> Event:
        _writer(actor, event, "unshare events")
        return replace(event, shared=tuple((who, role) for who, role in event.shared if who != name))

    shared = await store.modify(check_event_id(event_id), change, _audited(actor, "unshare", name))
    return {"event_id": shared.id, "owner": shared.owner or None, "shared": dict(shared.shared)}


async def audit_log(store: EventStore, tables: Tables, actor: Actor, event_id: str | None = None) -> dict[str, Any]:
    """The audit entries, newest first: one event's (if ``actor`` may see it; admins also a deleted one's), or
    every entry ``actor`` may see (an admin: all, accounts included; others: those of the events they see)."""
    if event_id is not None:
        try:
            await visible_event(store, actor, check_event_id(event_id))
        except NotFound:
            if not actor.admin:
                raise
        return {"object": "list", "event_id": event_id, "data": await audit.read(tables, event_id)}
    entries = await audit.read(tables)
    if not actor.admin:
        seen = {event.id for event in await store.list_all() if _role(actor, event) is not None}
        entries = [entry for entry in entries if entry["event_id"] in seen]
    return {"object": "list", "event_id": None, "data": entries}


def _role(actor: Actor, event: Event) -> str | None:
    return event_role(actor, event.owner, dict(event.shared))


def _writer(actor: Actor, event: Event, what: str) -> None:
    """404 when ``actor`` may not see the event, 403 when it may only read it."""
    role = _role(actor, event)
    if role is None:
        raise NotFound(f"No event with id {event.id!r}.")
    if role == "viewer":
        raise Forbidden(f"'{actor.name}' may read event {event.id} but not {what}: it is shared with them as viewer.")


def _audited(actor: Actor, action: str, target: str = "", changes: dict[str, Any] | None = None) -> Audit:
    """How a change's audit entry is made, from the event before and after (``proxy.policy.audit``)."""

    def make(before: Event | None, after: Event | None) -> dict[str, Any]:
        event = after or before
        assert event is not None
        old = None if before is None else before.public()
        new = None if after is None else after.public()
        shown = changes if changes is not None else audit.diff(old, new)
        return audit.entry(_EVENT_PARTITION, actor, action, event_id=event.id, target=target, changes=shown)

    return make


def _check_user(user: Any) -> None:
    if not isinstance(user, str) or not USER_PATTERN.fullmatch(user):
        raise InvalidRequest("'user' must be an attendee name: 1 to 128 of A-Z a-z 0-9 . _ @ + -", param="user")


def _chosen(code: str) -> str:
    check_chosen_code(code, generate_code)
    return code


def _check_window(start: datetime, end: datetime) -> None:
    if start >= end:
        raise InvalidRequest(f"'start' ({start.isoformat()}) must be before 'end' ({end.isoformat()})", param="start")
