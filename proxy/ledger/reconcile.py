"""Giving back the daily slots of requests whose worker died before settling them.

A request is admitted with an entry in its attendee's day entity (see
``proxy.admission.days``) and settled once its answer is over. The Functions host
kills workers without warning (scale-in, restart, ``functionTimeout``), so an
admitted request can lose its worker and never settle. Its entry then stays,
holding one of the attendee's daily requests. The reconciler, run every
5 minutes by a timer-triggered function (and by ``python -m proxy.ledger.reconcile``),
reads the day entities of today and yesterday that hold any entry, and the
shards of event budgets that do (``proxy.admission.budget``), and gives back every slot
and estimate older than the reservation lease. Should such a request
settle after all (it outlived the lease), it takes its slot again then.

The lease (``RESERVATION_LEASE_SECONDS``) must be longer than any request can
live: the host's ``functionTimeout`` (10 minutes in ``host.json``) kills a
worker whose request runs longer, so the default is that plus one minute
(derived from the timeout the host applies, and a lease set no longer than it
refused at start: ``proxy.config.settings``). A
slot is therefore given back between one lease and one lease plus 5 minutes
(11 to 16 minutes) after its worker died. Every 5 minutes rather than every
minute: each run wakes an instance (with a cold start when the app has scaled
to zero) and is billed, 288 runs a day instead of 1,440, for a slot that comes
back at most 4 minutes later, on the rare day a worker dies mid-request. Such
a request is never counted as used: its answer was not delivered in full,
since delivery waits for the settlement (``proxy.ledger.usage``).
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta
from typing import Any

from azure.core.exceptions import ResourceNotFoundError

from proxy.admission.budget import SHARD_END, SHARD_PREFIX
from proxy.admission.days import day_of
from proxy.admission.limits import Ledger
from proxy.config.settings import Settings
from proxy.config.tokens import make_credential
from proxy.storage.tables import Tables, gathered, opened

log = logging.getLogger("proxy.reconcile")

# NCRONTAB (seconds first), for the timer function in function_app.py.
RECONCILE_SCHEDULE = "0 */5 * * * *"


async def reconcile(tables: Tables, ledger: Ledger, lease_seconds: float, now: datetime | None = None) -> int:
    """Release every reservation older than the lease; the number released."""
    now = now or datetime.now(UTC)
    # Days are the events' local days (UTC-12 to UTC+14): yesterday and today anywhere on Earth.
    first_day = day_of(now - timedelta(days=2))
    after_last = day_of(now + timedelta(days=2))
    holding: list[dict[str, Any]] = []
    # The attendees' days of yesterday and today, and the shards of event budgets (proxy.admission.budget).
    for first, after in ((first_day, after_last), (SHARD_PREFIX, SHARD_END)):
        query = tables.usage.query_entities(
            "RowKey ge @first and RowKey lt @after and inflight ne @empty",
            parameters={"first": first, "after": after, "empty": "{}"},
            select=["PartitionKey", "RowKey", "inflight"],
        )
        try:
            holding += await gathered(query)
        except ResourceNotFoundError:  # no usage table yet: nothing was ever admitted
            return 0
    cutoff = (now - timedelta(seconds=lease_seconds)).timestamp()
    forget_before = cutoff - lease_seconds
    released = 0
    for entity in holding:
        released += await ledger.release_stale(entity["PartitionKey"], entity["RowKey"], cutoff, forget_before)
    if released:
        log.warning("gave back %d daily slots held by requests whose worker stopped before settling", released)
    return released


async def _main() -> None:
    settings = Settings.for_cli()
    credential = make_credential(settings)
    try:
        async with opened(settings, credential) as tables:
            released = await reconcile(tables, Ledger(tables), settings.reservation_lease_seconds)
    finally:
        if credential is not None:
            await credential.close()
    print(f"released {released} reservations older than {settings.reservation_lease_seconds:g} s")


if __name__ == "__main__":
    asyncio.run(_main())
