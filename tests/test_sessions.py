"""Chat sessions (``session_id``) through the real app: the SDK and curl send only the new message."""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from openai import OpenAI

from proxy.conversations.sessions import SessionLimits, Sessions, bounded, purge_expired
from proxy.ledger.reports import request_log
from proxy.storage.tables import Tables
from tests.conftest import MakeEvent
from tests.support import CODE_HASH_KEY, ORGANIZER_KEY, ROOT, Service, app_env, sim_stats, start_app

MODEL = "gpt-4o-mini"
SYSTEM = {"role": "system", "content": "You are a travel guide."}


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def upstream_messages(simulator: str) -> list[dict[str, Any]]:
    body: Any = sim_stats(simulator)["last_body"]
    assert "session_id" not in body  # never sent upstream
    return list(body["messages"])


def contents(messages: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(m["role"], m["content"]) for m in messages]


@pytest.fixture(scope="module")
def small_app(azurite: str, simulator: str) -> Iterator[Callable[[], str]]:
    """An app whose sessions keep 2 turns for 2 seconds, started on first use.

    Started from the test, after its events are stored: a start blocks the event loop for
    seconds, and the storage pool's idle connections do not survive it.
    """
    started: list[Service] = []

    def url() -> str:
        if not started:
            env = app_env(azurite, simulator, EVENT_CACHE_SECONDS="1", SESSION_MAX_TURNS="2", SESSION_TTL_SECONDS="2")
            started.append(start_app(env)[0])
        return started[0].ready_line.split("listening on ", 1)[1].removesuffix("/api")

    yield url
    for service in started:
        service.stop()


async def test_three_turns_with_the_sdk(app: str, simulator: str, make_event: MakeEvent, tables: Tables) -> None:
    created = await make_event()
    sdk = OpenAI(base_url=f"{app}/api/v1", api_key=created.key(), max_retries=0)
    session = {"session_id": "trip.planning-1"}

    first = sdk.chat.completions.create(model=MODEL, messages=[SYSTEM, user("Where to go?")], extra_body=session)  # type: ignore[list-item]
    answer1 = first.choices[0].message.content
    assert contents(upstream_messages(simulator)) == [("system", SYSTEM["content"]), ("user", "Where to go?")]

    chunks = sdk.chat.completions.create(
        model=MODEL,
        messages=[SYSTEM, user("And when?")],  # type: ignore[list-item]
        extra_body=session,
        stream=True,
    )
    answer2 = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert answer2 == answer1

    sdk.chat.completions.create(model=MODEL, messages=[SYSTEM, user("For how long?")], extra_body=session)  # type: ignore[list-item]
    # Upstream saw the whole conversation, the instructions once, first; the client sent only the new message.
    assert contents(upstream_messages(simulator)) == [
        ("system", SYSTEM["content"]),
        ("user", "Where to go?"),
        ("assistant", answer1),
        ("user", "And when?"),
        ("assistant", answer2),
        ("user", "For how long?"),
    ]
    # The kept turns are prompt tokens like any other, recorded from upstream's usage.
    log = await request_log(tables, created.event.id)
    prompts = [e["prompt_tokens"] for e in sorted(log, key=lambda e: e["time"])]
    assert len(prompts) == 3 and prompts[0] < prompts[1] < prompts[2]


async def test_sessions_are_private_to_attendee_and_event(app: str, simulator: str, make_event: MakeEvent) -> None:
    created, elsewhere = await make_event(), await make_event()
    session = {"session_id": "shared-name"}

    def ask(key: str, text: str) -> list[tuple[str, str]]:
        sdk = OpenAI(base_url=f"{app}/api/v1", api_key=key, max_retries=0)
        sdk.chat.completions.create(model=MODEL, messages=[user(text)], extra_body=session)  # type: ignore[list-item]
        return contents(upstream_messages(simulator))

    ask(created.key("alice"), "alice's secret")
    assert ask(created.key("bob"), "bob here") == [("user", "bob here")]
    assert ask(elsewhere.key("alice"), "alice elsewhere") == [("user", "alice elsewhere")]
    assert [m[1] for m in ask(created.key("alice"), "alice again")][::2] == ["alice's secret", "alice again"]


async def test_three_turns_with_curl_and_forgetting(app: str, simulator: str, make_event: MakeEvent) -> None:
    key = (await make_event()).key()

    def curl(text: str, session_id: str = "curl-1") -> dict[str, Any]:
        body = {"model": MODEL, "messages": [user(text)], "session_id": session_id}
        out = subprocess.run(
            [
                *("curl", "-sS", f"{app}/api/v1/chat/completions", "-H", f"api-key: {key}"),
                *("-H", "content-type: application/json", "-d", orjson.dumps(body).decode()),
            ],
            capture_output=True,
            check=True,
            timeout=30,
        )
        answer: dict[str, Any] = orjson.loads(out.stdout)
        return answer

    for text in ("one", "two", "three"):
        curl(text)
    assert [m for m in contents(upstream_messages(simulator)) if m[0] == "user"] == [
        ("user", "one"),
        ("user", "two"),
        ("user", "three"),
    ]

    with httpx.Client(timeout=30) as http:
        forgotten = http.delete(f"{app}/api/v1/sessions/curl-1", headers={"api-key": key})
        assert forgotten.status_code == 200 and forgotten.json()["deleted"] is True
        again = http.delete(f"{app}/api/v1/sessions/curl-1", headers={"api-key": key})
        assert again.status_code == 404 and again.json()["error"]["code"] == "not_found"
        bad = http.post(
            f"{app}/api/v1/chat/completions",
            json={"model": MODEL, "messages": [user("x")], "session_id": "no spaces/allowed"},
            headers={"api-key": key},
        )
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "session_id"
    curl("four")
    assert contents(upstream_messages(simulator)) == [("user", "four")]


async def test_bound_drops_oldest_turns_and_sessions_expire(
    small_app: Callable[[], str], simulator: str, make_event: MakeEvent
) -> None:
    key = (await make_event()).key()
    sdk = OpenAI(base_url=f"{small_app()}/api/v1", api_key=key, max_retries=0)
    for text in ("one", "two", "three", "four"):
        sdk.chat.completions.create(model=MODEL, messages=[user(text)], extra_body={"session_id": "s"})  # type: ignore[list-item]
    # Two turns kept: "one" was dropped before "four" went up.
    assert [m[1] for m in contents(upstream_messages(simulator)) if m[0] == "user"] == ["two", "three", "four"]
    await asyncio.sleep(2.5)
    sdk.chat.completions.create(model=MODEL, messages=[user("five")], extra_body={"session_id": "s"})  # type: ignore[list-item]
    assert contents(upstream_messages(simulator)) == [("user", "five")]


def test_character_bound_keeps_the_newest_turns() -> None:
    turn = [{"role": "user", "content": "x" * 100}, {"role": "assistant", "content": "y" * 100}]
    size = len(orjson.dumps(turn))
    limits = SessionLimits(max_turns=10, max_chars=3 * size, ttl_seconds=60)
    turns = [[{**m, "n": i} for m in turn] for i in range(5)]
    kept = bounded(turns, limits)
    assert [t[0]["n"] for t in kept] == [3, 4]  # three would be just over, with the numbers added
    assert bounded([[{"role": "user", "content": "z" * (4 * size)}]], limits) == []


async def test_session_id_is_refused_where_it_has_no_meaning(app: str, make_event: MakeEvent) -> None:
    key = (await make_event()).key()
    with httpx.Client(timeout=30) as http:
        embeddings = {"model": "text-embedding-3-small", "input": "x", "session_id": "s"}
        answer = http.post(f"{app}/api/v1/embeddings", json=embeddings, headers={"api-key": key})
        assert answer.status_code == 400 and answer.json()["error"]["param"] == "session_id"


async def test_expired_sessions_are_deleted_from_storage(
    small_app: Callable[[], str], make_event: MakeEvent, tables: Tables
) -> None:
    created = await make_event()
    for name in ("old", "fresh"):
        sdk = OpenAI(base_url=f"{small_app()}/api/v1", api_key=created.key(name), max_retries=0)
        sdk.chat.completions.create(model=MODEL, messages=[user("remember me")], extra_body={"session_id": "s"})  # type: ignore[list-item]
        sdk.close()
        if name == "old":
            old_answered = datetime.now(UTC)
            await asyncio.sleep(0.5)
    rows = tables.requests.query_entities("PartitionKey eq @pk", parameters={"pk": created.event.id})
    assert sorted([row["RowKey"] async for row in rows]) == ["session|fresh|s", "session|old|s"]
    # A moment when the old one has expired (stored before its answer, 2 s to live) and the fresh one not yet
    # (stored after the 0.5 s wait): chosen, not waited for, so a slow machine cannot expire the fresh one too.
    moment = old_answered + timedelta(seconds=2.25)
    assert await purge_expired(tables, moment) >= 1
    rows = tables.requests.query_entities("PartitionKey eq @pk", parameters={"pk": created.event.id})
    assert [row["RowKey"] async for row in rows] == ["session|fresh|s"]


async def test_turns_finishing_at_once_are_all_kept(app: str, simulator: str, make_event: MakeEvent) -> None:
    key = (await make_event()).key()

    async def turn(http: httpx.AsyncClient, text: str) -> None:
        body = {"model": MODEL, "messages": [user(text)], "session_id": "busy"}
        answer = await http.post(f"{app}/api/v1/chat/completions", json=body, headers={"api-key": key})
        assert answer.status_code == 200, answer.text

    async with httpx.AsyncClient(timeout=30) as http:
        await asyncio.gather(*(turn(http, f"message {n}") for n in range(5)))
        await turn(http, "last")
    sent = [text for role, text in contents(upstream_messages(simulator)) if role == "user"]
    # Written with conditional writes: a turn that lost a race was merged, not overwritten.
    assert sorted(sent[:-1]) == [f"message {n}" for n in range(5)] and sent[-1] == "last"


async def test_organizers_set_the_bound_per_event(app: str, simulator: str, azurite: str, tmp_path: Path) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    times = {"start": (now - timedelta(hours=1)).isoformat(), "end": (now + timedelta(hours=8)).isoformat()}
    auth = {"Authorization": f"Bearer {ORGANIZER_KEY}"}
    with httpx.Client(timeout=30) as http:
        answer = http.post(
            f"{app}/api/manage/events", json={"name": "Sessions", **times, "session_turns": 1}, headers=auth
        )
        assert answer.status_code == 201, answer.text
        event = answer.json()
        assert (event["session_turns"], event["session_chars"]) == (1, None)
        key = f"{event['code']}/alice"
        with OpenAI(base_url=f"{app}/api/v1", api_key=key, max_retries=0) as sdk:
            for text in ("one", "two", "three"):
                sdk.chat.completions.create(model=MODEL, messages=[user(text)], extra_body={"session_id": "s"})  # type: ignore[list-item]
        assert [text for role, text in contents(upstream_messages(simulator)) if role == "user"] == ["two", "three"]
        # Attendees see the bounds that apply to them; unset is the proxy's default.
        caps = http.get(f"{app}/api/v1/event", headers={"api-key": key}).json()["caps"]
        assert (caps["session_turns"], caps["session_chars"]) == (1, 60_000)

        url = f"{app}/api/manage/events/{event['id']}"
        refused = http.patch(url, json={"session_chars": 0}, headers=auth)
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "session_chars"
        patched = http.patch(url, json={"session_turns": None, "session_chars": 5000}, headers=auth).json()
        assert (patched["session_turns"], patched["session_chars"]) == (None, 5000)

    # The CLI takes the same fields.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AZURE_", "STORAGE_", "ORGANIZER_"))}
    env.update(PYTHONPATH=str(ROOT), STORAGE_CONNECTION_STRING=azurite, CODE_HASH_KEY=CODE_HASH_KEY)
    args = ["events", "create", "--name", "CLI sessions", "--start", times["start"], "--end", times["end"]]
    done = subprocess.run(
        [sys.executable, "-m", "proxy.manage", *args, "--session-turns", "3", "--session-chars", "900", "--json"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    created = orjson.loads(done.stdout)
    assert (created["session_turns"], created["session_chars"]) == (3, 900)


async def test_a_turn_saved_after_its_session_was_forgotten_starts_it_afresh(
    tables: Tables, make_event: MakeEvent
) -> None:
    """A turn in flight while its session is forgotten: saved alone (the forgotten history stays forgotten),
    not an error that loses the turn."""
    created = await make_event()
    sessions = Sessions(tables, SessionLimits(max_turns=10, max_chars=60_000, ttl_seconds=600))

    def asked(text: str) -> dict[str, Any]:
        return {"session_id": "forgotten", "messages": [{"role": "user", "content": text}]}

    first = await sessions.open(asked("one"), created.event, "alice")
    assert first is not None
    await sessions.save(first, {"role": "assistant", "content": "1"})
    second = await sessions.open(asked("two"), created.event, "alice")  # read the session, with its ETag
    assert second is not None and second.etag is not None
    assert await sessions.forget(created.event.id, "alice", "forgotten")
    await sessions.save(second, {"role": "assistant", "content": "2"})
    kept = await sessions.history(created.event.id, "alice", "forgotten")
    assert kept == [[{"role": "user", "content": "two"}, {"role": "assistant", "content": "2"}]]


async def test_turns_racing_deletes_lose_no_answered_write(app: str, make_event: MakeEvent, tables: Tables) -> None:
    """Turns and DELETEs of one session at once, through the app. A turn answered 200 is in the session
    unless a DELETE answered 200 ended after the turn was sent; a turn answered before a DELETE (answered
    200) was sent is gone; a DELETE answered 200 with nothing racing it leaves no session."""
    created = await make_event()
    headers = {"api-key": created.key()}
    stored = Sessions(tables, SessionLimits(max_turns=20, max_chars=60_000, ttl_seconds=600))
    rng = random.Random(18)
    Timed = tuple[str, float, float, httpx.Response]  # what, sent, answered, answer
    first_answer = asyncio.Event()  # set by each round's first turn answered

    async def timed(what: str, http: httpx.AsyncClient, after: asyncio.Event | None = None) -> Timed:
        if after is not None:
            await after.wait()
        await asyncio.sleep(rng.uniform(0, 0.06))  # jitter: turns land before, across and after the deletes
        sent = time.monotonic()
        if what == "delete":
            answer = await http.delete(f"{app}/api/v1/sessions/race", headers=headers)
        else:
            body = {"model": MODEL, "messages": [user(what)], "session_id": "race"}
            answer = await http.post(f"{app}/api/v1/chat/completions", json=body, headers=headers)
            first_answer.set()
        return what, sent, time.monotonic(), answer

    async def kept() -> set[str]:
        turns = await stored.history(created.event.id, "alice", "race")
        return {str(message["content"]) for turn in turns for message in turn if message["role"] == "user"}

    lost_to_deletes = 0
    async with httpx.AsyncClient(timeout=30) as http:
        for round_ in range(5):
            # One delete at any moment, one once a turn is answered: it has a saved turn to remove.
            first_answer = asyncio.Event()
            work = [timed(f"r{round_}-t{n}", http) for n in range(4)]
            done = await asyncio.gather(*work, timed("delete", http), timed("delete", http, after=first_answer))
            turns = [(what, sent, answered) for what, sent, answered, answer in done if what != "delete"]
            for what, _, _, answer in done:
                assert answer.status_code in ((200, 404) if what == "delete" else (200,)), answer.text
            deleted = [(sent, answered) for what, sent, answered, answer in done if what == "delete"
                       and answer.status_code == 200]  # fmt: skip
            present = await kept()
            for what, sent, answered in turns:
                if what not in present:  # lost, unless a delete answered 200 may have come after its save
                    assert any(end > sent for _, end in deleted), (what, present)
                    lost_to_deletes += 1
                if any(answered < start for start, _ in deleted):
                    assert what not in present, (what, present)
            assert present <= {what for what, _, _ in turns}  # the previous rounds' turns stay forgotten
            final = await http.delete(f"{app}/api/v1/sessions/race", headers=headers)
            assert final.status_code == (200 if present else 404), final.text
            assert await kept() == set()
            assert (await http.delete(f"{app}/api/v1/sessions/race", headers=headers)).status_code == 404
    assert lost_to_deletes >= 5  # each round's late delete removed a turn answered before it
