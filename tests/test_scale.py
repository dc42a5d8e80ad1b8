"""Many requests in flight at once on one attendee's day and one event budget.

A string property of Table Storage holds 64 KiB: one held the in-flight map of
an entity, and at about 510 requests in flight every admission failed with a
503 (``proxy.admission.inflight``). ``bench/inflight.py`` holds 2,000 requests in flight
for 500 attendees and one budget, over two app processes; too heavy for
``make test`` on two cores, so here: 2,000 admissions on one attendee's day
and two workers' shards straight through the ledger (real Azurite, no HTTP),
and, over HTTP, 650 requests of one attendee through one app process (her day
and that worker's shard each hold 650 in flight, two pieces of JSON) beside 50
of another through the other process, on one budget, used up exactly.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from azure.core.exceptions import ResourceNotFoundError

from proxy.admission import budget, inflight
from proxy.admission.days import Finished, Settlement
from proxy.admission.limits import Ledger
from proxy.ledger.reconcile import reconcile
from proxy.ledger.reports import report
from proxy.policy.events import Event
from proxy.storage.tables import Tables
from tests.conftest import MakeEvent
from tests.support import Service, eventually, sim_stats

HEAVY, LIGHT = 650, 50
HOLD_MS = 20_000  # how long upstream keeps each answer: all are admitted well before the first ends
LEDGER_IN_FLIGHT = 2_000


async def test_2000_in_flight_on_one_day_and_two_shards(tables: Tables, make_event: MakeEvent) -> None:
    """Two workers (ledgers) admit 2,000 requests of one attendee at once, then settle them or lose them."""
    created = await make_event(daily_requests=LEDGER_IN_FLIGHT, event_requests=LEDGER_IN_FLIGHT, event_tokens=10**9)
    event: Event = created.event
    workers = [Ledger(tables), Ledger(tables)]
    now = datetime.now(UTC)
    admitted = await asyncio.gather(
        *(workers[i % 2].admit_all(event, "alice", now, 4107, f"{i:032x}") for i in range(LEDGER_IN_FLIGHT))
    )
    assert all(a.reserved and a.shard for a in admitted)
    day = await tables.usage.get_entity(event.id, f"{now.date().isoformat()}|alice")
    assert len(inflight.decode(dict(day))) == LEDGER_IN_FLIGHT and day["reserved"] == LEDGER_IN_FLIGHT
    assert "inflight3" in day and len(day["inflight"]) <= inflight.PIECE_CHARS  # 2,000 take four pieces
    shards = await budget.read_shards(tables, event.id)
    assert sum(len(s["inflight"]) for s in shards.values()) == LEDGER_IN_FLIGHT
    assert sum(s["requests"] for s in shards.values()) == LEDGER_IN_FLIGHT
    refused = await asyncio.gather(workers[0].admit_all(event, "bob", now, 10, "one-more"), return_exceptions=True)
    assert getattr(refused[0], "code", None) == "event_budget_exhausted"
    # Half of them end (their slots kept), the workers of the other half die: the reconciler gives those back.
    used = Settlement("gpt-4o-mini", 5, 5, 10, reached_upstream=True, succeeded=True)
    ended = admitted[: LEDGER_IN_FLIGHT // 2]
    for worker in workers:
        await worker.settle(event.id, [Finished("alice", a, used, None) for a in ended[workers.index(worker) :: 2]])
        await worker.drain()
    await reconcile(tables, Ledger(tables), 60, now=now + timedelta(minutes=2))
    day = await tables.usage.get_entity(event.id, f"{now.date().isoformat()}|alice")
    assert day["reserved"] == len(ended) and day["requests"] == len(ended) and day["total_tokens"] == 10 * len(ended)
    assert {entry[2] for entry in inflight.decode(dict(day)).values()} == {1}  # released, forgotten a lease later
    shards = await budget.read_shards(tables, event.id)
    assert sum(s["requests"] for s in shards.values()) == len(ended)
    assert sum(s["tokens"] for s in shards.values()) == 10 * len(ended)


# 44 s on the shared machine, 62-69 s with two busy loops besides: 120 s (the default) is too near for a hang guard.
@pytest.mark.timeout(300)
async def test_650_requests_in_flight_for_one_attendee_and_one_budget(
    app: str, app_process: tuple[Service, str], make_event: MakeEvent, tables: Tables, simulator: str
) -> None:
    total = HEAVY + LIGHT
    created = await make_event(daily_requests=HEAVY, event_requests=total, event_tokens=10**9)
    event_id, day = created.event.id, datetime.now(UTC).date().isoformat()
    body = {
        "model": "gpt-4o-mini",
        "max_tokens": 8,
        "messages": [{"role": "user", "content": f"SIM_SLOW_MS={HOLD_MS}"}],
    }
    before = int(sim_stats(simulator)["requests"])  # type: ignore[call-overload]
    peak = 0

    async def watch() -> None:
        nonlocal peak
        while True:
            with contextlib.suppress(ResourceNotFoundError):
                entity = await tables.usage.get_entity(event_id, f"{day}|alice")
                peak = max(peak, len(inflight.decode(dict(entity))))
            await asyncio.sleep(0.1)

    watcher = asyncio.create_task(watch())
    sent = [(app, created.key("alice"))] * HEAVY + [(app_process[1], created.key("bob"))] * LIGHT
    try:
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=total)) as client:
            responses = await asyncio.gather(
                *(
                    client.post(f"{url}/api/v1/chat/completions", json=body, headers={"api-key": key})
                    for url, key in sent
                )
            )
    finally:
        watcher.cancel()
    outcomes = Counter(r.status_code if r.status_code != 200 else "ok" for r in responses)
    assert outcomes == {"ok": total}, [r.text for r in responses if r.status_code != 200][:3]
    assert sim_stats(simulator)["requests"] == before + total
    assert peak == HEAVY  # all of hers in flight at once, on her day
    entity = await eventually(
        lambda: tables.usage.get_entity(event_id, f"{day}|alice"),
        lambda e: inflight.decode(dict(e)) == {},
        what="every request settled",
    )
    assert entity["reserved"] == HEAVY and entity["requests"] == HEAVY
    assert "inflight1" not in entity  # the pieces go as the map shrinks
    shards = await eventually(
        lambda: budget.read_shards(tables, event_id),
        lambda found: all(shard["inflight"] == {} for shard in found.values()),
        what="the shards settled",
    )
    assert sum(shard["requests"] for shard in shards.values()) == total
    assert (await report(tables, event_id, "user"))["totals"]["requests"] == total
    # The budget is used up exactly: one more is refused.
    refused = httpx.post(f"{app}/api/v1/chat/completions", json=body, headers={"api-key": created.key("carol")})
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "event_budget_exhausted"
