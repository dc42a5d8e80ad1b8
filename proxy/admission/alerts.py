"""Budget alerts: one POST to the event's ``alert_webhook`` at 80 % and at 100 % of each event-wide budget.

The body is ``{"text", "event_id", "event", "budget", "used", "limit",
"percent"}``: ``budget`` names the budget (``event_requests``,
``event_tokens``), ``percent`` the threshold crossed, and ``text`` is a
sentence, so Slack and Teams incoming webhooks show it as it is.

Nothing here runs on a request's path: admitting a request of an event that
has a webhook and a budget only marks the event (``touch``), and a task of
the worker reads the event's budget shards (one range query) at most once a
second while requests come, outside any request.

Once across all instances: a threshold crossed is *claimed* by inserting the
entity ``alert|<budget>|<percent>`` in the event's ``proxyusage`` partition,
which only one insert can do. Its claimant POSTs, retrying with backoff
(0.5 s doubling to 30 s) until the webhook answers 2xx, renews its claim
(``attempt_at``) under the entity's ETag at each attempt, and marks it
``delivered``. Should the claimant die, any instance that checks the event
later takes over a claim not renewed for ``CLAIM_LEASE_SECONDS``, by a
conditional replace; so does the reconciler's timer (``sweep``, every 5
minutes), for an event no request comes to any more. So each threshold is
POSTed at least once, and twice
only if a claimant dies between the webhook's answer and the mark.

The URL is a secret (Slack's and Teams' URLs carry their token): logs name
its host only, and organizers see it masked. It must be ``https``; plain
``http`` only to a loopback address, and only in a local run (Azurite).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson
from azure.core.exceptions import ResourceExistsError, ResourceModifiedError, ResourceNotFoundError

from proxy.admission import budget
from proxy.errors import NotFound, StorageUnavailable
from proxy.policy.events import Event, EventStore
from proxy.storage.tables import Tables, gathered

log = logging.getLogger("proxy.alerts")

THRESHOLDS = (80, 100)
ALERT_PREFIX = "alert|"
CHECK_SECONDS = 1.0
CLAIM_LEASE_SECONDS = 60.0
MAX_BACKOFF_SECONDS = 30.0
_TIMEOUT = aiohttp.ClientTimeout(total=10.0, sock_connect=5.0)


def check_webhook(url: str) -> str:
    """The webhook URL if it may be used; ValueError saying why not."""
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ValueError("must be an https:// URL (an incoming webhook of Slack, Teams or your own)")
    if parts.username or parts.password:
        raise ValueError("must not carry a user name or password")
    host = parts.hostname
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    loopback = host == "localhost" or (address is not None and address.is_loopback)
    if parts.scheme == "http" and not loopback:
        raise ValueError("must be https:// (plain http only to a loopback address, for local runs)")
    if address is not None and not loopback and (address.is_private or address.is_link_local or address.is_reserved):
        raise ValueError("must not point at a private or link-local address")
    return url


def masked(url: str) -> str:
    """What logs see of a webhook URL: its scheme and host, never its path (the secret)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}/…" if parts.hostname else "…"


def budgets(event: Event) -> list[tuple[str, str, float]]:
    """(budget field, figure in ``budget.totals``, limit) of each event-wide budget the event has."""
    found = []
    for field, figure in (("event_requests", "requests"), ("event_tokens", "tokens"), ("event_cost", "cost")):
        limit = getattr(event, field)
        if limit is not None:
            found.append((field, figure, limit))
    return found


def alert_text(event: Event, field: str, used: float, limit: float, percent: int) -> str:
    unit = {"event_requests": "requests", "event_tokens": "tokens"}.get(field, field)
    if field == "event_cost":
        spent = f"${used:,.2f} of its budget of ${limit:,.2f}"
        if percent >= 100:
            return (f"Event '{event.name}' has used up its budget: {spent}. Attendees now get 429 "
                    "event_budget_exhausted. Raise event_cost to let them continue.")  # fmt: skip
        return f"Event '{event.name}' has used {percent} % of its budget: {spent}."
    if percent >= 100:
        left = "" if used >= limit else f", the {limit - used:,} left fewer than a request may use"
        return (f"Event '{event.name}' has used up its budget of {limit:,} {unit} ({used:,} used{left}): attendees "
                f"now get 429 event_budget_exhausted. Raise {field} to let them continue.")  # fmt: skip
    return f"Event '{event.name}' has used {percent} % of its budget of {limit:,} {unit}: {used:,} used."


class Alerts:
    """Watches the budgets of the events this worker admits requests for, and sends their alerts."""

    def __init__(self, tables: Tables, *, local: bool, check_seconds: float = CHECK_SECONDS) -> None:
        self._tables = tables
        self._entities = tables.usage_entities
        self._local = local  # plain http to loopback allowed (a local run on Azurite)
        self._check_seconds = check_seconds
        self._touched: dict[str, Event] = {}
        self._exhausted: set[str] = set()  # events that refused a request for their budget since the last check
        self._done: set[tuple[str, str]] = set()  # (event id, alert row) claimed or delivered, as far as known
        self._watcher: asyncio.Task[None] | None = None
        self._deliveries: set[asyncio.Task[None]] = set()
        self._session: aiohttp.ClientSession | None = None
        self._owner = f"{time.time_ns():x}"

    def touch(self, event: Event, *, exhausted: bool = False) -> None:
        """A request of ``event`` is being admitted (or was refused: its budget is ``exhausted``): check its
        budgets soon (never waits)."""
        if not event.alert_webhook or not budget.has_budget(event):
            return
        self._touched[event.id] = event
        if exhausted:
            self._exhausted.add(event.id)
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.create_task(self._watch())

    async def _watch(self) -> None:
        while self._touched:
            await asyncio.sleep(self._check_seconds)
            events, self._touched = self._touched, {}
            exhausted, self._exhausted = self._exhausted, set()
            for event in events.values():
                try:
                    await self.check(event, exhausted=event.id in exhausted)
                except StorageUnavailable as exc:
                    log.warning("budget alerts of event %s not checked: %s", event.id, exc)
                    self._touched.setdefault(event.id, event)
                except Exception:  # a bug: say so, and keep watching the other events
                    log.exception("budget alerts of event %s failed", event.id)

    async def check(self, event: Event, *, exhausted: bool = False) -> None:
        """Claim and send every threshold the event's budgets have crossed and nobody has claimed.

        A token budget refuses its last tokens (fewer than a request may use), so it may never reach
        100 %: once it has refused a request (``exhausted``) and stands at 80 % or more, it is used up.
        """
        if not event.alert_webhook:
            return
        figures = budget.totals(event, list((await budget.read_shards(self._tables, event.id)).values()))
        for field, figure, limit in budgets(event):
            used = figures[figure]["used"]  # USD for the cost budget, a count for the others
            for percent in THRESHOLDS:
                row = f"{ALERT_PREFIX}{field}|{percent}"
                crossed = used * 100 >= percent * limit or (exhausted and used * 100 >= THRESHOLDS[0] * limit)
                if crossed and (event.id, row) not in self._done:
                    await self._claim(event, row, field, used, limit, percent)

    async def _claim(self, event: Event, row: str, field: str, used: float, limit: float, percent: int) -> None:
        payload = {
            "text": alert_text(event, field, used, limit, percent),
            "event_id": event.id,
            "event": event.name,
            "budget": field,
            "used": used,
            "limit": limit,
            "percent": percent,
        }
        entity = {"PartitionKey": event.id, "RowKey": row, "state": "sending", "owner": self._owner,
                  "attempt_at": time.time(), "attempts": 0, "payload": orjson.dumps(payload).decode()}  # fmt: skip
        try:
            etag = await self._entities.insert(entity)
        except ResourceNotFoundError:  # no table yet
            await self._tables.ensure()
            return
        except ResourceExistsError:
            etag, entity = await self._take_over(event.id, row)
            if not etag:
                return
            payload = orjson.loads(str(entity["payload"]))
        self._start(event, entity, etag, payload)

    async def sweep(self, events: EventStore) -> int:
        """Take over and send the alerts whose claimant stopped renewing its claim (died): run with the
        reconciler's timer, so an alert is delivered even when no request comes to check its event again.
        The number taken over."""
        query = self._tables.usage.query_entities(
            "RowKey ge @first and RowKey lt @after and state eq @sending",
            parameters={"first": ALERT_PREFIX, "after": ALERT_PREFIX[:-1] + "}", "sending": "sending"},
        )
        try:
            stale = [dict(row) for row in await gathered(query)]
        except ResourceNotFoundError:
            return 0
        taken = 0
        for row in stale:
            if time.time() - float(row.get("attempt_at", 0)) < CLAIM_LEASE_SECONDS:
                continue
            try:
                event = await events.get(str(row["PartitionKey"]))
            except NotFound:
                continue  # deleted: nobody to tell
            etag, entity = await self._take_over(event.id, str(row["RowKey"]))
            if etag and event.alert_webhook:
                taken += 1
                self._start(event, entity, etag, orjson.loads(str(entity["payload"])))
        return taken

    def _start(self, event: Event, entity: dict[str, Any], etag: str, payload: dict[str, Any]) -> None:
        self._done.add((event.id, str(entity["RowKey"])))
        task = asyncio.create_task(self._deliver(event, entity, etag, payload))
        self._deliveries.add(task)
        task.add_done_callback(self._deliveries.discard)

    async def drain(self, timeout: float) -> None:
        """Wait for the deliveries under way (a timer's run ends with them)."""
        if self._deliveries:
            await asyncio.wait(set(self._deliveries), timeout=timeout)

    async def _take_over(self, event_id: str, row: str) -> tuple[str, dict[str, Any]]:
        """The claim of a dead claimant (not renewed within the lease), or ("", {}) when it is not ours to take."""
        etag, found = await self._entities.get(event_id, row)
        if found.get("state") == "delivered":
            self._done.add((event_id, row))
            return "", {}
        if time.time() - float(found.get("attempt_at", 0)) < CLAIM_LEASE_SECONDS:
            return "", {}  # its claimant is at it; looked at again when the event is checked next
        taken = {**_own(found), "owner": self._owner, "attempt_at": time.time()}
        try:
            return await self._entities.replace(taken, etag), taken
        except ResourceModifiedError:
            return "", {}

    async def _deliver(self, event: Event, entity: dict[str, Any], etag: str, payload: dict[str, Any]) -> None:
        where = masked(event.alert_webhook)
        backoff = 0.5
        while True:
            status = await self._post(event.alert_webhook, payload)
            delivered = status is not None and 200 <= status < 300
            entity = {**_own(entity), "attempts": int(entity.get("attempts", 0)) + 1, "attempt_at": time.time(),
                      "state": "delivered" if delivered else "sending"}  # fmt: skip
            # Renew the claim (or mark it delivered), under its ETag: a delivered mark is retried until
            # stored, or another instance would take the claim over and send it again.
            while True:
                try:
                    etag = await self._entities.replace(entity, etag)
                except ResourceModifiedError:
                    log.info("budget alert %s of event %s: taken over by another instance", entity["RowKey"], event.id)
                    return
                except StorageUnavailable:
                    if delivered:
                        await asyncio.sleep(backoff)
                        continue
                break
            if delivered:
                log.info("budget alert %s of event %s delivered to %s", entity["RowKey"], event.id, where)
                return
            log.warning(
                "budget alert %s of event %s not delivered to %s (%s); retrying in %.1f s",
                entity["RowKey"], event.id, where, "no answer" if status is None else f"status {status}", backoff,
            )  # fmt: skip
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF_SECONDS)

    async def _post(self, url: str, payload: dict[str, Any]) -> int | None:
        """The webhook's status, or None when it could not be reached (or may not be called from here).

        aiohttp, not httpx: httpx logs every request's URL at INFO, and this URL is a secret.
        """
        try:
            check_webhook(url)
        except ValueError:
            return None
        if urlsplit(url).scheme == "http" and not self._local:
            return None  # plain http is for local runs only
        if self._session is None:
            # No proxy from the environment, no redirects: the alert goes where the organizer said, or nowhere.
            self._session = aiohttp.ClientSession(timeout=_TIMEOUT, trust_env=False)
        try:
            async with self._session.post(url, data=orjson.dumps(payload), allow_redirects=False,
                                          headers={"content-type": "application/json"}) as response:  # fmt: skip
                return response.status
        except (aiohttp.ClientError, TimeoutError):
            return None

    async def aclose(self) -> None:
        for task in (self._watcher, *self._deliveries):
            if task is not None:
                task.cancel()
        if self._session is not None:
            await self._session.close()


def _own(entity: dict[str, Any]) -> dict[str, Any]:
    """An alert entity's own properties (no metadata)."""
    names = ("PartitionKey", "RowKey", "state", "owner", "attempt_at", "attempts", "payload")
    return {name: entity[name] for name in names if name in entity}
