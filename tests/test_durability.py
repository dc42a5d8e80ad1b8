"""Streams that break off, storage outages, and graceful shutdown: nothing is lost or faked."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import httpx
import openai
import pytest
from openai import OpenAI

from proxy.config.settings import Settings
from proxy.ledger.reports import report, request_log
from proxy.policy.events import Event, EventStore
from proxy.storage.tables import Tables
from tests.conftest import MakeEvent
from tests.support import (
    CODE_HASH_KEY,
    app_env,
    azurite_connection_string,
    eventually,
    sim_stats,
    start_app,
    start_azurite,
    start_simulator,
)

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
BREAK = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "SIM_BREAK_STREAM"}], "stream": True}


async def test_broken_upstream_stream_ends_in_an_error(app: str, make_event: MakeEvent, tables: Tables) -> None:
    created = await make_event(daily_requests=5)
    with httpx.stream(
        "POST", f"{app}/api/v1/chat/completions", json=BREAK, headers={"api-key": created.key()}
    ) as response:
        events = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert "[DONE]" not in events[-1] and '"code":"upstream_error"' in events[-1]
    client = OpenAI(base_url=f"{app}/api/v1", api_key=created.key(), max_retries=0)
    chunks = []
    with pytest.raises(openai.APIError, match="incomplete"):
        for chunk in client.chat.completions.create(**BREAK):  # type: ignore[call-overload]
            chunks.append(chunk)
    # Recorded as failed requests, and their slots given back. Without a usage chunk, the
    # completion tokens are the events relayed less the first two (prompt filter, role):
    # how many arrived before the break depends on timing, so count what each client saw.
    relayed = max(0, len(events) - 1 - 2) + max(0, len(chunks) - 2)
    data = await eventually(lambda: report(tables, created.event.id, "user"), lambda d: d["totals"]["requests"] == 2)
    assert data["totals"]["completion_tokens"] == relayed
    day = datetime.now(UTC).strftime("%Y-%m-%d")
    entity = await tables.usage.get_entity(created.event.id, f"{day}|alice")
    assert entity["failed"] == 2 and entity["reserved"] == 0


class Forwarder:
    """A TCP relay to Azurite that can be cut, to play a storage outage."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.up = True
        self.loop = asyncio.new_event_loop()
        self.writers: set[asyncio.StreamWriter] = set()
        started = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(started,), daemon=True)
        self.thread.start()
        started.wait(5)

    def _run(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", 0))
        self.port = self.server.sockets[0].getsockname()[1]
        started.set()
        self.loop.run_forever()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.up:
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self.writers.update((writer, up_writer))

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            try:
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                sink.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def cut(self) -> None:
        def close_all() -> None:
            self.up = False
            for writer in list(self.writers):
                writer.close()
            self.writers.clear()

        self.loop.call_soon_threadsafe(close_all)

    def restore(self) -> None:
        self.loop.call_soon_threadsafe(setattr, self, "up", True)

    def close(self) -> None:
        async def shut() -> None:
            self.server.close()
            for writer in list(self.writers):
                writer.close()
            await self.server.wait_closed()

        asyncio.run_coroutine_threadsafe(shut(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture
def forwarder(azurite: str) -> Iterator[Forwarder]:
    port = int(azurite.split("TableEndpoint=http://127.0.0.1:")[1].split("/")[0])
    relay = Forwarder(port)
    yield relay
    relay.close()


async def test_storage_outage_withholds_answers_and_keeps_their_usage(
    forwarder: Forwarder, azurite: str, make_event: MakeEvent, tables: Tables
) -> None:
    """No answer goes out whose usage cannot be stored; what upstream spent is recorded once storage is back."""
    # Answers that take about half a second, so that storage can go away in the middle of one.
    simulator, upstream = start_simulator("--tokens-per-second", "40", "--completion-tokens", "20")
    service, url = start_app(app_env(azurite_connection_string(forwarder.port), upstream, EVENT_CACHE_SECONDS="60"))
    try:
        open_event = await make_event(daily_requests=None)
        capped = await make_event(daily_requests=100)
        client = OpenAI(base_url=f"{url}/api/v1", api_key=open_event.key(), max_retries=0)
        client.chat.completions.create(**CHAT)  # type: ignore[call-overload]
        # Stored before the answer ended: no waiting.
        assert (await report(tables, open_event.event.id, "user"))["totals"]["requests"] == 1

        with httpx.Client(timeout=30) as http:
            headers = {"api-key": open_event.key()}
            with http.stream(
                "POST", f"{url}/api/v1/chat/completions", json={**CHAT, "stream": True}, headers=headers
            ) as r:
                lines = r.iter_lines()
                assert next(lines).startswith("data: ")
                forwarder.cut()  # storage goes away while the answer is coming
                events = [line for line in lines if line.startswith("data: ")]
            assert "data: [DONE]" not in events and '"code":"storage_unavailable"' in events[-1]
            spent = sim_stats(upstream)["requests"]
            # Until the withheld record is stored, nothing more goes upstream, capped or not.
            for key in (open_event.key(), capped.key()):
                refused = http.post(f"{url}/api/v1/chat/completions", json=CHAT, headers={"api-key": key})
                assert refused.status_code == 503 and refused.json()["error"]["code"] == "storage_unavailable"
            assert sim_stats(upstream)["requests"] == spent

        forwarder.restore()
        data = await eventually(
            lambda: report(tables, open_event.event.id, "user"), lambda d: d["totals"]["requests"] == 2, timeout=20
        )
        log = await request_log(tables, open_event.event.id)
        withheld = next(entry for entry in log if entry["stream"])
        assert withheld["status"] == 503 and withheld["completion_tokens"] > 0
        assert data["totals"]["total_tokens"] == sum(entry["total_tokens"] for entry in log)
        day = datetime.now(UTC).strftime("%Y-%m-%d")
        entity = await tables.usage.get_entity(open_event.event.id, f"{day}|alice")
        assert entity["failed"] == 1
        # And answers flow again.
        answer = await eventually(
            lambda: asyncio.to_thread(
                httpx.post, f"{url}/api/v1/chat/completions", json=CHAT, headers={"api-key": capped.key()}
            ),
            lambda response: response.status_code == 200,
            timeout=20,
        )
        assert answer.json()["usage"]["total_tokens"] > 0
    finally:
        service.stop()
        simulator.stop()


async def test_fresh_storage_without_usage_tables_works(simulator: str) -> None:
    """Only the events table exists (as after creating an event): the first request creates the rest."""
    azurite, connection_string = start_azurite()
    settings = Settings.from_env(
        {"STORAGE_CONNECTION_STRING": connection_string, "CODE_HASH_KEY": CODE_HASH_KEY}, need_upstream=False
    )
    fresh = Tables.create(settings, None)
    service = None
    try:
        await fresh.events.create_table()
        code = "FRESH-CODE"
        now = datetime.now(UTC)
        store = EventStore(fresh, settings.hasher(), 0)
        event = Event("fresh", "Fresh", store.hash_code(code), now - timedelta(hours=1), now + timedelta(hours=1))
        await store.create(event)
        service, url = start_app(app_env(connection_string, simulator))
        response = httpx.post(f"{url}/api/v1/chat/completions", json=CHAT, headers={"api-key": f"{code}/alice"})
        assert response.status_code == 200, response.text
        data = await eventually(lambda: report(fresh, "fresh", "user"), lambda d: d["totals"]["requests"] == 1)
        assert data["rows"][0]["key"] == "alice"
    finally:
        if service is not None:
            service.stop()
        await fresh.aclose()
        azurite.stop()


async def test_client_leaving_a_stream_is_charged_and_upstream_stops(
    azurite: str, make_event: MakeEvent, tables: Tables
) -> None:
    """A request that reached upstream keeps its slot; without upstream's usage, it is charged the estimate."""
    simulator, slow_upstream = start_simulator("--tokens-per-second", "20", "--completion-tokens", "40")
    app, url = start_app(app_env(azurite, slow_upstream))
    try:
        created = await make_event(daily_requests=1)
        body = {**CHAT, "stream": True}
        with httpx.Client() as http:
            with http.stream(
                "POST", f"{url}/api/v1/chat/completions", json=body, headers={"api-key": created.key()}
            ) as r:
                assert r.status_code == 200
                next(r.iter_lines())  # the first event, then hang up while the answer is still coming
            # Upstream's stream is closed at once: the simulator stops generating, as Azure does.
            await eventually(lambda: asyncio.to_thread(sim_stats, slow_upstream), lambda s: s["abandoned"] == 1)
            info = http.get(f"{url}/api/v1/event", headers={"api-key": created.key()}).json()
            log = await eventually(lambda: request_log(tables, created.event.id), lambda entries: len(entries) == 1)
            again = http.post(f"{url}/api/v1/chat/completions", json=CHAT, headers={"api-key": created.key()})
        assert again.status_code == 429 and again.json()["error"]["code"] == "daily_request_cap_exceeded"
        assert info["remaining_today"]["requests"] == 0
        entry = log[0]
        assert (entry["status"], entry["stream"], entry["estimated"]) == (499, True, True)
        # The prompt counted from the body sent upstream (bytes / 4, rounded up), plus what was relayed.
        sent = sim_stats(slow_upstream)["last_body"]
        assert entry["prompt_tokens"] >= len(json.dumps(sent, separators=(",", ":"))) // 4 > 0
        assert entry["total_tokens"] == entry["prompt_tokens"] + entry["completion_tokens"]
    finally:
        app.stop()
        simulator.stop()
