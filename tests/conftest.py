"""Session fixtures: one Azurite, one simulator and one app process, all real."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import openai
import pytest

from proxy.config.hashing import SecretHasher
from proxy.config.settings import Settings
from proxy.errors import StorageUnavailable
from proxy.policy.events import Event, EventStore, new_event_id
from proxy.storage.tables import Tables
from tests.support import CACHE_SECONDS, CODE_HASH_KEY, Service, app_env, start_app, start_azurite, start_simulator


@pytest.fixture(autouse=True)
def _close_sdk_clients(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Close every ``OpenAI``/``AzureOpenAI`` client a test made once it ends. A client left to the garbage collector
    keeps its socket open until a later test's collection closes it, and that test then fails on the
    ResourceWarning (warnings are errors). Clients of module fixtures are made before this and are not touched."""
    made: list[openai.OpenAI] = []
    init = openai.OpenAI.__init__

    def tracked(self: openai.OpenAI, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        if kwargs.get("http_client") is None:  # one given (LangChain shares one) belongs to whoever made it
            made.append(self)

    monkeypatch.setattr(openai.OpenAI, "__init__", tracked)
    yield
    for client in made:
        client.close()


# Every test client is 127.0.0.1: the shared apps must not throttle the unknown codes that
# tests send on purpose. tests/test_guessing.py checks the default on an app of its own.
LENIENT = {"FAILED_LOOKUPS_PER_MINUTE": "100000"}


@pytest.fixture(scope="session")
def azurite() -> Iterator[str]:
    service, connection_string = start_azurite()
    yield connection_string
    service.stop()


@pytest.fixture(scope="session")
def simulator() -> Iterator[str]:
    service, url = start_simulator()
    yield url
    service.stop()


@pytest.fixture(scope="session")
def app(azurite: str, simulator: str) -> Iterator[str]:
    """The proxy under the real worker behind the host emulator, base URL without ``/api``; events cached for 1 s."""
    service, url = start_app(app_env(azurite, simulator, EVENT_CACHE_SECONDS=f"{CACHE_SECONDS:g}", **LENIENT))
    yield url
    service.stop()


@pytest.fixture(scope="session")
def app_process(azurite: str, simulator: str) -> Iterator[tuple[Service, str]]:
    """A second app process whose output tests may read (logs, shutdown)."""
    service, url = start_app(app_env(azurite, simulator, EVENT_CACHE_SECONDS=f"{CACHE_SECONDS:g}", **LENIENT))
    yield service, url
    service.stop()


# Per module, not per session: synchronous tests block the event loop for seconds at a
# time, and aiohttp's pool then hands out connections its keep-alive expiry is closing.
@pytest.fixture(scope="module")
async def tables(azurite: str) -> AsyncIterator[Tables]:
    settings = Settings.from_env({"STORAGE_CONNECTION_STRING": azurite}, need_upstream=False)
    created = Tables.create(settings, None)
    await created.ensure()
    yield created
    await created.aclose()


@dataclass(frozen=True)
class NewEvent:
    event: Event
    code: str

    def key(self, user: str = "alice") -> str:
        return f"{self.code}/{user}"


MakeEvent = Callable[..., Awaitable[NewEvent]]


@pytest.fixture(scope="module")
async def make_event(tables: Tables) -> MakeEvent:
    """Create an open event (override any field); returns it with its code."""
    store = EventStore(tables, SecretHasher(CODE_HASH_KEY), 0)

    async def create(**fields: Any) -> NewEvent:
        code = fields.pop("code", None) or "T" + secrets.token_hex(8)
        now = datetime.now(UTC)
        event = Event(
            id=new_event_id(fields.get("name", "test")),
            name="Test event",
            code_hash=store.hash_code(code),
            starts_at=now - timedelta(hours=1),
            ends_at=now + timedelta(hours=8),
        )
        event = replace(event, **fields)
        try:
            event = await store.create(event)
        except StorageUnavailable:
            # A sync test blocked this loop for seconds, so aiohttp may hand out a pooled
            # connection Azurite has closed meanwhile ("Server disconnected"): once more.
            event = await store.create(event)
        return NewEvent(event, code)

    return create


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=30) as client:
        yield client
