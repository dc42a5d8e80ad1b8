"""Storage calls per attendee request, counted where they reach Azurite: the hot path at its floor.

An app (the real worker behind the host emulator) reaches Azurite through a relay
(``tests.relay``) that names every call it passes: ``read day``, ``write day``
(a replace under the cached ETag), ``insert day``, ``batch day+log`` (one entity
group transaction holding those rows), and so on. A request's calls are those the
relay sees between sending it and its answer (an answer waits for its usage to be
stored, ``proxy.ledger.usage``), so each test asserts exactly what one request
costs. Events, and the event's names with whether each holds a personal key (one
range query, ``read query``, per event: ``proxy.policy.keys``), are cached for a
minute here (``EVENT_CACHE_SECONDS``, 30 s by default), so each test's first request
(``warm``) pays those lookups and the requests it measures do not.

Admission's share (``proxy.admission``): one conditional write in the steady
state, at most two calls for an attendee's first request of the day or of all.
A second app, straight on Azurite, is another instance of the same deployment.
"""

from __future__ import annotations

import asyncio
import re
import threading
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote

import httpx
import orjson
import pytest
from azure.core.exceptions import ResourceNotFoundError

from proxy.ledger.reports import request_log
from proxy.policy.attendees import roster
from proxy.storage.tables import Tables
from tests.conftest import LENIENT, MakeEvent
from tests.relay import StorageRelay
from tests.support import app_env, eventually, start_app

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16}
_ENTITY = re.compile(r"/(\w+)\(PartitionKey='([^']*)',RowKey='([^']*)'\)")
_ROW_KEY = re.compile(rb'"RowKey":\s*"([^"]*)"')
_DAY = re.compile(r"\d{4}-\d\d-\d\d\|")
_VERBS = {"GET": "read", "PUT": "write", "MERGE": "merge", "PATCH": "merge", "DELETE": "delete", "POST": "insert"}


def row_kind(row: str) -> str:
    for prefix, kind in (("user|", "user"), ("log|", "log"), ("shard|", "shard")):
        if row.startswith(prefix):
            return kind
    return "day" if _DAY.match(row) else row


def name_call(method: str, path: str, body: bytes) -> str:
    """What a Table Storage call does, by the rows it touches: ``read day``, ``batch day+log``..."""
    path = unquote(path.split("?", 1)[0])
    if path.endswith("/$batch"):
        rows = sorted(row_kind(unquote(row.decode())) for row in _ROW_KEY.findall(body))
        return "batch " + "+".join(rows)
    found = _ENTITY.search(path)
    table = found.group(1) if found else path.rsplit("/", 1)[-1].split("(")[0]
    if found:
        kind = row_kind(found.group(3))
    elif method == "POST" and (rows := _ROW_KEY.findall(body)):
        kind = row_kind(rows[0].decode())
    else:
        kind = "query" if method == "GET" else "table"
    verb = _VERBS.get(method, method)
    return f"{verb} {kind}" if table == "proxyusage" else f"{verb} {table}:{kind}"


class Calls:
    """Every call the relay passes, named (``name_call``), in order of arrival."""

    def __init__(self, relay: StorageRelay) -> None:
        self.names: list[str] = []
        self._lock = threading.Lock()
        # Never fires (it matches nothing): it only watches, as a rule's match sees every call.
        relay.arm(self._record, "delay", times=10**9)

    def _record(self, method: str, path: str, body: bytes) -> bool:
        with self._lock:
            self.names.append(name_call(method, path, body))
        return False

    def since(self, mark: int) -> list[str]:
        with self._lock:
            return self.names[mark:]


@pytest.fixture(scope="module")
def counted(azurite: str, simulator: str) -> Iterator[tuple[Calls, str, str]]:
    """This app behind the counting relay, another instance straight on Azurite; timers off (no reconciler)."""
    port = int(azurite.split("TableEndpoint=http://127.0.0.1:")[1].split("/")[0])
    relay = StorageRelay(port)
    calls = Calls(relay)
    env = {"EVENT_CACHE_SECONDS": "60", **LENIENT}
    here, url = start_app(app_env(relay.connection_string(azurite), simulator, **env), "--timer-interval", "0")
    elsewhere, other = start_app(app_env(azurite, simulator, **env), "--timer-interval", "0")
    yield calls, url, other
    elsewhere.stop()
    here.stop()
    relay.close()


def cost(calls: Calls, app: str, credential: str) -> Counter[str]:
    """The storage calls of one chat request, from its sending to its answer."""
    mark = len(calls.since(0))
    answer = httpx.post(f"{app}/api/v1/chat/completions", json=CHAT, headers={"api-key": credential}, timeout=60)
    assert answer.status_code == 200, answer.text
    return Counter(calls.since(mark))


def admission(spent: Counter[str]) -> Counter[str]:
    """A request's calls before upstream: all but settlement (``batch ...+log``)."""
    return Counter({name: n for name, n in spent.items() if not name.endswith("+log")})


async def today(tables: Tables, event_id: str, user: str) -> tuple[int, int]:
    """The attendee's day today, as (requests reserved, requests recorded)."""
    day = datetime.now(UTC).strftime("%Y-%m-%d")
    entity = await tables.usage.get_entity(event_id, f"{day}|{user}")
    return entity["reserved"], entity["requests"]


async def test_steady_state_admits_with_one_conditional_write(counted: Any, make_event: MakeEvent) -> None:
    calls, app, _ = counted
    created = await make_event(daily_requests=1000, daily_tokens=10**9, tpm=10**9)
    cost(calls, app, created.key("amy"))
    spent = cost(calls, app, created.key("amy"))
    assert spent == Counter({"write day": 1, "batch day+log": 1}), spent


async def test_a_personal_key_costs_what_code_name_costs(counted: Any, make_event: MakeEvent) -> None:
    """A name registered with a personal key (``POST /api/v1/keys``) calls with the key: its first request reads
    the key (its index row, then the event and the name's row, which tells the roster the name is registered),
    then its day, not found, and inserts it; the next ones are one write."""
    calls, app, _ = counted
    created = await make_event(daily_requests=1000)
    registered = httpx.post(f"{app}/api/v1/keys", json={"code": created.code, "name": "kim"}, timeout=60)
    assert registered.status_code == 201, registered.text
    key = registered.json()["key"]
    first = cost(calls, app, key)
    lookup = [name for name in first.elements() if name.startswith("read proxyevents:")]
    assert len(lookup) == 2, first  # the key's index row, then the event (with the name's row, 'read user')
    assert first - Counter(lookup) == Counter({"read user": 1, "read day": 1, "insert day": 1, "batch day+log": 1})
    assert cost(calls, app, key) == Counter({"write day": 1, "batch day+log": 1})
    assert cost(calls, app, key) == Counter({"write day": 1, "batch day+log": 1})


async def test_a_new_attendee_costs_at_most_two_calls(counted: Any, make_event: MakeEvent) -> None:
    """The read of the name's row (not found: a new name), then its row and its first day in one transaction."""
    calls, app, _ = counted
    created = await make_event(daily_requests=1000)
    cost(calls, app, created.key("warm"))  # the event's own first lookups
    spent = cost(calls, app, created.key("newcomer"))
    before_upstream = spent - Counter({"batch day+log": 1})
    assert sum(before_upstream.values()) <= 2, f"a new attendee's first request before upstream: {spent}"
    assert before_upstream == Counter({"read user": 1, "batch day+user": 1}), spent
    assert cost(calls, app, created.key("newcomer")) == Counter({"write day": 1, "batch day+log": 1})


async def test_first_request_of_the_day_costs_two(counted: Any, make_event: MakeEvent, tables: Tables) -> None:
    """A name registered on an earlier day (here: by another instance, its day row then removed, which is what a
    new day looks like) is among the event's names this instance read: it reads its day, finds none, inserts it."""
    calls, app, other = counted
    created = await make_event(daily_requests=1000)
    cost(calls, other, created.key("dave"))
    day = datetime.now(UTC).strftime("%Y-%m-%d")
    await tables.usage.delete_entity(created.event.id, f"{day}|dave")
    cost(calls, app, created.key("warm"))
    spent = cost(calls, app, created.key("dave"))
    assert spent == Counter({"read day": 1, "insert day": 1, "batch day+log": 1}), spent
    assert cost(calls, app, created.key("dave")) == Counter({"write day": 1, "batch day+log": 1})


async def test_an_attendee_new_to_this_instance_costs_two(counted: Any, make_event: MakeEvent) -> None:
    """Active today on another instance: this one reads the day (its ETag), then writes under it."""
    calls, app, other = counted
    created = await make_event(daily_requests=1000)
    cost(calls, other, created.key("carol"))
    cost(calls, app, created.key("warm"))
    spent = cost(calls, app, created.key("carol"))
    assert spent == Counter({"read day": 1, "write day": 1, "batch day+log": 1}), spent


async def test_without_caps_admission_costs_nothing(counted: Any, make_event: MakeEvent, tables: Tables) -> None:
    """No day written before upstream: a new name's row alone, then nothing; settling inserts the new name's day
    without reading it (a name just registered has none), and later ones write it."""
    calls, app, _ = counted
    created = await make_event(daily_requests=None)
    cost(calls, app, created.key("warm"))
    first = cost(calls, app, created.key("nocap"))
    assert first == Counter({"read user": 1, "insert user": 1, "batch day+log": 1}), first
    assert cost(calls, app, created.key("nocap")) == Counter({"batch day+log": 1})
    assert await today(tables, created.event.id, "nocap") == (0, 2)
    assert sorted(await roster(tables, created.event.id)) == ["nocap", "warm"]


async def test_without_caps_a_new_name_whose_day_exists_after_all_counts_exactly(
    counted: Any, make_event: MakeEvent, tables: Tables
) -> None:
    """A name whose row is gone while its day is stored (another instance served it; its row then deleted) is
    taken for new here: the day's insert is refused (409), the day read and written under its ETag, and both
    requests counted once, each logged."""
    calls, app, other = counted
    created = await make_event(daily_requests=None)
    cost(calls, app, created.key("warm"))
    cost(calls, other, created.key("ghost"))
    await tables.usage.delete_entity(created.event.id, "user|ghost")
    spent = cost(calls, app, created.key("ghost"))
    assert spent == Counter({"read user": 1, "insert user": 1, "batch day+log": 2, "read day": 1}), spent
    assert await today(tables, created.event.id, "ghost") == (0, 2)
    logged = [entry for entry in await request_log(tables, created.event.id) if entry["user"] == "ghost"]
    assert len(logged) == 2, logged


async def test_an_event_budget_adds_one_write_beside_the_days(counted: Any, make_event: MakeEvent) -> None:
    """The shard of the event's budget is written concurrently with the attendee's day; its settlement is
    deferred to a write of its own a moment after the answer (or carried by the next admission)."""
    calls, app, _ = counted
    created = await make_event(daily_requests=1000, event_requests=100_000)

    async def settled_on_shard(spent: Counter[str], mark: int) -> Counter[str]:
        """``spent`` and what followed it, once the request's deferred settlement reached its shard."""

        async def since() -> Counter[str]:
            return Counter(calls.since(mark))

        return await eventually(since, lambda c: c["write shard"] > spent["write shard"], what="the shard settled")

    mark = len(calls.since(0))
    await settled_on_shard(cost(calls, app, created.key("warm")), mark)  # the worker's shard read and written
    mark = len(calls.since(0))
    spent = await settled_on_shard(cost(calls, app, created.key("fay")), mark)
    assert admission(spent) == Counter({"read user": 1, "batch day+user": 1, "write shard": 2}), spent  # 1 deferred
    mark = len(calls.since(0))
    spent = await settled_on_shard(cost(calls, app, created.key("fay")), mark)
    assert spent == Counter({"write day": 1, "write shard": 2, "batch day+log": 1}), spent


async def test_a_new_name_raced_on_two_instances_joins_once_and_counts_exactly(
    counted: Any, make_event: MakeEvent, tables: Tables
) -> None:
    """Both instances take the same new name's first requests at once, each sure the name is new: one
    transaction inserts the name, the others find it (409) and write the day alone; every request counts once."""
    _, app, other = counted
    created = await make_event(daily_requests=1000)
    per_app = 6
    async with httpx.AsyncClient(timeout=60) as client:
        answers = await asyncio.gather(
            *(
                client.post(f"{url}/api/v1/chat/completions", json=CHAT, headers={"api-key": created.key("racer")})
                for url in (app, other)
                for _ in range(per_app)
            )
        )
    assert [a.status_code for a in answers] == [200] * 2 * per_app, [a.text for a in answers if a.status_code != 200]
    assert await today(tables, created.event.id, "racer") == (2 * per_app, 2 * per_app)
    assert list(await roster(tables, created.event.id)) == ["racer"]


async def test_a_name_registered_elsewhere_since_the_names_were_read_costs_a_read_more(
    counted: Any, make_event: MakeEvent, tables: Tables
) -> None:
    """This instance read the event's names before another instance registered one and admitted its day: the
    name's first request here reads its row (found: nothing to insert), reads the day and writes it, once."""
    calls, app, other = counted
    created = await make_event(daily_requests=1000)
    cost(calls, app, created.key("warm"))
    cost(calls, other, created.key("late"))
    spent = cost(calls, app, created.key("late"))
    assert spent == Counter({"read user": 1, "read day": 1, "write day": 1, "batch day+log": 1}), spent
    assert await today(tables, created.event.id, "late") == (2, 2)
    assert sorted(await roster(tables, created.event.id)) == ["late", "warm"]


async def test_a_new_name_refused_by_its_caps_joins_all_the_same(
    counted: Any, make_event: MakeEvent, tables: Tables
) -> None:
    """Refused before any day is written (a daily cap of 0 requests): the name's row is stored alone, as a name
    that sent a request; no day row."""
    _, app, _ = counted
    created = await make_event(daily_requests=0)
    answer = httpx.post(f"{app}/api/v1/chat/completions", json=CHAT, headers={"api-key": created.key("greedy")})
    assert answer.status_code == 429 and answer.json()["error"]["code"] == "daily_request_cap_exceeded", answer.text
    assert list(await roster(tables, created.event.id)) == ["greedy"]
    day = datetime.now(UTC).strftime("%Y-%m-%d")
    with pytest.raises(ResourceNotFoundError):
        await tables.usage.get_entity(created.event.id, f"{day}|greedy")


async def test_requests_that_miss_the_event_cache_together_share_one_lookup(
    counted: Any, make_event: MakeEvent
) -> None:
    """16 first requests of an event at once (as when its cache entry expires under load): one lookup of the
    code, two point reads (its index row, then the event), not two per request; one read of its names."""
    calls, app, _ = counted
    created = await make_event(daily_requests=1000)
    mark = len(calls.since(0))
    async with httpx.AsyncClient(timeout=60) as client:
        answers = await asyncio.gather(
            *(
                client.post(f"{app}/api/v1/chat/completions", json=CHAT, headers={"api-key": created.key(f"crowd{i}")})
                for i in range(16)
            )
        )
    assert [a.status_code for a in answers] == [200] * 16
    lookups = [name for name in calls.since(mark) if name.startswith("read proxyevents:")]
    assert len(lookups) == 2, lookups
    assert calls.since(mark).count("read query") == 1  # the event's names, for the check for personal keys


def test_calls_are_named_by_the_rows_they_touch() -> None:
    """The relay's names, on calls as the lean client sends them (a name the tests above rely on)."""
    row = "/devstoreaccount1/proxyusage(PartitionKey='ev',RowKey='2026-12-03%7Cann')"
    assert name_call("GET", row, b"") == "read day"
    assert name_call("PUT", row, b"{}") == "write day"
    body = orjson.dumps({"PartitionKey": "ev", "RowKey": "user|ann"})
    assert name_call("POST", "/devstoreaccount1/proxyusage", body) == "insert user"
    batch = b'--b\r\n{"PartitionKey":"ev","RowKey":"log|2026-12-03|r1"}\r\n{"RowKey":"2026-12-03|ann"}\r\n'
    assert name_call("POST", "/devstoreaccount1/$batch", batch) == "batch day+log"
    assert (
        name_call("GET", "/devstoreaccount1/proxyevents(PartitionKey='code',RowKey='h')", b"") == "read proxyevents:h"
    )
