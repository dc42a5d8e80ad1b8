"""The organizer's operations on events, shared by the CLI and the HTTP API.

Each takes plain JSON-like values and returns the JSON shapes of DESIGN
(*Organizers*), so ``python -m proxy.manage ... --json`` and
``/api/manage/...`` answer alike. Bad input raises ``InvalidRequest`` naming
the field; an unknown event raises ``NotFound``.

- ``create_event``: the public event plus its ``code``, shown this once (only
  a hash is stored). Without a ``code`` one is generated (16 characters from a
  secure random source).
- ``update_event``: PATCH semantics, each given field validated as on create;
  ``null`` clears ``daily_requests``, ``daily_tokens`` and ``tpm`` (no cap).
  The code cannot be changed here: ``rotate_code`` does that.
- ``rotate_code``: a new code (given or generated); the old one stops working
  on every instance within ``EVENT_CACHE_SECONDS``.
- ``delete_event``: removes the event and its code, so the code stops working.
- ``list_attendees``, ``set_blocked``: the names seen (``proxy.attendees``)
  and blocking one; a block applies on every instance within
  ``EVENT_CACHE_SECONDS``.

A code the organizer chooses must not be easy to guess (``proxy.guessing``);
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
from typing import Any

from proxy.attendees import roster
from proxy.budget import has_budget, read_shards, totals
from proxy.errors import InvalidRequest, NotFound
from proxy.events import (
    DEFAULT_DAILY_REQUESTS,
    DEFAULT_MAX_TOKENS,
    DEFAULT_MODELS,
    Event,
    EventStore,
    check_code,
    check_event_id,
    check_models,
    check_positive,
    check_text,
    check_time_zone,
    generate_code,
    hash_code,
    new_event_id,
    parse_time,
)
from proxy.guessing import check_chosen_code
from proxy.storage import Tables
from proxy.usage import GROUPINGS, GroupBy, report

EVENT_FIELDS = frozenset(
    {
        "name",
        "code",
        "start",
        "end",
        "time_zone",
        "models",
        "max_tokens",
        "daily_requests",
        "daily_tokens",
        "tpm",
        "event_requests",
        "event_tokens",
        "max_attendees",
        "active",
        "description",
        "organizer",
    }
)
_CLEARABLE = frozenset({"daily_requests", "daily_tokens", "tpm", "event_requests", "event_tokens", "max_attendees"})
USER_PATTERN = re.compile(r"[A-Za-z0-9._@+-]{1,128}")  # as in the credential (proxy.credentials)
MAX_BLOCKED = 500


async def create_event(store: EventStore, fields: Mapping[str, Any]) -> dict[str, Any]:
    """Validate and store a new event; the result holds its code, shown only now."""
    _check_known(fields)
    code = generate_code() if fields.get("code") is None else _chosen_code(fields["code"])
    if "start" not in fields or "end" not in fields:
        missing = "start" if "start" not in fields else "end"
        raise InvalidRequest(
            f"'{missing}' is required: ISO 8601 with an offset, e.g. 2026-11-21T09:00:00+01:00", param=missing
        )
    name = check_text(fields.get("name"), "name", required=True, limit=200)
    event = Event(
        id=new_event_id(name),
        name=name,
        code_hash=hash_code(code),
        starts_at=parse_time(fields["start"], "start"),
        ends_at=parse_time(fields["end"], "end"),
        time_zone=check_time_zone(fields.get("time_zone", "UTC")),
        models=check_models(fields.get("models", list(DEFAULT_MODELS))),
        max_tokens=_positive(fields.get("max_tokens", DEFAULT_MAX_TOKENS), "max_tokens"),
        daily_requests=check_positive(
            fields.get("daily_requests", DEFAULT_DAILY_REQUESTS), "daily_requests", optional=True
        ),
        daily_tokens=check_positive(fields.get("daily_tokens"), "daily_tokens", optional=True),
        tpm=check_positive(fields.get("tpm"), "tpm", optional=True),
        event_requests=check_positive(fields.get("event_requests"), "event_requests", optional=True),
        event_tokens=check_positive(fields.get("event_tokens"), "event_tokens", optional=True),
        max_attendees=check_positive(fields.get("max_attendees"), "max_attendees", optional=True),
        active=_boolean(fields.get("active", True)),
        description=check_text(fields.get("description"), "description"),
        organizer=check_text(fields.get("organizer"), "organizer", limit=200),
    )
    _check_window(event.starts_at, event.ends_at)
    if event.ends_at <= datetime.now(UTC):
        raise InvalidRequest(
            f"'end' ({event.ends_at.isoformat()}) is already past: the event would never open. Give a later end.",
            param="end",
        )
    await store.create(event)
    return {**event.public(), "code": code}


async def update_event(store: EventStore, event_id: str, fields: Mapping[str, Any]) -> dict[str, Any]:
    """Change the given fields of an event (PATCH); returns the public event."""
    _check_known(fields)
    if "code" in fields:
        raise InvalidRequest(
            "'code' cannot be changed by an update: use rotate-code (POST /api/manage/events/ID/rotate-code "
            "or 'python -m proxy.manage events rotate-code ID').",
            param="code",
        )
    event = await store.get(event_id)
    changes: dict[str, Any] = {}
    for name, value in fields.items():
        if value is None and name not in _CLEARABLE | {"description", "organizer"}:
            raise InvalidRequest(f"'{name}' cannot be null", param=name)
        changes.update(_validated(name, value))
    updated = replace(event, **changes)
    _check_window(updated.starts_at, updated.ends_at)
    await store.save(updated)
    return updated.public()


async def rotate_code(store: EventStore, event_id: str, new_code: str | None = None) -> dict[str, Any]:
    """Give the event a new code (``{"id", "code"}``, shown only now); the old one stops working."""
    code = generate_code() if new_code is None else _chosen_code(new_code)
    event = await store.get(event_id)
    if hash_code(code) == event.code_hash:
        raise InvalidRequest("That is the event's current code; choose a different one.", param="code")
    await store.rotate(event, code)
    return {"id": event.id, "code": code}


async def delete_event(store: EventStore, event_id: str) -> dict[str, Any]:
    """Delete the event and its code; its usage is kept for reports."""
    event = await store.get(event_id)
    await store.delete(event)
    return {"id": event.id, "deleted": True}


async def get_event(store: EventStore, event_id: str) -> dict[str, Any]:
    return (await store.get(event_id)).public()


async def list_events(store: EventStore) -> dict[str, Any]:
    return {"object": "list", "data": [event.public() for event in await store.list_all()]}


def check_grouping(value: Any) -> GroupBy:
    for grouping in GROUPINGS:
        if value == grouping:
            return grouping
    raise InvalidRequest(f"'by' must be one of {', '.join(GROUPINGS)}, got {value!r}", param="by")


async def usage_report(store: EventStore, tables: Tables, event_id: str, by: Any = "user") -> dict[str, Any]:
    """The usage report; also for a deleted event whose usage was kept (see module docstring)."""
    grouping = check_grouping(by)
    check_event_id(event_id)
    try:
        event = await store.get(event_id)
    except NotFound:
        data = await report(tables, event_id, grouping)
        if not data["rows"]:
            raise
        return data
    data = await report(tables, event_id, grouping)
    if has_budget(event):
        # The event's totals against its budgets (requests admitted; tokens recorded plus in flight).
        data["budget"] = totals(event, list((await read_shards(tables, event_id)).values()))
    return data


async def list_attendees(store: EventStore, tables: Tables, event_id: str) -> dict[str, Any]:
    """Every name seen in the event (and every blocked one): first seen, requests and tokens, blocked."""
    event = await store.get(event_id)
    seen = await roster(tables, event_id)
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
                "blocked": user in event.blocked,
            }
        )
    return {"event_id": event.id, "object": "list", "max_attendees": event.max_attendees, "count": len(seen),
            "data": data}  # fmt: skip


async def set_blocked(store: EventStore, event_id: str, user: Any, blocked: Any) -> dict[str, Any]:
    """Block or unblock one attendee name (``{"event_id", "user", "blocked"}``); applies within EVENT_CACHE_SECONDS."""
    if not isinstance(user, str) or not USER_PATTERN.fullmatch(user):
        raise InvalidRequest("'user' must be an attendee name: 1 to 128 of A-Z a-z 0-9 . _ @ + -", param="user")
    if not isinstance(blocked, bool):
        raise InvalidRequest("'blocked' must be true or false", param="blocked")
    event = await store.get(event_id)
    names = set(event.blocked) | {user} if blocked else set(event.blocked) - {user}
    if len(names) > MAX_BLOCKED:
        raise InvalidRequest(f"At most {MAX_BLOCKED} names can be blocked per event.", param="user")
    if names != set(event.blocked):
        await store.save(replace(event, blocked=tuple(sorted(names))))
    return {"event_id": event.id, "user": user, "blocked": blocked}


def _chosen_code(value: Any) -> str:
    code = check_code(value)
    check_chosen_code(code, generate_code)
    return code


def _check_known(fields: Mapping[str, Any]) -> None:
    for name in fields:
        if name not in EVENT_FIELDS:
            raise InvalidRequest(
                f"Unknown field '{name}'. Known fields: {', '.join(sorted(EVENT_FIELDS))}.", param=str(name)
            )


def _validated(name: str, value: Any) -> dict[str, Any]:
    """One updated field as ``Event`` attributes."""
    if name == "name":
        return {"name": check_text(value, "name", required=True, limit=200)}
    if name in ("start", "end"):
        return {f"{name}s_at": parse_time(value, name)}
    if name == "time_zone":
        return {"time_zone": check_time_zone(value)}
    if name == "models":
        return {"models": check_models(value)}
    if name == "max_tokens":
        return {"max_tokens": _positive(value, name)}
    if name in _CLEARABLE:
        return {name: check_positive(value, name, optional=True)}
    if name == "active":
        return {"active": _boolean(value)}
    return {name: check_text(value, name, limit=1000 if name == "description" else 200)}


def _positive(value: Any, param: str) -> int:
    checked = check_positive(value, param)
    assert checked is not None
    return checked


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise InvalidRequest("'active' must be true or false", param="active")
    return value


def _check_window(start: datetime, end: datetime) -> None:
    if start >= end:
        raise InvalidRequest(f"'start' ({start.isoformat()}) must be before 'end' ({end.isoformat()})", param="start")
