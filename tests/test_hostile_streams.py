"""Clients that hang up at any byte: a request that reached Azure OpenAI is charged, and no record is lost.

Raw-socket clients send chat streams, chat streams with ``session_id``,
Responses streams, embeddings and answers that are not streamed, and close
the connection after a random number of bytes of the answer (none at all,
some, or all but the end). After each run, at the simulator (which counts the
model calls by the ``user`` the proxy sends, one pseudonym per attendee, and
stops a stream whose client left, as Azure does) and in storage:

- model calls per attendee and day never exceed the daily request cap, nor an
  event's calls its request budget;
- every model call is in the request log, with tokens (upstream's, or the
  estimate, marked ``estimated``);
- the usage report (the attendees' days) equals the log;
- no slot stays reserved: each day's ``reserved`` is its requests that kept
  their slot, and nothing is left in flight.

Besides: a daily token cap against streams left at their first byte, an event
token budget against a chain of ``previous_response_id``, and the ending path
itself cancelled while it saves a session's turn (in process, real storage).
"""

from __future__ import annotations

import asyncio
import functools
import json
import random
import socket
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from proxy.admission import inflight
from proxy.admission.limits import Ledger
from proxy.config.prices import PriceTable
from proxy.conversations.sessions import SessionLimits, Sessions
from proxy.ledger.ending import Answer
from proxy.ledger.reports import report, request_log
from proxy.ledger.usage import UsageRecord, UsageRecorder
from proxy.storage.tables import Tables
from proxy.upstream.payload import pseudonym
from tests.conftest import LENIENT, MakeEvent, NewEvent
from tests.support import Service, app_env, eventually, sim_stats, start_app, start_simulator

CHAT = "/api/v1/chat/completions"
MODEL = "gpt-4o-mini"
LEASE_SECONDS = 5
# The lease must outlive functionTimeout (proxy.config.settings): a short lease goes with a short timeout.
FUNCTION_TIMEOUT = {"AzureFunctionsJobHost__functionTimeout": "00:00:04"}
# kind: (path, body); each answer takes a few hundred milliseconds to stream, so hang-ups land mid-way.
KINDS: dict[str, tuple[str, dict[str, Any]]] = {
    "stream": (CHAT, {"model": MODEL, "messages": [{"role": "user", "content": "Tell me"}], "stream": True}),
    "session": (
        CHAT,
        {"model": MODEL, "messages": [{"role": "user", "content": "Go on"}], "stream": True, "session_id": "s1"},
    ),
    "responses": ("/api/v1/responses", {"model": MODEL, "input": "Tell me", "stream": True}),
    "embeddings": ("/api/v1/embeddings", {"model": "text-embedding-3-small", "input": "hang up on me"}),
    "chat": (CHAT, {"model": MODEL, "messages": [{"role": "user", "content": "Tell me"}]}),
}


@pytest.fixture(scope="module")
def slow_simulator() -> Iterator[str]:
    service, url = start_simulator("--tokens-per-second", "100", "--completion-tokens", "30")
    yield url
    service.stop()


@pytest.fixture(scope="module")
def hostile_app(azurite: str, slow_simulator: str) -> Iterator[tuple[Service, str]]:
    env = app_env(azurite, slow_simulator, RESERVATION_LEASE_SECONDS=str(LEASE_SECONDS), **FUNCTION_TIMEOUT, **LENIENT)
    service, url = start_app(env, "--timer-interval", "1")
    yield service, url
    service.stop()


def hang_up(url: str, key: str, path: str, body: dict[str, Any], until: int | bytes | None) -> bytes:
    """Send one request over a raw socket; close it once ``until`` bytes of the answer came, or those very
    bytes (None: read it all)."""
    address = httpx.URL(url)
    payload = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {address.host}:{address.port}\r\napi-key: {key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
    )
    received = b""
    with socket.create_connection((address.host, address.port), timeout=30) as connection:
        connection.sendall(head.encode() + payload)
        while not (until in received if isinstance(until, bytes) else until is not None and len(received) >= until):
            wanted = until - len(received) if isinstance(until, int) else 65536
            data = connection.recv(max(1, min(65536, wanted)))
            if not data:
                break
            received += data
    return received


def hostile_run(url: str, event: NewEvent, users: dict[str, str], requests: int, seed: int) -> None:
    """Each attendee (name: kind) sends ``requests`` requests, two at a time, hanging up at random bytes."""

    def connection(user: str, kind: str, count: int, chooser: random.Random) -> None:
        path, body = KINDS[kind]
        for _ in range(count):
            after = chooser.choice([0, 1, chooser.randrange(1, 3000), chooser.randrange(1, 3000), None])
            hang_up(url, event.key(user), path, body, after)

    threads = [
        threading.Thread(
            target=connection, args=(user, kind, (requests + half) // 2, random.Random(seed + 2 * index + half))
        )
        for index, (user, kind) in enumerate(users.items())
        for half in (0, 1)
    ]
    for thread in threads:
        thread.daemon = True
        thread.start()
    for thread in threads:
        thread.join(120)


def keeps_slot(status: int) -> bool:
    """The rule: an answer delivered, or one whose client left after upstream had it (499), keeps its slot."""
    return 200 <= status < 300 or status == 499


async def counters(tables: Tables, event_id: str) -> list[dict[str, Any]]:
    """The event's attendee days and budget shards."""
    rows = tables.usage.query_entities(
        "PartitionKey eq @pk and ( RowKey lt @log or RowKey ge @shard )",
        parameters={"pk": event_id, "log": "log|", "shard": "shard|"},
    )
    return [row async for row in rows]


async def check_invariants(
    tables: Tables, simulator: str, event: NewEvent, users: list[str], cap: int | None, budget: int | None = None
) -> dict[str, Any]:
    """The invariants of the module docstring, once every record is stored; the figures."""
    calls: dict[str, int] = dict(sim_stats(simulator)["by_user"])  # type: ignore[arg-type]
    made = {user: calls.get(pseudonym(event.event.id, user), 0) for user in users}
    for user, count in made.items():
        assert cap is None or count <= cap, f"{user}: {count} model calls with a daily cap of {cap}"
    assert budget is None or sum(made.values()) <= budget, f"{sum(made.values())} calls on a budget of {budget}"

    def logged_all(log: list[dict[str, Any]]) -> bool:
        return all(sum(1 for e in log if e["user"] == user) >= count for user, count in made.items())

    log = await eventually(
        lambda: request_log(tables, event.event.id), logged_all, timeout=30, what="every model call in the log"
    )
    for user, count in made.items():
        entries = [e for e in log if e["user"] == user]
        assert len(entries) == count, f"{user}: {count} model calls, {len(entries)} logged"
        for entry in entries:
            assert entry["prompt_tokens"] > 0 and entry["total_tokens"] >= entry["prompt_tokens"], entry
            assert not entry["estimated"] or entry["status"] == 499, entry

    def settled(rows: list[dict[str, Any]]) -> bool:
        shards = [row for row in rows if row["RowKey"].startswith("shard|")]
        attendee_days = [row for row in rows if "day" in row and "user" in row]
        for row in shards + attendee_days:
            if any(not inflight.released(entry) for entry in inflight.decode(dict(row)).values()):
                return False  # still in flight
        for row in attendee_days:
            kept = sum(1 for e in log if e["user"] == row["user"] and keeps_slot(e["status"]))
            if cap is not None and row["reserved"] != kept:
                return False
        kept = sum(1 for e in log if keeps_slot(e["status"]))
        return budget is None or sum(int(shard["requests"]) for shard in shards) == kept

    await eventually(
        lambda: counters(tables, event.event.id), settled, timeout=3 * LEASE_SECONDS + 10, what="no slot held"
    )
    data = await report(tables, event.event.id, "user")
    assert data["totals"]["requests"] == len(log)
    assert data["totals"]["total_tokens"] == sum(e["total_tokens"] for e in log)
    for row in data["rows"]:
        assert row["requests"] == sum(1 for e in log if e["user"] == row["key"])
        assert row["total_tokens"] == sum(e["total_tokens"] for e in log if e["user"] == row["key"])
    return {
        "calls": made,
        "logged": len(log),
        "estimated": sum(1 for e in log if e["estimated"]),
        "client_gone": sum(1 for e in log if e["status"] == 499),
    }


@pytest.mark.timeout(120)
async def test_hang_ups_at_any_byte_are_charged_and_capped(
    hostile_app: tuple[Service, str], slow_simulator: str, make_event: MakeEvent, tables: Tables
) -> None:
    _, url = hostile_app
    cap, requests = 3, 8
    event = await make_event(daily_requests=cap)
    users = {f"{kind}-hostile": kind for kind in KINDS}
    hostile_run(url, event, users, requests, seed=1)
    figures = await check_invariants(tables, slow_simulator, event, list(users), cap)
    # Every attendee sent more than the cap: each used it up, whatever its client did.
    assert figures["calls"] == dict.fromkeys(users, cap), figures
    print(f"\n{len(users)} attendees x {requests} hostile requests, daily cap {cap}: {figures}")


@pytest.mark.timeout(120)
async def test_hang_ups_cannot_pass_the_event_request_budget(
    hostile_app: tuple[Service, str], slow_simulator: str, make_event: MakeEvent, tables: Tables
) -> None:
    _, url = hostile_app
    budget, requests = 6, 5
    event = await make_event(event_requests=budget)
    users = {f"budget-{index}": "stream" for index in range(3)}
    hostile_run(url, event, users, requests, seed=2)
    figures = await check_invariants(tables, slow_simulator, event, list(users), None, budget)
    assert sum(figures["calls"].values()) == budget, figures
    print(f"\n3 attendees x {requests} hostile streams, event budget {budget}: {figures}")


@pytest.mark.timeout(120)
async def test_session_streams_left_while_their_turn_is_saved_are_recorded(
    hostile_app: tuple[Service, str], slow_simulator: str, make_event: MakeEvent, tables: Tables
) -> None:
    """The client leaves once upstream's usage came, while the proxy stores the turn before ``[DONE]``."""
    _, url = hostile_app
    event = await make_event()
    path, body = KINDS["session"]
    body = {**body, "stream_options": {"include_usage": True}}
    streams = 10
    for _ in range(streams):
        answer = hang_up(url, event.key("leaver"), path, body, b'"usage":{')
        assert b"[DONE]" not in answer
    figures = await check_invariants(tables, slow_simulator, event, ["leaver"], None)
    assert figures["calls"] == {"leaver": streams} and figures["logged"] == streams, figures
    # Each charged upstream's usage (the client saw it, so the proxy had read it); each answer that
    # upstream completed before the client left (status 200) has its turn kept.
    log = await request_log(tables, event.event.id)
    assert not any(entry["estimated"] for entry in log)
    kept = await Sessions(tables, SessionLimits(50, 10**6, 3600)).history(event.event.id, "leaver", "s1")
    assert len(kept) == sum(1 for entry in log if entry["status"] == 200)
    print(f"\n{streams} session streams left before [DONE]: {figures}, {len(kept)} turns kept")


@pytest.mark.timeout(120)
async def test_chained_responses_cannot_pass_the_event_token_budget(
    hostile_app: tuple[Service, str], make_event: MakeEvent, tables: Tables
) -> None:
    """``previous_response_id`` makes upstream prepend the whole chain: the estimate counts it, so the budget holds."""
    _, url = hostile_app
    budget = 3000
    event = await make_event(event_tokens=budget, max_tokens=12)
    previous: str | None = None
    answers = 0
    with httpx.Client(timeout=30) as http:
        for _ in range(100):
            body: dict[str, Any] = {"model": MODEL, "input": "And then?"}
            if previous is not None:
                body["previous_response_id"] = previous
            response = http.post(f"{url}/api/v1/responses", json=body, headers={"api-key": event.key("chainer")})
            if response.status_code != 200:
                break
            previous, answers = response.json()["id"], answers + 1
    assert response.status_code == 429 and response.json()["error"]["code"] == "event_budget_exhausted"
    data = await report(tables, event.event.id, "user")
    used = data["totals"]["total_tokens"]
    assert used <= budget, f"{used} tokens charged on a budget of {budget}"
    print(f"\n{answers} chained responses: {used} tokens of an event budget of {budget}")


@pytest.mark.timeout(120)
async def test_hang_ups_cannot_pass_the_daily_token_cap(
    hostile_app: tuple[Service, str], slow_simulator: str, make_event: MakeEvent, tables: Tables
) -> None:
    """A stream left at its first bytes still costs its prompt: the token cap stops the calls."""
    _, url = hostile_app
    cap, requests = 300, 20
    event = await make_event(daily_tokens=cap)
    path, body = KINDS["stream"]
    for _ in range(requests):
        hang_up(url, event.key("taker"), path, body, 1)
    figures = await check_invariants(tables, slow_simulator, event, ["taker"], None)
    # Each call is charged at least its prompt, counted from a body larger than the client's.
    least = len(json.dumps(body, separators=(",", ":"))) // 4
    assert figures["calls"]["taker"] <= cap // least + 1, figures
    data = await report(tables, event.event.id, "user")
    print(f"\n{requests} streams left at their first byte, daily tokens {cap}: {figures}, {data['totals']}")


async def test_a_cancelled_ending_still_stores_the_turn_and_the_record(make_event: MakeEvent, tables: Tables) -> None:
    """The path every answer ends by (``Answer.complete``), cancelled while it saves a session's turn.

    In process, with real storage: this is what a non-streamed answer with ``session_id`` (or a
    Responses answer storing its owner) does before its body goes out, whoever cancels it.
    """
    event = await make_event()
    ledger = Ledger(tables)
    recorder = UsageRecorder(tables, ledger, PriceTable.load())
    sessions = Sessions(tables, SessionLimits(20, 60_000, 3600))
    payload: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "session_id": "cut"}
    turn = await sessions.open(payload, event.event, "canceller")
    assert turn is not None
    now = datetime.now(UTC)
    admission = await ledger.admit(event.event, "canceller", now, 10, "cancelled-ending")
    record = UsageRecord(event.event.id, "canceller", MODEL, "chat", False, admission, "cancelled-ending", now)
    record.reached_upstream, record.status = True, 200
    body = json.dumps({"choices": [{"message": {"role": "assistant", "content": "Hello"}}]}).encode()
    record.take_usage({"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6})
    ending = asyncio.ensure_future(Answer(record, recorder, None).complete(functools.partial(turn.keep, 200, body)))
    # Two turns of the loop, no I/O: the ending has started its task, which has begun the turn's write and waits for
    # its answer. (A timed sleep could let the whole ending finish first on a fast machine: nothing to cancel.)
    for _ in range(2):
        await asyncio.sleep(0)
    assert not ending.done()
    ending.cancel()
    with pytest.raises(asyncio.CancelledError):
        await ending
    log = await eventually(lambda: request_log(tables, event.event.id), lambda entries: len(entries) == 1)
    assert (log[0]["request_id"], log[0]["status"], log[0]["total_tokens"]) == ("cancelled-ending", 200, 6)
    assert await sessions.history(event.event.id, "canceller", "cut") == [
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    ]
