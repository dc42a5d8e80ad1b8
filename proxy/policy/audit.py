"""The audit log: one entry per organizer change, who made it, and what it changed.

An entry holds the time, the account (an account's name, ``ORGANIZER_KEY``, or
``entra:<object id>`` for an organizer signed in with Entra ID), how it came
(``api`` or ``cli``), the action, the event, the target (an attendee name or an
account's name) and the fields changed with their old and new values, as the
organizer API shows them (``Event.public``): never a code, a key, nor a hash of
one. A rotation says only that the code changed.

Where entries live, and why a change answered with success always has its entry:
an entry is a row of ``proxyevents`` in the partition of the row it describes
(``event`` for an event's changes, ``organizer`` for accounts), with a
``RowKey`` of ``~audit|<inverted time>|<random>`` (after every event id, so
``EventStore.list_all`` never meets one; newest first). It is written in the
same entity group transaction as the change itself (``Tables.submit``): the
change and its entry are stored together or not at all, and a change retried
after another write overtook it (``EventStore.modify``) writes the entry of
the attempt that landed, with the values it really replaced. The one change
outside these partitions, resetting an attendee's personal key (its row is in
``proxyusage``), writes its entry right after the reset and before answering:
if that write fails the answer is 503 (the key was reset, and trying again
records ``"reset": false``), so no success goes unrecorded.

Nothing in the product edits or deletes an entry: no route, no CLI command.
Reading (``read``) scans the ``~audit|`` rows of ``proxyevents`` (a filter of
constants; the event id is compared in Python), newest first, at most ``limit``.
"""

from __future__ import annotations

import secrets
from datetime import UTC, datetime
from typing import Any, Protocol

import orjson
from azure.core.exceptions import ResourceNotFoundError

from proxy.policy.events import AUDIT_PREFIX
from proxy.storage.tables import Tables, gathered


class Author(Protocol):
    """Who made a change (``proxy.policy.accounts.Actor``)."""

    @property
    def name(self) -> str: ...
    @property
    def role(self) -> str: ...
    @property
    def via(self) -> str: ...


PREFIX = AUDIT_PREFIX
_AFTER = "~audit}"  # the first row key after every entry ("}" follows "|")
_NEVER = 10**14  # milliseconds: inverted times sort newest first until the year 5138
DEFAULT_LIMIT = 1000


def entry(
    partition: str,
    actor: Author,
    action: str,
    *,
    event_id: str = "",
    target: str = "",
    changes: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The entity of one audit entry, to be written with the change it describes."""
    now = datetime.now(UTC)
    inverted = _NEVER - int(now.timestamp() * 1000)
    return {
        "PartitionKey": partition,
        "RowKey": f"{PREFIX}{inverted:014d}|{secrets.token_hex(6)}",
        "time": now,
        "account": actor.name,
        "role": actor.role,
        "via": actor.via,
        "action": action,
        "event_id": event_id,
        "target": target,
        "changes": orjson.dumps(changes or {}).decode(),
    }


def diff(before: dict[str, Any] | None, after: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """The fields whose shown value differs: ``{field: {"old", "new"}}`` (None for a side that does not exist)."""
    old, new = before or {}, after or {}
    skip = ("id", "created_at")
    return {
        name: {"old": old.get(name), "new": new.get(name)}
        for name in dict.fromkeys([*old, *new])
        if name not in skip and old.get(name) != new.get(name)
    }


def shown(entity: dict[str, Any]) -> dict[str, Any]:
    """An entry as the CLI and the API show it."""
    moment = entity["time"]
    return {
        "time": moment.astimezone(UTC).isoformat() if isinstance(moment, datetime) else str(moment),
        "account": entity.get("account", ""),
        "role": entity.get("role", ""),
        "via": entity.get("via", ""),
        "action": entity.get("action", ""),
        "event_id": entity.get("event_id") or None,
        "target": entity.get("target") or None,
        "changes": orjson.loads(entity.get("changes") or "{}"),
    }


async def read(tables: Tables, event_id: str | None = None, limit: int = DEFAULT_LIMIT) -> list[dict[str, Any]]:
    """The entries, newest first (of one event when ``event_id`` is given), at most ``limit``."""
    query = tables.events.query_entities(
        "RowKey ge @first and RowKey lt @after", parameters={"first": PREFIX, "after": _AFTER}
    )
    try:
        rows = await gathered(query)
    except ResourceNotFoundError:  # no table yet
        return []
    if event_id is not None:
        rows = [row for row in rows if row.get("event_id") == event_id]
    rows.sort(key=lambda row: str(row["RowKey"]))
    return [shown(dict(row)) for row in rows[:limit]]
