"""Exact token budgets, event-wide budgets, max_attendees and blocking, over real HTTP and two app processes."""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from azure.core.exceptions import ResourceNotFoundError

from proxy.admission import budget
from proxy.admission.days import Admission, Finished, Settlement
from proxy.admission.limits import Ledger
from proxy.ledger.reconcile import reconcile
from proxy.ledger.reports import report
from proxy.policy.attendees import ROSTER_ROW, roster
from proxy.policy.events import EventStore
from proxy.storage.tables import Tables
from tests.conftest import MakeEvent
from tests.support import CACHE_SECONDS, ORGANIZER_KEY, Service, eventually, seen_within, sim_stats

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
AUTH = {"Authorization": f"Bearer {ORGANIZER_KEY}"}


async def burst(urls: list[str], keys: list[str], **fields: Any) -> list[httpx.Response]:
    """One chat request per key, all at once, spread over the app processes."""
    limits = httpx.Limits(max_connections=200)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        return await asyncio.gather(
            *(
                client.post(
                    f"{urls[i % len(urls)]}/api/v1/chat/completions", json={**CHAT, **fields}, headers={"api-key": key}
                )
                for i, key in enumerate(keys)
            )
        )


def tokens(responses: list[httpx.Response]) -> list[int]:
    return [r.json()["usage"]["total_tokens"] for r in responses if r.status_code == 200]


def codes(responses: list[httpx.Response]) -> Counter[str]:
    return Counter("ok" if r.status_code == 200 else r.json()["error"]["code"] for r in responses)


async def test_daily_token_cap_holds_under_a_concurrent_burst_on_two_instances(
    app: str, app_process: tuple[Service, str], make_event: MakeEvent, tables: Tables
) -> None:
    cap = 150
    created = await make_event(daily_tokens=cap, max_tokens=10, daily_requests=None)
    key = created.key()
    responses = await burst([app, app_process[1]], [key] * 60, max_tokens=10)
    spent = tokens(responses)
    assert set(codes(responses)) == {"ok", "daily_token_cap_exceeded"}
    # Requests in flight count at their estimate, so the burst stops at the cap, passed by one request at most.
    assert sum(spent) < cap + max(spent)
    data = await report(tables, created.event.id, "user")
    assert data["totals"]["total_tokens"] == sum(spent) and data["totals"]["requests"] == len(spent)


async def test_event_request_budget_is_exact_across_two_instances(
    app: str, app_process: tuple[Service, str], make_event: MakeEvent, simulator: str, http: httpx.Client
) -> None:
    created = await make_event(event_requests=20, daily_requests=None)
    before = sim_stats(simulator)["requests"]
    keys = [created.key(f"user{i}") for i in range(30)] * 2
    responses = await burst([app, app_process[1]], keys)
    assert codes(responses) == {"ok": 20, "event_budget_exhausted": 40}
    assert sim_stats(simulator)["requests"] == before + 20
    refused = next(r for r in responses if r.status_code == 429)
    error = refused.json()["error"]
    assert "budget of 20 requests" in error["message"] and "organizer" in error["message"]
    assert int(refused.headers["retry-after"]) > 0
    info = http.get(f"{app}/api/v1/event", headers={"api-key": created.key("user1")}).json()
    assert info["event_budget_exhausted"] is True and info["caps"]["event_requests"] == 20
    usage = http.get(f"{app}/api/manage/events/{created.event.id}/usage", headers=AUTH).json()
    assert usage["totals"]["requests"] == 20
    assert usage["budget"]["requests"] == {"limit": 20, "used": 20} and usage["budget"]["exhausted"] is True


async def test_event_token_budget_is_never_passed(
    app: str, app_process: tuple[Service, str], make_event: MakeEvent, tables: Tables
) -> None:
    limit = 600
    created = await make_event(event_tokens=limit, max_tokens=10, daily_requests=None)
    keys = [created.key(f"user{i}") for i in range(40)]
    responses = await burst([app, app_process[1]], keys, max_tokens=10)
    spent = tokens(responses)
    assert set(codes(responses)) <= {"ok", "event_budget_exhausted"}
    # Then one at a time until refused: the budget fills up to within one request's estimate.
    for i in range(100):
        response = httpx.post(
            f"{app}/api/v1/chat/completions", json={**CHAT, "max_tokens": 10}, headers={"api-key": keys[i % 40]}
        )
        if response.status_code != 200:
            break
        spent += tokens([response])
    assert response.json()["error"]["code"] == "event_budget_exhausted"
    data = await report(tables, created.event.id, "user")
    assert data["totals"]["total_tokens"] == sum(spent) <= limit
    # Little was left: one request's estimate (forwarded body / 4 + max_tokens = 41 here), plus what
    # the shards still booked as estimates for answers whose tokens they had not yet taken in
    # (written shortly after each answer): the refusal errs on the safe side, by one more request.
    assert sum(spent) > limit - 2 * 41
    shards = await budget.read_shards(tables, created.event.id)
    assert sum(s["delta_tokens"] for s in shards.values()) == 0  # spare moved, never made up


async def test_max_attendees_is_exact_under_a_burst_of_new_names(
    app: str, app_process: tuple[Service, str], make_event: MakeEvent, http: httpx.Client
) -> None:
    created = await make_event(max_attendees=5)
    names = [f"new{i}" for i in range(24)] * 2  # each name twice, at once, likely on both instances
    responses = await burst([app, app_process[1]], [created.key(name) for name in names])
    assert codes(responses) == {"ok": 10, "attendee_limit_reached": 38}, [
        r.text for r in responses if r.status_code > 403
    ]
    admitted = sorted({name for name, r in zip(names, responses, strict=True) if r.status_code == 200})
    assert len(admitted) == 5  # both requests of each name that got in
    refused = next(r for r in responses if r.status_code == 403).json()["error"]
    assert "limited to 5 attendees" in refused["message"]
    again = await burst([app, app_process[1]], [created.key(name) for name in admitted * 2])
    assert codes(again) == {"ok": 10}  # names already in keep working, on either instance
    listed = http.get(f"{app}/api/manage/events/{created.event.id}/attendees", headers=AUTH).json()
    assert listed["count"] == 5 and listed["max_attendees"] == 5
    assert sorted(a["user"] for a in listed["data"]) == sorted(admitted)
    assert all(a["requests"] == 4 and a["first_seen"] and a["blocked"] is False for a in listed["data"])


def test_block_and_unblock_an_attendee(http: httpx.Client, app: str) -> None:
    now = datetime.now(UTC)
    body = {
        "name": "Blocking",
        "start": (now - timedelta(hours=1)).isoformat(),
        "end": (now + timedelta(hours=2)).isoformat(),
    }
    created = http.post(f"{app}/api/manage/events", json=body, headers=AUTH).json()
    url = f"{app}/api/manage/events/{created['id']}/attendees/mallory"

    def status(user: str) -> int:
        key = f"{created['code']}/{user}"
        return http.post(f"{app}/api/v1/chat/completions", json=CHAT, headers={"api-key": key}).status_code

    assert status("mallory") == 200 and status("alice") == 200
    blocked = http.patch(url, json={"blocked": True}, headers=AUTH)
    assert blocked.status_code == 200
    assert blocked.json() == {"event_id": created["id"], "user": "mallory", "blocked": True}
    seen_within(CACHE_SECONDS, lambda: status("mallory"), lambda code: code == 403, "the block")
    key = f"{created['code']}/mallory"
    refused = http.post(f"{app}/api/v1/chat/completions", json=CHAT, headers={"api-key": key}).json()["error"]
    assert refused["code"] == "attendee_blocked" and "blocked" in refused["message"]
    assert status("alice") == 200
    listed = http.get(f"{app}/api/manage/events/{created['id']}/attendees", headers=AUTH).json()
    assert {a["user"]: a["blocked"] for a in listed["data"]} == {"alice": False, "mallory": True}

    for bad, param in (({"blocked": "yes"}, "blocked"), ({"blocked": True, "why": "x"}, "why"), ({}, "blocked")):
        answer = http.patch(url, json=bad, headers=AUTH)
        assert answer.status_code == 400 and answer.json()["error"]["param"] == param
    assert http.patch(url, json={"blocked": False}, headers=AUTH).json()["blocked"] is False
    seen_within(CACHE_SECONDS, lambda: status("mallory"), lambda code: code == 200, "the unblock")


async def test_ended_event_lists_no_models_and_nothing_remains(
    app: str, http: httpx.Client, make_event: MakeEvent, tables: Tables
) -> None:
    created = await make_event(daily_requests=10)
    await EventStore(tables, None, 0).save(replace(created.event, ends_at=datetime.now(UTC) - timedelta(minutes=1)))
    key = created.key()

    def models() -> int:
        return http.get(f"{app}/api/v1/models", headers={"api-key": key}).status_code

    seen_within(CACHE_SECONDS, models, lambda code: code == 403, "the end")
    assert http.get(f"{app}/api/v1/models", headers={"api-key": key}).json()["error"]["code"] == "event_ended"
    info = http.get(f"{app}/api/v1/event", headers={"api-key": key}).json()
    assert info["open"] is False and info["remaining_today"] == {"requests": 0, "tokens": 0}


def test_known_path_with_wrong_method_is_405(app: str, http: httpx.Client) -> None:
    for method, path, allow in (
        ("GET", "/api/v1/chat/completions", "POST"),
        ("POST", "/api/v1/models", "GET"),
        ("GET", "/api/openai/deployments/gpt-4o-mini/embeddings", "POST"),
        ("PUT", "/api/manage/events", "GET, POST"),
        ("POST", "/api/manage/events/some-id/attendees", "GET"),
    ):
        response = http.request(method, f"{app}{path}")
        assert response.status_code == 405, (method, path, response.text)
        assert response.headers["allow"] == allow
        error = response.json()["error"]
        assert error["code"] == "method_not_allowed" and allow in error["message"]
    assert http.get(f"{app}/api/v1/nothing-here").status_code == 404


async def test_reconciler_gives_back_the_budget_of_a_killed_worker(tables: Tables, make_event: MakeEvent) -> None:
    created = await make_event(event_requests=3, event_tokens=1000)
    ledger = Ledger(tables)
    now = datetime.now(UTC)
    shard = await ledger.admit_budget(created.event, now, 400, "dead-request")
    held = (await budget.read_shards(tables, created.event.id))[budget.shard_index(shard)]
    assert held["requests"] == 1 and budget.booked(held) == 400
    released = await reconcile(tables, Ledger(tables), 60, now=now + timedelta(minutes=2))
    assert released >= 1
    after = (await budget.read_shards(tables, created.event.id))[budget.shard_index(shard)]
    assert after["requests"] == 0 and budget.booked(after) == 0
    assert after["inflight"]["dead-request"][2] == 1  # marked released, forgotten a lease later


async def test_reconciler_settles_from_the_log_a_request_whose_shard_was_not_settled(
    tables: Tables, make_event: MakeEvent
) -> None:
    created = await make_event(event_requests=3, event_tokens=1000)
    now = datetime.now(UTC)
    shard = await Ledger(tables).admit_budget(created.event, now, 400, "logged-request")
    # The worker stored the request's log entry, then died before settling it on its shard.
    log = {"PartitionKey": created.event.id, "RowKey": f"log|{now.date().isoformat()}|logged-request",
           "status": 200, "total_tokens": 37}  # fmt: skip
    await tables.usage.create_entity(log)
    await reconcile(tables, Ledger(tables), 60, now=now + timedelta(minutes=2))
    after = (await budget.read_shards(tables, created.event.id))[budget.shard_index(shard)]
    assert after["requests"] == 1 and after["tokens"] == 37 and budget.booked(after) == 37
    assert "logged-request" not in after["inflight"]


async def test_spare_moves_count_the_settlements_not_yet_written(tables: Tables, make_event: MakeEvent) -> None:
    """A worker plans a move with its own settlements that its shard does not hold yet (written 50 ms later)."""
    created = await make_event(event_tokens=8 * 100, daily_requests=None)  # 100 tokens per shard
    ledger, now = Ledger(tables), datetime.now(UTC)
    shard = await ledger.admit_budget(created.event, now, 100, "first")  # its home shard, full
    admission = Admission("first", now.date().isoformat(), 0, 100, None, None, reserved=False, shard=shard)
    log = {"PartitionKey": created.event.id, "RowKey": f"log|{admission.day}|first", "status": 200, "total_tokens": 10}
    used = Settlement("gpt-4o-mini", 5, 5, 10, reached_upstream=True, succeeded=True)
    await ledger.settle(created.event.id, [Finished("alice", admission, used, log)])
    # Settled at 10 tokens; the shard's write of it is deferred (FLUSH_DELAY_SECONDS), and this admission
    # takes the shard's lock before that write can: storage still books 100 there while it plans.
    # 90 left at home and 700 on the others: a request that may use 750 fits, once spare moves home.
    assert await ledger.admit_budget(created.event, now, 750, "second") == shard
    shards = await budget.read_shards(tables, created.event.id)
    assert sum(budget.booked(s) for s in shards.values()) == 10 + 750
    assert sum(s["delta_tokens"] for s in shards.values()) == 0


async def test_new_names_without_a_limit_never_write_the_roster_row_and_a_later_limit_counts_them(
    app: str, app_process: tuple[Service, str], make_event: MakeEvent, tables: Tables
) -> None:
    created = await make_event()  # no max_attendees
    names = [f"free{i}" for i in range(12)] * 2
    responses = await burst([app, app_process[1]], [created.key(name) for name in names])
    assert codes(responses) == {"ok": 24}
    with pytest.raises(ResourceNotFoundError):  # no name contended on it
        await tables.usage.get_entity(created.event.id, ROSTER_ROW)
    assert len(await roster(tables, created.event.id)) == 12
    # A limit set afterwards counts the names registered before it: 2 places left of 14.
    await EventStore(tables, None, 0).save(replace(created.event, max_attendees=14))
    for url in (app, app_process[1]):  # both workers see the limit (EVENT_CACHE_SECONDS is 1 there)
        await eventually(
            lambda url=url: asyncio.to_thread(
                lambda: httpx.get(f"{url}/api/v1/event", headers={"api-key": created.key("free0")}).json()
            ),
            lambda info: info["caps"]["max_attendees"] == 14,
            what="the limit seen",
        )
    later = await burst([app, app_process[1]], [created.key(f"late{i}") for i in range(6)])
    assert codes(later) == {"ok": 2, "attendee_limit_reached": 4}
    assert len(await roster(tables, created.event.id)) == 14


async def test_a_request_admitted_in_another_ones_group_across_midnight_is_found_by_its_own_day(
    tables: Tables, make_event: MakeEvent
) -> None:
    """Shard entries carry each request's own time: the reconciler finds a request's log entry under the
    day it was admitted on, even when the group write that admitted it was led by one from the day before."""
    created = await make_event(event_requests=80, event_tokens=10**6)
    ledger = Ledger(tables)
    before, after = datetime(2026, 12, 1, 23, 59, 59, 900_000, UTC), datetime(2026, 12, 2, 0, 0, 0, 100_000, UTC)
    # The first writes alone; the next two queue behind it and are written together, led by the second.
    shards = await asyncio.gather(
        ledger.admit_budget(created.event, before, 100, "leader-before"),
        ledger.admit_budget(created.event, before, 100, "second-before"),
        ledger.admit_budget(created.event, after, 100, "third-after"),
    )
    # The third was logged on its own day (as its attendee's admission has it), then its worker died.
    log = {"PartitionKey": created.event.id, "RowKey": "log|2026-12-02|third-after", "status": 200, "total_tokens": 37}
    await tables.usage.create_entity(log)
    await reconcile(tables, Ledger(tables), 60, now=after + timedelta(minutes=2))
    shard = (await budget.read_shards(tables, created.event.id))[budget.shard_index(shards[2])]
    assert shard["requests"] == 1 and shard["tokens"] == 37  # the third settled from its log; the others lost
