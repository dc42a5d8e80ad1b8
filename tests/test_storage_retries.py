"""Storage calls that break on the way back: a retried write that had landed counts once, a cut answer is retried.

The app's storage goes through a relay (``tests.relay``) that throws away the
answer of chosen writes after Azurite carried them out, or cuts an answer's
body short: what a dropped connection does to a client that retries.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import orjson
import pytest

from proxy.admission import budget, inflight
from proxy.admission.limits import Ledger
from proxy.config.settings import Settings
from proxy.ledger.reports import report, request_log
from proxy.storage.tables import TRANSACT_ATTEMPTS, Tables
from tests.conftest import LENIENT, MakeEvent
from tests.relay import Match, StorageRelay
from tests.support import Service, app_env, eventually, sim_stats, start_app

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(scope="module")
def relay(azurite: str) -> Iterator[StorageRelay]:
    port = int(azurite.split("TableEndpoint=http://127.0.0.1:")[1].split("/")[0])
    relayed = StorageRelay(port)
    yield relayed
    relayed.close()


@pytest.fixture(scope="module")
def relayed_service(azurite: str, simulator: str, relay: StorageRelay) -> Iterator[tuple[Service, str]]:
    """An app process whose storage calls all go through the relay."""
    service, url = start_app(app_env(relay.connection_string(azurite), simulator, EVENT_CACHE_SECONDS="1", **LENIENT))
    yield service, url
    service.stop()


@pytest.fixture(scope="module")
def relayed_app(relayed_service: tuple[Service, str]) -> str:
    return relayed_service[1]


def writes_row(event_id: str, row_key_start: str, batches: bool = False) -> Match:
    """A rule's match: a single-entity write of a row of ``event_id`` whose key starts so; with ``batches``, a
    ``$batch`` holding one too (a new name's first day is inserted with its roster row)."""
    needle = f'"PartitionKey":"{event_id}","RowKey":"{row_key_start}'.encode()

    def match(method: str, path: str, body: bytes) -> bool:
        return method in ("POST", "PUT") and (batches or not path.endswith("$batch")) and needle in body

    return match


async def test_a_retried_admission_that_had_landed_counts_once(
    relayed_app: str, relay: StorageRelay, make_event: MakeEvent, tables: Tables, simulator: str
) -> None:
    """Writes of the day (an insert with the new name's roster row, then a replace under its ETag) and of the
    event budget's shard land and lose their answers, and are sent again: a daily cap of 3 serves 3, and nothing
    stays reserved. (Admission writes the day before settlement does, so the first write matched is its.)"""
    created = await make_event(daily_requests=3, event_requests=3)
    event_id, day = created.event.id, datetime.now(UTC).date().isoformat()
    day_row, shard_rows = writes_row(event_id, f"{day}|alice", batches=True), writes_row(event_id, budget.SHARD_PREFIX)
    before = sim_stats(simulator)["requests"]

    async def day_entity() -> dict[str, Any]:
        return dict(await tables.usage.get_entity(event_id, f"{day}|alice"))

    async with httpx.AsyncClient(timeout=30) as client:

        async def chat() -> httpx.Response:
            headers = {"api-key": created.key()}
            return await client.post(f"{relayed_app}/api/v1/chat/completions", json=CHAT, headers=headers)

        # Every attempt of the first write (a transaction: the new name's row too) lands, every answer lost:
        # 503, and what it took is given back.
        sends = 2 * TRANSACT_ATTEMPTS  # each attempt of Tables.transact is sent twice by the lean client
        lost = relay.arm(day_row, "drop", times=sends)
        first = await chat()
        assert lost.fired == sends and first.status_code == 503, first.text
        assert first.json()["error"]["code"] == "storage_unavailable"
        await eventually(day_entity, lambda e: orjson.loads(e["inflight"]) == {} and e["reserved"] == 0)
        statuses = []
        for _ in range(4):
            # The first attempt lands and loses its answer; the retry must find the request admitted.
            rules = [relay.arm(day_row, "drop"), relay.arm(shard_rows, "drop")] if len(statuses) < 2 else []
            response = await chat()
            statuses.append(response.status_code)
            assert all(rule.fired == 1 for rule in rules), [rule.seen for rule in rules]
    assert statuses == [200, 200, 200, 429], response.text
    assert response.json()["error"]["code"] == "daily_request_cap_exceeded"
    assert sim_stats(simulator)["requests"] == before + 3
    # Once settled, the day holds 3 requests and nothing in flight; the shards 3 requests.
    entity = await eventually(day_entity, lambda e: orjson.loads(e["inflight"]) == {}, what="the day settled")
    assert entity["reserved"] == 3 and entity["requests"] == 3
    shards = await eventually(
        lambda: budget.read_shards(tables, event_id),
        lambda s: all(shard["inflight"] == {} for shard in s.values()),
        what="the shards settled",
    )
    assert sum(shard["requests"] for shard in shards.values()) == 3
    assert (await report(tables, event_id, "user"))["totals"]["requests"] == 3


async def test_an_answer_cut_short_is_read_again(relayed_app: str, relay: StorageRelay, make_event: MakeEvent) -> None:
    """A storage answer whose body is cut (``aiohttp.ClientPayloadError``) is retried, not a 500."""
    created = await make_event(daily_requests=5)
    event_id = created.event.id
    # The first read on the lean client (proxy.storage.entities): the attendee's row, then the day's.
    cut = relay.arm(
        lambda method, path, body: method == "GET" and f"proxyusage(PartitionKey='{event_id}'" in path, "truncate"
    )
    async with httpx.AsyncClient(timeout=30) as client:
        response = await client.post(
            f"{relayed_app}/api/v1/chat/completions", json=CHAT, headers={"api-key": created.key()}
        )
    assert cut.fired == 1, cut.seen
    assert response.status_code == 200, response.text


async def test_a_settlement_storage_refuses_is_stored_apart_and_the_worker_goes_on(
    relayed_service: tuple[Service, str], relay: StorageRelay, make_event: MakeEvent, tables: Tables
) -> None:
    """Table Storage refusing one request's settling transaction as invalid (400) is not an outage.

    The relay makes every transaction holding mallory's log entry invalid (a property over 64 KiB beside each
    log row: hers alone, or a pack that holds it), so Azurite refuses it, every time. Before, the worker kept
    the batch for a retry and refused every request of every event with a 503 meanwhile, forever. Now the
    others in that batch are stored apart, mallory's log entry and day are written on their own, and an error
    is logged.
    """
    service, url = relayed_service
    created = await make_event(daily_requests=10)
    event_id = created.event.id

    def mallorys_settlement(method: str, path: str, body: bytes) -> bool:
        return (
            path.endswith("$batch") and event_id.encode() in body and b'"RowKey":"log|' in body and b"mallory" in body
        )

    def invalid(body: bytes) -> bytes:
        return body.replace(b'"RowKey":"log|', b'"padding":"' + b"x" * 40_000 + b'","RowKey":"log|')

    poison = relay.arm(mallorys_settlement, "tamper", times=1000, rewrite=invalid)
    async with httpx.AsyncClient(timeout=30) as client:

        async def chat(user: str) -> httpx.Response:
            headers = {"api-key": created.key(user)}
            return await client.post(f"{url}/api/v1/chat/completions", json=CHAT, headers=headers)

        together = await asyncio.gather(chat("mallory"), chat("alice"), chat("bob"))
        assert poison.fired >= 1
        assert [r.status_code for r in together] == [200, 200, 200], [r.text for r in together]
        after = [await chat(user) for user in ("alice", "bob", "mallory")]
    assert [r.status_code for r in after] == [200, 200, 200], [r.text for r in after]
    log = await eventually(lambda: request_log(tables, event_id), lambda entries: len(entries) == 6)
    assert Counter(entry["user"] for entry in log) == {"alice": 2, "bob": 2, "mallory": 2}
    data = await eventually(lambda: report(tables, event_id, "user"), lambda d: d["totals"]["requests"] == 6)
    assert {row["key"]: row["requests"] for row in data["rows"]} == {"alice": 2, "bob": 2, "mallory": 2}
    service.wait_for_output("Table Storage refused the usage of request")


async def test_an_admission_whose_caller_left_while_it_queued_takes_no_slot(
    azurite: str, relay: StorageRelay, make_event: MakeEvent, tables: Tables
) -> None:
    """A request of an attendee that queues behind her previous one's admission write and is cancelled
    there (its client gone, or the function's timeout) is never admitted, and what its budget shard took
    is given back: before, the next write admitted it, and no one ever settled it."""
    created = await make_event(daily_requests=5, event_requests=5)
    event, day = created.event, datetime.now(UTC).date().isoformat()
    settings = Settings.from_env({"STORAGE_CONNECTION_STRING": relay.connection_string(azurite)}, need_upstream=False)
    relayed = Tables.create(settings, None)
    ledger, now = Ledger(relayed), datetime.now(UTC)
    try:
        slow = relay.arm(writes_row(event.id, f"{day}|alice"), "delay", delay=1.0)

        async def fired() -> int:
            return slow.fired

        first = asyncio.create_task(ledger.admit_all(event, "alice", now, 10, "first"))
        await eventually(fired, lambda count: count == 1, what="the first admission's write on its way")
        left = asyncio.create_task(ledger.admit_all(event, "alice", now, 10, "left"))
        for _ in range(10):  # let it queue: no I/O stands between it and the lock it waits for
            await asyncio.sleep(0)
        left.cancel()
        assert (await first).reserved
        with pytest.raises(asyncio.CancelledError):
            await left
        assert (await ledger.admit_all(event, "alice", now, 10, "third")).reserved
        await ledger.drain()
    finally:
        await relayed.aclose()
    entity = await tables.usage.get_entity(event.id, f"{day}|alice")
    assert sorted(inflight.decode(dict(entity))) == ["first", "third"] and entity["reserved"] == 2
    shards = await eventually(
        lambda: budget.read_shards(tables, event.id),
        lambda found: sum(shard["requests"] for shard in found.values()) == 2,
        what="the shard's slot given back",
    )
    assert sorted(rid for shard in shards.values() for rid in shard["inflight"]) == ["first", "third"]


async def test_requests_logged_in_one_row_whose_answer_is_lost_are_stored_once(
    relayed_app: str, relay: StorageRelay, make_event: MakeEvent, tables: Tables, simulator: str
) -> None:
    """Requests settled together share one request-log row (a pack, ``proxy.admission.requestlog``). Its
    transaction lands, its answer is lost, and it is sent again: refused on the pack (409), as on a request's
    own entry, its requests are stored. Each is logged once and counted once on its day."""
    created = await make_event(daily_requests=5)
    event_id, day = created.event.id, datetime.now(UTC).date().isoformat()
    users = [f"packed{i}" for i in range(12)]

    def served() -> int:
        return int(str(sim_stats(simulator)["requests"]))

    before = served()

    def settles(method: str, path: str, body: bytes) -> bool:
        return path.endswith("$batch") and event_id.encode() in body and b'"RowKey":"log|' in body

    def answered_all() -> None:  # the first settlement waits until upstream has answered every request
        deadline = time.monotonic() + 20
        while served() < before + len(users) and time.monotonic() < deadline:
            time.sleep(0.01)

    relay.arm(lambda method, path, body: settles(method, path, body) and b'"entries":' not in body, "before",
              before=answered_all)  # fmt: skip
    lost = relay.arm(lambda method, path, body: settles(method, path, body) and b'"entries":' in body, "drop")
    async with httpx.AsyncClient(timeout=30) as client:

        async def chat(user: str) -> httpx.Response:
            headers = {"api-key": created.key(user)}
            return await client.post(f"{relayed_app}/api/v1/chat/completions", json=CHAT, headers=headers)

        answers = await asyncio.gather(*(chat(user) for user in users))
    assert [a.status_code for a in answers] == [200] * len(users), [a.text for a in answers if a.status_code != 200]
    assert lost.fired == 1, lost.seen
    log = await request_log(tables, event_id)
    assert sorted(entry["request_id"] for entry in log) == sorted(a.headers["x-request-id"] for a in answers)
    rows = tables.usage.query_entities("PartitionKey eq @pk and RowKey ge 'log|' and RowKey lt 'log}'",
                                       parameters={"pk": event_id})  # fmt: skip
    assert any(["entries" in row async for row in rows])
    for user in users:
        entity = await tables.usage.get_entity(event_id, f"{day}|{user}")
        assert (entity["requests"], entity["reserved"], orjson.loads(entity["inflight"])) == (1, 1, {}), user
