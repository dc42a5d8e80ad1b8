"""Personal keys (``proxy.policy.keys``) through the real app: registered, used by the official SDKs, claimed, reset."""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import socket
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import openai
import pytest
from openai import AzureOpenAI

from proxy.config.hashing import PERSONAL_KEY, SecretHasher
from proxy.storage.tables import Tables
from tests.conftest import MakeEvent
from tests.support import CACHE_SECONDS, CODE_HASH_KEY, ORGANIZER_KEY, Service, seen_within
from tests.test_guessing import client_at, strict_app, window  # noqa: F401 (the fixture: an app with the default throttle)
from tests.test_manage_cli import Cli, cli, ok  # noqa: F401 (the cli fixture)
from tests.test_responses import _close_clients, client  # noqa: F401 (the fixture closes the clients)

AUTH = {"Authorization": f"Bearer {ORGANIZER_KEY}"}
MODEL = "gpt-4o-mini"
HELLO = [{"role": "user", "content": "Hello"}]
KEY = re.compile(r"ek-[A-Za-z0-9_-]{32}")


def register(app: str, code: str, name: str, client: httpx.Client | None = None) -> httpx.Response:
    return (client or httpx).post(f"{app}/api/v1/keys", json={"code": code, "name": name}, timeout=30)


sdk = client  # an OpenAI client on the app with this key, closed after each test (tests.test_responses)


def error(response: httpx.Response) -> dict[str, Any]:
    body: dict[str, Any] = response.json()["error"]
    return body


async def test_a_key_works_wherever_code_and_name_do(app: str, make_event: MakeEvent) -> None:
    created = await make_event(name="Keys")
    answer = register(app, created.code, "alice")
    assert answer.status_code == 201 and answer.headers["cache-control"] == "no-store"
    body = answer.json()
    key = body.pop("key")
    assert KEY.fullmatch(key)
    assert body == {
        "name": "alice",
        "event_id": created.event.id,
        "event": "Keys",
        "starts_at": created.event.starts_at.isoformat(),
        "ends_at": created.event.ends_at.isoformat(),
    }
    client = sdk(app, key)
    chat = client.chat.completions.create(model=MODEL, messages=HELLO)  # type: ignore[arg-type]
    assert chat.choices[0].message.content
    streamed = client.chat.completions.create(model=MODEL, messages=HELLO, stream=True)  # type: ignore[arg-type]
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert client.embeddings.create(model="text-embedding-3-small", input="hi").data[0].embedding
    response = client.responses.create(model=MODEL, input="Hello")
    assert client.responses.retrieve(response.id).id == response.id
    with AzureOpenAI(azure_endpoint=f"{app}/api/v1", api_key=key, api_version="2024-10-21", max_retries=0) as azure:
        assert azure.chat.completions.create(model=MODEL, messages=HELLO).choices  # type: ignore[arg-type]
    # Each header that carries CODE/name carries a key, and the usage is the key's name's.
    for header in ({"api-key": key}, {"Authorization": f"Bearer {key}"}, {"openai-event-code": key}):
        info = httpx.get(f"{app}/api/v1/event", headers=header, timeout=30).json()
        assert info["user"] == "alice" and info["name"] == "Keys"
    assert info["usage_today"]["requests"] == 5  # chat, stream, embeddings, Responses, Azure chat
    listed = httpx.get(f"{app}/api/manage/events/{created.event.id}/attendees", headers=AUTH, timeout=30).json()
    assert [(a["user"], a["requests"], a["personal_key"]) for a in listed["data"]] == [("alice", 5, True)]


async def test_a_claimed_name_refuses_code_and_name(app: str, make_event: MakeEvent) -> None:
    created = await make_event()
    bob = sdk(app, created.key("bob"))
    assert bob.models.list().data  # an open event: CODE/name works ...
    squatter = sdk(app, created.key("alice"))
    assert squatter.models.list().data  # ... for any name, until it is claimed
    key = register(app, created.code, "alice").json()["key"]
    with pytest.raises(openai.AuthenticationError) as refused:
        squatter.chat.completions.create(model=MODEL, messages=HELLO)  # type: ignore[arg-type]
    assert refused.value.code == "personal_key_required"
    assert "personal key" in refused.value.message and key not in str(refused.value.body)
    again = register(app, created.code, "alice")
    assert again.status_code == 409 and error(again)["code"] == "name_taken"
    assert sdk(app, key).models.list().data
    assert bob.models.list().data  # other names are not affected


async def test_registration_refusals(app: str, make_event: MakeEvent) -> None:
    created = await make_event(blocked=("mallory",), max_attendees=1)
    cases = [
        ({"code": "Unknown-code-123", "name": "x"}, 401, "invalid_event_code", None),
        ({"code": created.code, "name": "mallory"}, 403, "attendee_blocked", None),
        ({"code": created.code, "name": "bad name"}, 400, "invalid_request", "name"),
        ({"code": "no", "name": "x"}, 400, "invalid_request", "code"),
        ({"code": created.code}, 400, "invalid_request", "name"),
    ]
    for body, status, code, param in cases:
        answer = httpx.post(f"{app}/api/v1/keys", json=body, timeout=30)
        assert (answer.status_code, error(answer)["code"], error(answer)["param"]) == (status, code, param), body
    assert register(app, created.code, "first").status_code == 201
    full = register(app, created.code, "second")
    assert full.status_code == 403 and error(full)["code"] == "attendee_limit_reached"
    closed = await make_event(starts_at=created.event.ends_at)
    early = register(app, closed.code, "early")
    assert early.status_code == 403 and error(early)["code"] == "event_not_started"


async def test_keys_of_one_attendee_or_event_reach_nothing_of_another(app: str, make_event: MakeEvent) -> None:
    first, second = await make_event(), await make_event()
    alice = sdk(app, register(app, first.code, "alice").json()["key"])
    bob = sdk(app, register(app, first.code, "bob").json()["key"])
    alice_elsewhere = sdk(app, register(app, second.code, "alice").json()["key"])  # same name, another event
    stored = alice.responses.create(model=MODEL, input="a secret plan")
    alice.chat.completions.create(model=MODEL, messages=HELLO, extra_body={"session_id": "default"})  # type: ignore[arg-type]
    for other in (bob, alice_elsewhere):
        with pytest.raises(openai.NotFoundError):
            other.responses.retrieve(stored.id)
        with pytest.raises(openai.NotFoundError):
            other.delete("/sessions/default", cast_to=object)
    assert alice.responses.retrieve(stored.id).id == stored.id
    # A claim holds in its own event only: CODE/alice still works in the other event for whoever is not keyed there.
    third = await make_event()
    assert sdk(app, third.key("alice")).models.list().data
    # Resetting alice in the second event leaves her first key alone.
    reset = httpx.post(f"{app}/api/manage/events/{second.event.id}/attendees/alice/reset-key", headers=AUTH, timeout=30)
    assert reset.json() == {"event_id": second.event.id, "user": "alice", "reset": True}
    assert alice.models.list().data


async def test_reset_key_revokes_at_once_and_the_name_registers_again(app: str, make_event: MakeEvent) -> None:
    created = await make_event()
    old = register(app, created.code, "alice").json()["key"]
    assert sdk(app, old).models.list().data  # cached on the worker now
    url = f"{app}/api/manage/events/{created.event.id}/attendees/alice/reset-key"
    assert httpx.post(url, headers=AUTH, timeout=30).json()["reset"] is True
    with pytest.raises(openai.AuthenticationError) as refused:
        sdk(app, old).models.list()
    assert refused.value.code == "invalid_event_code" and old not in str(refused.value.body)
    assert sdk(app, created.key("alice")).models.list().data  # unclaimed: CODE/alice again
    new = register(app, created.code, "alice")
    assert new.status_code == 201 and new.json()["key"] != old
    assert sdk(app, new.json()["key"]).models.list().data
    with pytest.raises(openai.AuthenticationError):
        sdk(app, old).models.list()
    assert httpx.post(url, headers=AUTH, timeout=30).json()["reset"] is True
    assert httpx.post(url, headers=AUTH, timeout=30).json()["reset"] is False  # nothing left to reset
    schema = httpx.get(f"{app}/api/manage/openapi.json", headers=AUTH, timeout=30).json()
    assert "post" in schema["paths"]["/events/{event_id}/attendees/{user}/reset-key"]
    assert "personal_key" in schema["components"]["schemas"]["Attendee"]["properties"]
    assert "attendee_keys" in schema["components"]["schemas"]["EventCreate"]["properties"]
    missing = httpx.post(f"{app}/api/manage/events/no-such-event/attendees/alice/reset-key", headers=AUTH, timeout=30)
    assert missing.status_code == 404


async def test_an_event_that_requires_keys(app: str, make_event: MakeEvent) -> None:
    created = await make_event(attendee_keys=True)
    with pytest.raises(openai.AuthenticationError) as refused:
        sdk(app, created.key("alice")).models.list()
    assert refused.value.code == "personal_key_required" and "/api/portal" in refused.value.message
    key = register(app, created.code, "alice").json()["key"]
    assert sdk(app, key).models.list().data
    # Organizers switch it off and on.
    url = f"{app}/api/manage/events/{created.event.id}"
    assert httpx.patch(url, json={"attendee_keys": False}, headers=AUTH, timeout=30).json()["attendee_keys"] is False
    bob = {"api-key": created.key("bob")}
    seen_within(CACHE_SECONDS, lambda: httpx.get(f"{app}/api/v1/models", headers=bob), status(200), "keys off")
    assert httpx.patch(url, json={"attendee_keys": "yes"}, headers=AUTH, timeout=30).status_code == 400


def status(code: int) -> Callable[[httpx.Response], bool]:
    return lambda answer: answer.status_code == code


async def test_registration_is_exact_across_two_processes(
    app: str, app_process: tuple[Service, str], make_event: MakeEvent, tables: Tables
) -> None:
    """50 registrations of one name at once, over two app processes, give one key; 200 names for 100 places give
    exactly 100 keys."""
    urls = [app, app_process[1]]
    one = await make_event()
    # A connection per request: one httpx.Client shared by 50 threads broke under load (EBADF in httpcore's pool).
    with ThreadPoolExecutor(50) as pool:
        same = list(pool.map(lambda i: register(urls[i % 2], one.code, "alice"), range(50)))
        assert sorted(a.status_code for a in same) == [201] + [409] * 49
        key = next(a.json()["key"] for a in same if a.status_code == 201)
        assert all(error(a)["code"] == "name_taken" for a in same if a.status_code == 409)
        for url in urls:
            assert httpx.get(f"{url}/api/v1/event", headers={"api-key": key}).json()["user"] == "alice"

        limited = await make_event(max_attendees=100)
        names = [f"n{i:03d}-{secrets.token_hex(2)}" for i in range(200)]
        answers = list(pool.map(lambda i: register(urls[i % 2], limited.code, names[i]), range(200)))
    statuses = [a.status_code for a in answers]
    assert statuses.count(201) == 100 and statuses.count(403) == 100, sorted(set(statuses))
    assert {error(a)["code"] for a in answers if a.status_code == 403} == {"attendee_limit_reached"}
    listed = httpx.get(f"{app}/api/manage/events/{limited.event.id}/attendees", headers=AUTH, timeout=30).json()
    keyed = {a["user"] for a in listed["data"] if a["personal_key"]}
    assert listed["count"] == 100 and keyed == {names[i] for i, a in enumerate(answers) if a.status_code == 201}


async def test_a_reset_reaches_another_process_within_its_cache_lifetime(
    app: str, app_process: tuple[Service, str], make_event: MakeEvent
) -> None:
    """The other process cached the key (EVENT_CACHE_SECONDS=1 in these apps): refused within that bound."""
    created = await make_event()
    key = register(app, created.code, "alice").json()["key"]
    other = app_process[1]
    assert httpx.get(f"{other}/api/v1/models", headers={"api-key": key}).status_code == 200
    reset = httpx.post(f"{app}/api/manage/events/{created.event.id}/attendees/alice/reset-key", headers=AUTH)
    assert reset.json()["reset"] is True
    seen_within(
        CACHE_SECONDS, lambda: httpx.get(f"{other}/api/v1/models", headers={"api-key": key}), status(401), "reset"
    )
    assert key not in app_process[0].text  # nor in any access line


async def test_a_reset_racing_uses_and_registrations(app: str, make_event: MakeEvent) -> None:
    """Requests with the key while it is reset and the name registered again: each answer is the old key's
    200 before the reset or a 401 after, never a 5xx; afterwards only the new key works."""
    created = await make_event()
    old = register(app, created.code, "alice").json()["key"]
    url = f"{app}/api/manage/events/{created.event.id}/attendees/alice/reset-key"
    with ThreadPoolExecutor(16) as pool:  # a connection per request, as above
        uses = [pool.submit(httpx.get, f"{app}/api/v1/models", headers={"api-key": old}, timeout=60) for _ in range(30)]
        reset = pool.submit(httpx.post, url, headers=AUTH, timeout=60)
        again = [pool.submit(register, app, created.code, "alice") for _ in range(5)]
        statuses = {f.result().status_code for f in uses}
        assert statuses <= {200, 401} and reset.result().status_code == 200
        registered = [f.result() for f in again]
    winners = [a for a in registered if a.status_code == 201]
    assert len(winners) <= 1 and {a.status_code for a in registered} <= {201, 409}
    assert httpx.get(f"{app}/api/v1/models", headers={"api-key": old}).status_code == 401
    if winners:
        assert httpx.get(f"{app}/api/v1/models", headers={"api-key": winners[0].json()["key"]}).status_code == 200


def test_wrong_codes_at_registration_count_as_failed_lookups(strict_app: str) -> None:  # noqa: F811
    created = httpx.post(f"{strict_app}/api/manage/events", json={"name": "Guess", **window()}, headers=AUTH).json()
    with client_at("127.0.0.4") as guesser:
        guesses = [register(strict_app, f"Wrong{i:04d}xyz", "mallory", guesser).status_code for i in range(10)]
        assert guesses == [401] * 10
        right = register(strict_app, created["code"], "mallory", guesser)  # the right code: the same 429 (no oracle)
        assert right.status_code == 429 and error(right)["code"] == "rate_limited"
        chat = guesser.get(f"{strict_app}/api/v1/models", headers={"api-key": f"{created['code']}/mallory"})
        assert chat.status_code == 429  # the registrations' failures count for every route
    assert register(strict_app, created["code"], "alice").status_code == 201  # others are not affected


def test_guessed_keys_are_throttled_and_learn_nothing(strict_app: str) -> None:  # noqa: F811
    created = httpx.post(f"{strict_app}/api/manage/events", json={"name": "Keys", **window()}, headers=AUTH).json()
    alice = register(strict_app, created["code"], "alice").json()["key"]
    carol = register(strict_app, created["code"], "carol").json()["key"]
    models = f"{strict_app}/api/v1/models"
    assert httpx.get(models, headers={"api-key": alice}).status_code == 200  # the worker has seen it in use
    with client_at("127.0.0.5") as guesser:
        assert guesser.get(models, headers={"api-key": carol}).status_code == 200  # carol shares the address

        def guess() -> httpx.Response:
            return guesser.get(models, headers={"api-key": "ek-" + secrets.token_urlsafe(24)})

        first = [guess() for _ in range(10)]
        assert {(a.status_code, error(a)["code"]) for a in first} == {(401, "invalid_event_code")}
        assert all("ek-" not in error(a)["message"] for a in first)
        before, right, after = guess(), guesser.get(models, headers={"api-key": alice}), guess()
        assert right.status_code == before.status_code == after.status_code == 429
        assert right.content in (before.content, after.content)
        assert guesser.get(models, headers={"api-key": carol}).status_code == 200  # used before the throttle


def test_registration_takes_small_bodies_only(app: str) -> None:
    big = httpx.post(f"{app}/api/v1/keys", json={"code": "x" * 5000, "name": "a"}, timeout=30)
    assert big.status_code == 413 and error(big)["code"] == "request_too_large"


async def test_only_a_keyed_hash_of_the_key_is_stored(app: str, make_event: MakeEvent, tables: Tables) -> None:
    created = await make_event()
    key = register(app, created.code, "alice").json()["key"]
    row = await tables.usage.get_entity(created.event.id, "user|alice")
    assert row["key_hash"] == SecretHasher(CODE_HASH_KEY).hash(PERSONAL_KEY, key)
    assert row["key_hash"] != hashlib.sha256(key.encode()).hexdigest()
    index = await tables.events.get_entity("key", row["key_hash"])
    assert (index["event_id"], index["user"]) == (created.event.id, "alice")
    stored = [
        dict(e) async for e in tables.usage.query_entities("PartitionKey eq @pk", parameters={"pk": created.event.id})
    ]
    stored += [dict(e) async for e in tables.events.query_entities("PartitionKey eq 'key'")]
    assert stored and not any(key in str(entity) or key[3:] in str(entity) for entity in stored)


def test_the_cli_requires_lists_and_resets_keys(cli: Cli, app: str) -> None:  # noqa: F811
    created = ok(cli("events", "create", "--name", "CLI keys", *window_options(), "--attendee-keys", "--json"))
    event_id, code = created["id"], created["code"]
    assert created["attendee_keys"] is True
    models = f"{app}/api/v1/models"
    refused = httpx.get(models, headers={"api-key": f"{code}/alice"}, timeout=30)
    assert refused.status_code == 401 and error(refused)["code"] == "personal_key_required"
    key = register(app, code, "alice").json()["key"]
    assert httpx.get(models, headers={"api-key": key}, timeout=30).status_code == 200
    listed = ok(cli("attendees", "list", event_id, "--json"))
    assert [(a["user"], a["personal_key"]) for a in listed["data"]] == [("alice", True)]
    assert "PERSONAL KEY" in cli("attendees", "list", event_id).stdout
    assert ok(cli("attendees", "reset-key", event_id, "alice", "--json")) == {
        "event_id": event_id, "user": "alice", "reset": True,
    }  # fmt: skip
    assert "no personal key" in cli("attendees", "reset-key", event_id, "alice").stdout
    # The CLI is not the app: the app lets the key go within its cache lifetime (1 s here).
    seen_within(CACHE_SECONDS, lambda: httpx.get(models, headers={"api-key": key}, timeout=30), status(401), "reset")
    assert ok(cli("events", "update", event_id, "--attendee-keys", "false", "--json"))["attendee_keys"] is False
    assert ok(cli("events", "show", event_id, "--json"))["attendee_keys"] is False


def window_options() -> list[str]:
    now = datetime.now(UTC).replace(microsecond=0)
    return ["--start", (now - timedelta(hours=1)).isoformat(), "--end", (now + timedelta(hours=8)).isoformat()]


async def test_clients_that_hang_up_while_registering(app: str, make_event: MakeEvent) -> None:
    """A client that leaves mid-body registers nothing; one that leaves before its answer may have claimed the
    name (the key it never read is then lost: the organizer's reset frees the name). Never a 5xx, never two keys."""
    created = await make_event()
    host, port = app.removeprefix("http://").split(":")

    def send(raw: bytes) -> None:
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(raw)  # and close at once, without reading

    def request(name: str, cut: int | None = None) -> bytes:
        body = json.dumps({"code": created.code, "name": name}).encode()
        head = f"POST /api/v1/keys HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        raw = head.encode() + f"Content-Length: {len(body)}\r\n\r\n".encode() + body
        return raw if cut is None else raw[: len(raw) - len(body) + cut]

    for i in range(5):
        send(request(f"half{i}", cut=10))
        send(request(f"left{i}"))
    for i in range(5):
        assert register(app, created.code, f"half{i}").status_code == 201  # nothing was registered
        answer = register(app, created.code, f"left{i}")
        if answer.status_code == 409:  # the claim landed before the client left: the organizer frees the name
            url = f"{app}/api/manage/events/{created.event.id}/attendees/left{i}/reset-key"
            assert httpx.post(url, headers=AUTH, timeout=30).json()["reset"] is True
            answer = register(app, created.code, f"left{i}")
        assert answer.status_code == 201
        key = answer.json()["key"]
        assert httpx.get(f"{app}/api/v1/event", headers={"api-key": key}, timeout=30).json()["user"] == f"left{i}"


async def test_blocking_works_on_a_keyed_name(app: str, make_event: MakeEvent) -> None:
    created = await make_event()
    key = register(app, created.code, "alice").json()["key"]
    chat = f"{app}/api/v1/chat/completions"
    body = {"model": MODEL, "messages": HELLO}
    assert httpx.post(chat, json=body, headers={"api-key": key}, timeout=30).status_code == 200
    url = f"{app}/api/manage/events/{created.event.id}/attendees/alice"
    assert httpx.patch(url, json={"blocked": True}, headers=AUTH, timeout=30).status_code == 200

    def send() -> httpx.Response:
        return httpx.post(chat, json=body, headers={"api-key": key}, timeout=30)

    blocked = seen_within(CACHE_SECONDS, send, status(403), "the block")
    assert error(blocked)["code"] == "attendee_blocked"  # within EVENT_CACHE_SECONDS, as for CODE/name
    assert httpx.patch(url, json={"blocked": False}, headers=AUTH, timeout=30).status_code == 200
    seen_within(CACHE_SECONDS, send, status(200), "the unblock")
