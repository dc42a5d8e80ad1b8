"""Codes are stored as keyed hashes, and neither a code nor any hash of it reaches a log line, even at DEBUG."""

from __future__ import annotations

import asyncio
import hashlib
import secrets
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from azure.core.exceptions import ResourceNotFoundError

from proxy.config.hashing import EVENT_CODE, ORGANIZER_ACCOUNT_KEY, PERSONAL_KEY, SecretHasher, legacy_sha256
from proxy.config.settings import Settings, SettingsError
from proxy.errors import NotFound
from proxy.policy.attendees import Roster
from proxy.policy.events import Event, EventStore, new_event_id
from proxy.policy.keys import PersonalKeys
from proxy.storage.tables import Tables
from tests.support import CODE_HASH_KEY, ORGANIZER_KEY, Service, app_env, start_app

AUTH = {"Authorization": f"Bearer {ORGANIZER_KEY}"}
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


def window() -> dict[str, str]:
    now = datetime.now(UTC)
    return {"start": (now - timedelta(hours=1)).isoformat(), "end": (now + timedelta(hours=2)).isoformat()}


def forms(secret: str, purpose: str = EVENT_CODE) -> list[str]:
    """Every form of a code (or key) that must never be logged: itself, plain SHA-256s of it, its keyed hash."""
    return [
        secret,
        hashlib.sha256(f"{purpose}:{secret}".encode()).hexdigest(),
        hashlib.sha256(secret.encode()).hexdigest(),
        SecretHasher(CODE_HASH_KEY).hash(purpose, secret),
    ]


@pytest.fixture
async def tables(azurite: str) -> AsyncIterator[Tables]:
    """A pool of this test's own: the sync tests here block the loop, and a shared pool's connections go stale."""
    settings = Settings.from_env({"STORAGE_CONNECTION_STRING": azurite}, need_upstream=False)
    fresh = Tables.create(settings, None)
    yield fresh
    await fresh.aclose()


@pytest.fixture(scope="module")
def debug_app(azurite: str, simulator: str) -> Iterator[tuple[Service, str]]:
    """An app whose worker logs everything at DEBUG, the Azure SDKs' loggers included (as PYTHON_ENABLE_DEBUG_LOGGING
    does in Azure)."""
    service, url = start_app(app_env(azurite, simulator, PYTHON_ENABLE_DEBUG_LOGGING="1", EVENT_CACHE_SECONDS="0"))
    yield service, url
    service.stop()


def test_no_log_line_carries_a_code_or_its_hash(debug_app: tuple[Service, str]) -> None:
    service, app = debug_app
    with httpx.Client(timeout=30) as http:
        created = http.post(f"{app}/api/manage/events", json={"name": "Logs", **window()}, headers=AUTH).json()
        code, event_id = created["code"], created["id"]
        key = {"api-key": f"{code}/alice"}
        assert http.post(f"{app}/api/v1/chat/completions", json=CHAT, headers=key).status_code == 200
        assert http.get(f"{app}/api/v1/event", headers=key).status_code == 200
        assert http.post(f"{app}/api/v1/embeddings", json={"model": "text-embedding-3-small", "input": "x"},
                         headers=key).status_code == 200  # fmt: skip
        wrong = "NoSuchCode" + code[:6]
        assert http.get(f"{app}/api/v1/models", headers={"api-key": f"{wrong}/alice"}).status_code == 401
        personal = http.post(f"{app}/api/v1/keys", json={"code": code, "name": "carol"}).json()["key"]
        assert http.post(f"{app}/api/v1/chat/completions", json=CHAT, headers={"api-key": personal}).status_code == 200
        rotated = http.post(f"{app}/api/manage/events/{event_id}/rotate-code", headers=AUTH).json()["code"]
        assert http.get(f"{app}/api/v1/models", headers={"api-key": f"{rotated}/alice"}).status_code == 200
        assert http.get(f"{app}/api/v1/models", headers=key).status_code == 401
    service.wait_for_output("route=/api/v1/models status=401")
    text = service.text
    # The worker did log at DEBUG, and storage was called: a leak would have shown.
    assert "DEBUG " in text and "event=" + event_id in text
    for secret in (*forms(code), *forms(rotated), *forms(wrong), *forms(personal, PERSONAL_KEY)):
        assert secret not in text
    assert "proxyevents(" not in text and "RowKey=" not in text  # no storage URL at all


def test_no_log_line_carries_an_organizer_account_key_or_its_hash(debug_app: tuple[Service, str]) -> None:
    """Accounts added, used, re-keyed, removed and guessed, at DEBUG: no key nor hash of one in the output, and
    the answers after creation never carry a key."""
    service, app = debug_app
    name = "logs-" + secrets.token_hex(4)
    with httpx.Client(timeout=30) as http:
        key = http.post(f"{app}/api/manage/organizers", json={"name": name, "role": "organizer"}, headers=AUTH).json()
        first = key["key"]
        mine = {"Authorization": f"Bearer {first}"}
        made = http.post(f"{app}/api/manage/events", json={"name": "Account logs", **window()}, headers=mine)
        assert made.status_code == 201
        later = [
            http.get(f"{app}/api/manage/events", headers=mine),
            http.get(f"{app}/api/manage/organizers", headers=AUTH),
            http.get(f"{app}/api/manage/audit", headers=AUTH),
        ]
        second = http.post(f"{app}/api/manage/organizers/{name}/reset-key", headers=AUTH).json()["key"]
        assert http.get(f"{app}/api/manage/events", headers=mine).status_code == 401
        later.append(http.get(f"{app}/api/manage/events", headers={"Authorization": f"Bearer {second}"}))
        guessed = "ok-" + secrets.token_urlsafe(24)
        assert http.get(f"{app}/api/manage/events", headers={"Authorization": f"Bearer {guessed}"}).status_code == 401
        later.append(http.delete(f"{app}/api/manage/organizers/{name}", headers=AUTH))
        later.append(http.get(f"{app}/api/manage/audit", headers=AUTH))
    for answer in later:
        assert answer.status_code == 200, answer.text
        for secret in (*forms(first, ORGANIZER_ACCOUNT_KEY), *forms(second, ORGANIZER_ACCOUNT_KEY)):
            assert secret not in answer.text
    service.wait_for_output("route=/api/manage/organizers/{name} status=200")  # the removal, logged last
    text = service.text
    assert "DEBUG " in text
    for secret in (*forms(first, ORGANIZER_ACCOUNT_KEY), *forms(second, ORGANIZER_ACCOUNT_KEY),
                   *forms(guessed, ORGANIZER_ACCOUNT_KEY)):  # fmt: skip
        assert secret not in text


async def test_the_stored_row_key_is_the_keyed_hash(tables: Tables) -> None:
    store = EventStore(tables, SecretHasher(CODE_HASH_KEY), 0)
    now = datetime.now(UTC)
    code = "Stored-" + secrets.token_hex(6)
    event = await store.create(
        Event(
            new_event_id("stored"), "Stored", store.hash_code(code), now - timedelta(hours=1), now + timedelta(hours=1)
        )
    )
    index = await tables.events.get_entity("code", SecretHasher(CODE_HASH_KEY).hash(EVENT_CODE, code))
    assert index["event_id"] == event.id
    stored = await tables.events.get_entity("event", event.id)
    assert stored["code_hash"] == index["RowKey"]
    for plain in forms(code)[:3]:
        assert plain not in (index["RowKey"], stored["code_hash"])
    # A personal key is kept the same way, under a purpose of its own.
    keys = PersonalKeys(tables, store, Roster(tables), 0)
    personal = await keys.register(event, "dora")
    stored_key = SecretHasher(CODE_HASH_KEY).hash(PERSONAL_KEY, personal)
    assert (await tables.events.get_entity("key", stored_key))["event_id"] == event.id
    assert keys.hash(personal) == stored_key != SecretHasher(CODE_HASH_KEY).hash(EVENT_CODE, personal)
    assert await keys.lookup(stored_key) == (event, "dora")
    # Another key finds nothing: the hash is worth nothing without the deployment's key.
    assert await EventStore(tables, SecretHasher("another-key-" + "x" * 32), 0).by_code(code) is None
    assert (await store.by_code(code)) == event


async def test_an_event_stored_before_keyed_hashes_is_upgraded_on_first_use(
    app: str, app_process: tuple[Service, str], tables: Tables
) -> None:
    """An event written by the previous version (plain SHA-256) keeps working, even when its first requests
    after the upgrade reach two app processes at once, and its old hash is gone after."""
    old = EventStore(tables, None, 0)
    code = "Legacy-" + secrets.token_hex(6)
    legacy = legacy_sha256(EVENT_CODE, code)
    assert legacy == hashlib.sha256(b"event-code:" + code.encode()).hexdigest()  # what the old version stored
    now = datetime.now(UTC)
    event = await old.create(
        Event(new_event_id("legacy"), "Legacy", legacy, now - timedelta(hours=1), now + timedelta(hours=1))
    )
    apps = (app, app_process[1])
    async with httpx.AsyncClient(timeout=30) as client:
        first = await asyncio.gather(
            *(client.get(f"{apps[i % 2]}/api/v1/models", headers={"api-key": f"{code}/a{i}"}) for i in range(16))
        )
        assert [answer.status_code for answer in first] == [200] * 16
        answer = await client.post(f"{app}/api/v1/chat/completions", json=CHAT, headers={"api-key": f"{code}/bob"})
        assert answer.status_code == 200, answer.text
    keyed = SecretHasher(CODE_HASH_KEY).hash(EVENT_CODE, code)
    assert (await tables.events.get_entity("event", event.id))["code_hash"] == keyed
    assert (await tables.events.get_entity("code", keyed))["event_id"] == event.id
    with pytest.raises(ResourceNotFoundError):
        await tables.events.get_entity("code", legacy)


def test_purposes_hash_apart_and_the_key_is_required() -> None:
    hasher = SecretHasher(CODE_HASH_KEY)
    assert hasher.hash(EVENT_CODE, "same") != hasher.hash("personal-key", "same")
    assert hasher.hash(EVENT_CODE, "same") == SecretHasher(CODE_HASH_KEY).hash(EVENT_CODE, "same")
    assert CODE_HASH_KEY not in repr(hasher)
    base = {"STORAGE_CONNECTION_STRING": "UseDevelopmentStorage=true", "AZURE_OPENAI_ENDPOINT": "http://127.0.0.1:1"}
    with pytest.raises(SettingsError, match="CODE_HASH_KEY is not set"):
        Settings.from_env(base).hasher()
    with pytest.raises(SettingsError, match="CODE_HASH_KEY must have at least 32"):
        Settings.from_env({**base, "CODE_HASH_KEY": "short"})
    assert CODE_HASH_KEY not in repr(Settings.from_env({**base, "CODE_HASH_KEY": CODE_HASH_KEY}))


async def test_the_cli_without_the_key_says_what_to_set(tables: Tables) -> None:
    with pytest.raises(SettingsError, match="CODE_HASH_KEY is not set"):
        await EventStore(tables, None, 0).by_code("Any-Code-1234")
    with pytest.raises(NotFound):
        await EventStore(tables, None, 0).get("no-such-event")
