"""Organizer accounts: named keys with a role, and who may see and change which event.

Roles: an *admin* does everything, accounts included; an *organizer* creates
events and sees and changes those they own (they created it) or that are
shared with them; a *viewer* reads the events shared with them and their usage
and changes nothing (403 ``forbidden``). An event an account may not see
answers 404 exactly as an event that does not exist (``event_access``), in
lists, reads, usage, attendees, plans and writes: guessing ids tells nothing.
A share gives ``organizer`` or ``viewer``; an account gets the lesser of its
share and its own role (a viewer account shared as organizer still only reads).

Who calls (``Actor``): an account (its name), ``ORGANIZER_KEY`` (an admin; the
CLI acts as it, ``via="cli"``), or an organizer signed in with Entra ID
(``entra:<object id>``, its role from the settings that list it,
``proxy.config.principal``). Events remember their owner and shares on the event row
itself (``proxy.policy.events``), so they are read with the event: a share or an
unshare takes effect at once, on every instance, at no extra read.

Storage, in ``proxyevents``, partition ``organizer``:

- ``RowKey="account|<name>"``: the account (role, the keyed hash of its key, when
  and by whom it was made);
- ``RowKey="key|<keyed hash>"``: the index a key is looked up by (one point read,
  never a filter built from input), naming the account and its role.

Adding, removing and re-keying an account write its rows and its audit entry
(``proxy.policy.audit``) in one entity group transaction: a key opens its account
exactly while its index row exists. Keys are ``ok-`` and 32 URL-safe characters
(192 random bits), shown once, stored only as a keyed hash
(``proxy.config.hashing``, purpose ``organizer-account-key``), never logged.

Cost: a key's lookup is cached per worker for ``EVENT_CACHE_SECONDS`` (like an
event's code), so an organizer request made with an account key costs no
storage read in the steady state and one point read per key and cache
lifetime; ``ORGANIZER_KEY`` and Entra sign-in cost none. A removed or re-keyed
account's old key is refused at once on the instance that removed it, and on
every other instance within ``EVENT_CACHE_SECONDS``; a request already past
its check when the account is removed completes, and its audit entry names
the account. A removed name added again gets back the events it owned and
those shared with it: remove its shares first if that is not wanted.
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from azure.core import MatchConditions
from azure.core.exceptions import ResourceExistsError, ResourceModifiedError, ResourceNotFoundError
from azure.data.tables import UpdateMode

from proxy.config.hashing import ORGANIZER_ACCOUNT_KEY, SecretHasher
from proxy.config.settings import SettingsError
from proxy.errors import EditConflict, Forbidden, InvalidRequest, NameTaken, NotFound
from proxy.policy import audit
from proxy.storage.tables import Tables, gathered, guarded

Role = Literal["admin", "organizer", "viewer"]
ROLES: tuple[Role, ...] = ("admin", "organizer", "viewer")
# No "_" and no ":": an account can never be called ORGANIZER_KEY or entra:<object id>.
ACCOUNT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9.@-]{0,63}")
KEY_PATTERN = re.compile(r"ok-[A-Za-z0-9_-]{32}")
# An organizer signed in with Entra ID, by object id: how events are owned by and shared with them.
ENTRA_NAME = re.compile(r"entra:[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
ORGANIZER_KEY = "ORGANIZER_KEY"
PARTITION = "organizer"
_ACCOUNT = "account|"
_KEY = "key|"
_NEGATIVE_SECONDS = 5.0
_ATTEMPTS = 10


@dataclass(frozen=True, slots=True)
class Actor:
    """Who makes an organizer request, and with which role."""

    name: str
    role: Role
    via: str = "api"

    @property
    def admin(self) -> bool:
        return self.role == "admin"


CLI = Actor(ORGANIZER_KEY, "admin", "cli")


def event_role(actor: Actor, owner: str, shared: dict[str, str]) -> Role | None:
    """What ``actor`` may do with an event: None (it does not exist for them), ``viewer``, ``organizer``, ``admin``."""
    if actor.admin:
        return "admin"
    granted = "organizer" if owner and owner == actor.name else shared.get(actor.name)
    if granted is None:
        return None
    return "viewer" if "viewer" in (granted, actor.role) else "organizer"


def require_writer(actor: Actor, what: str) -> None:
    """403 for a viewer (the event, if any, was found visible first: invisible ones are 404)."""
    if actor.role == "viewer":
        raise Forbidden(f"The account '{actor.name}' is a viewer: it reads events and their usage, but cannot {what}.")


def require_admin(actor: Actor, what: str) -> None:
    if not actor.admin:
        raise Forbidden(f"Only an admin can {what}; the account '{actor.name}' is {_article(actor.role)}.")


def check_name(value: Any, param: str = "name") -> str:
    if not isinstance(value, str) or not ACCOUNT_NAME.fullmatch(value):
        raise InvalidRequest(
            f"'{param}' must be an account name: a letter or digit, then up to 63 of A-Z a-z 0-9 . @ -",
            param=param,
        )
    return value


def check_role(value: Any, allowed: tuple[str, ...] = ROLES, param: str = "role") -> Role:
    for role in ROLES:
        if value == role and role in allowed:
            return role
    raise InvalidRequest(f"'{param}' must be one of {', '.join(allowed)}, got {value!r}", param=param)


def generate_key() -> str:
    return "ok-" + secrets.token_urlsafe(24)


class AccountStore:
    """Organizer accounts in Table Storage, with the per-worker cache of key lookups."""

    def __init__(
        self,
        tables: Tables,
        hasher: SecretHasher | None,
        cache_seconds: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._tables = tables
        self._hasher = hasher
        self._cache_seconds = cache_seconds
        self._clock = clock
        self._by_hash: dict[str, tuple[float, Actor | None]] = {}

    def _hash(self, key: str) -> str:
        if self._hasher is None:
            raise SettingsError(
                "CODE_HASH_KEY is not set: organizer account keys are stored as hashes keyed with the app's "
                "CODE_HASH_KEY. Set it to the app's value."
            )
        return self._hasher.hash(ORGANIZER_ACCOUNT_KEY, key)

    async def by_key(self, key: str) -> Actor | None:
        """The account this key opens, or None. Only a well-formed key costs a read (one, cached)."""
        if not KEY_PATTERN.fullmatch(key):
            return None
        key_hash = self._hash(key)
        now = self._clock()
        cached = self._by_hash.get(key_hash)
        if cached is not None and cached[0] > now:
            return cached[1]
        try:
            row = await guarded(self._tables.events.get_entity(PARTITION, _KEY + key_hash))
            actor: Actor | None = Actor(str(row["name"]), check_role(row["role"]))
        except ResourceNotFoundError:
            actor = None
        ttl = self._cache_seconds if actor is not None else min(_NEGATIVE_SECONDS, self._cache_seconds)
        if len(self._by_hash) > 10_000:
            self._by_hash.clear()
        self._by_hash[key_hash] = (now + ttl, actor)
        return actor

    async def exists(self, name: str) -> bool:
        try:
            await guarded(self._tables.events.get_entity(PARTITION, _ACCOUNT + name, select=["role"]))
        except ResourceNotFoundError:
            return False
        return True

    async def list(self) -> dict[str, Any]:
        query = self._tables.events.query_entities(
            "PartitionKey eq @pk and RowKey ge @first and RowKey lt @after",
            parameters={"pk": PARTITION, "first": _ACCOUNT, "after": "account}"},
        )
        try:
            rows = await gathered(query)
        except ResourceNotFoundError:
            rows = []
        data = [_shown(row) for row in rows]
        return {"object": "list", "data": sorted(data, key=lambda account: account["name"].lower())}

    async def add(self, actor: Actor, name: Any, role: Any) -> dict[str, Any]:
        """A new account (``{"name", "role", "created_at", "key"}``, the key shown only now)."""
        require_admin(actor, "add organizer accounts")
        name, role = check_name(name), check_role(role)
        key = generate_key()
        key_hash = self._hash(key)
        now = datetime.now(UTC)
        account = {"PartitionKey": PARTITION, "RowKey": _ACCOUNT + name, "role": role, "key_hash": key_hash,
                   "created_at": now, "created_by": actor.name}  # fmt: skip
        operations = [
            ("create", account),
            ("create", {"PartitionKey": PARTITION, "RowKey": _KEY + key_hash, "name": name, "role": role}),
            ("create", audit.entry(PARTITION, actor, "account-add", target=name,
                                   changes={"role": {"old": None, "new": role}})),
        ]  # fmt: skip
        try:
            await self._tables.submit(self._tables.events, operations)
        except ResourceExistsError:
            raise NameTaken(f"An organizer account named '{name}' exists already; choose another name.") from None
        return {"name": name, "role": role, "created_at": now.isoformat(), "key": key}

    async def remove(self, actor: Actor, name: Any) -> dict[str, Any]:
        """Remove an account: its key stops working (``{"name", "removed": true}``)."""
        require_admin(actor, "remove organizer accounts")
        name = check_name(name)
        for _ in range(_ATTEMPTS):
            row = await self._account(name)
            operations = [
                ("delete", {"PartitionKey": PARTITION, "RowKey": _ACCOUNT + name},
                 {"etag": row.metadata["etag"], "match_condition": MatchConditions.IfNotModified}),
                ("delete", {"PartitionKey": PARTITION, "RowKey": _KEY + row["key_hash"]}),
                ("create", audit.entry(PARTITION, actor, "account-remove", target=name,
                                       changes={"role": {"old": row["role"], "new": None}})),
            ]  # fmt: skip
            try:
                await self._tables.submit(self._tables.events, operations)
            except (ResourceModifiedError, ResourceNotFoundError):
                continue  # re-keyed or removed meanwhile: read it again
            self._by_hash.pop(row["key_hash"], None)
            return {"name": name, "removed": True}
        raise EditConflict(f"The account '{name}' kept changing while it was being removed; try again.")

    async def reset_key(self, actor: Actor, name: Any) -> dict[str, Any]:
        """A new key for an account; the old one stops working (``{"name", "role", "key"}``, shown only now)."""
        require_admin(actor, "reset organizer accounts' keys")
        name = check_name(name)
        for _ in range(_ATTEMPTS):
            row = await self._account(name)
            key = generate_key()
            key_hash = self._hash(key)
            account = {**row, "key_hash": key_hash}
            operations = [
                ("update", account, {"mode": UpdateMode.REPLACE, "etag": row.metadata["etag"],
                                     "match_condition": MatchConditions.IfNotModified}),
                ("delete", {"PartitionKey": PARTITION, "RowKey": _KEY + row["key_hash"]}),
                ("create", {"PartitionKey": PARTITION, "RowKey": _KEY + key_hash, "name": name, "role": row["role"]}),
                ("create", audit.entry(PARTITION, actor, "account-reset-key", target=name)),
            ]  # fmt: skip
            try:
                await self._tables.submit(self._tables.events, operations)
            except (ResourceModifiedError, ResourceNotFoundError):
                continue
            self._by_hash.pop(row["key_hash"], None)
            return {"name": name, "role": row["role"], "key": key}
        raise EditConflict(f"The account '{name}' kept changing while its key was being reset; try again.")

    async def _account(self, name: str) -> Any:
        try:
            return await guarded(self._tables.events.get_entity(PARTITION, _ACCOUNT + name))
        except ResourceNotFoundError:
            raise NotFound(f"No organizer account named '{name}'.") from None


def _shown(row: Any) -> dict[str, Any]:
    created = row.get("created_at")
    return {
        "name": str(row["RowKey"]).removeprefix(_ACCOUNT),
        "role": row["role"],
        "created_at": created.astimezone(UTC).isoformat() if isinstance(created, datetime) else None,
        "created_by": row.get("created_by") or None,
    }


def _article(role: str) -> str:
    return f"an {role}" if role[0] in "aeiou" else f"a {role}"
