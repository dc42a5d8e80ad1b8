"""Usage that a kill cannot lose: SIGKILLed workers under load, and a storage outage on top.

Clients send thousands of requests (chat, streams, embeddings) from several
attendees while the worker is killed with SIGKILL at random moments, as the
Functions host does on scale-in, restart or ``functionTimeout``. Afterwards:

- every response a client received in full is in the request log with status
  200, token for token; the only other 200s are requests whose client was cut
  off by a kill an instant after their record was stored (counted and bounded);
- the usage report (the attendees' day entities) agrees with the log;
- once the reconciler has run (the timer function, under the real worker), no
  daily slot is held by a request that never finished.
"""

from __future__ import annotations

import json
import os
import random
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from proxy.storage import Tables
from proxy.usage import report, request_log
from tests.conftest import MakeEvent, NewEvent
from tests.support import (
    Service,
    app_env,
    azurite_connection_string,
    eventually,
    start_app,
    start_simulator,
    wait_for,
    worker_pids,
)
from tests.test_durability import Forwarder

USERS = [f"load{index}" for index in range(6)]
THREADS = 12
LEASE_SECONDS = 5


@dataclass
class Outcomes:
    """What the clients saw: full answers by request id with their usage, and the ids cut off."""

    received: dict[str, tuple[str, int, int]] = field(default_factory=dict)
    cut_off: int = 0  # answers broken off by a kill (host's bare 500, lost connection, stream without [DONE])
    refused: int = 0  # answers with an error status
    sent: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def one_request(http: httpx.Client, url: str, key: str, kind: str, outcomes: Outcomes) -> None:
    user = key.split("/", 1)[1]
    if kind == "embeddings":
        path, body = "/api/v1/embeddings", {"model": "text-embedding-3-small", "input": "kill me softly"}
    else:
        path = "/api/v1/chat/completions"
        body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Count to twelve"}]}
        if kind == "stream":
            body |= {"stream": True, "stream_options": {"include_usage": True}}
    try:
        with http.stream("POST", url + path, json=body, headers={"api-key": key}) as response:
            request_id = response.headers.get("x-request-id")
            if response.status_code != 200:
                response.read()
                # The host's bare 500 (not the proxy's JSON): the worker died under the request.
                died = response.status_code == 500 and "json" not in response.headers.get("content-type", "")
                with outcomes.lock:
                    if died:
                        outcomes.cut_off += 1
                    else:
                        outcomes.refused += 1
                return
            if kind == "stream":
                usage, done = None, False
                for line in response.iter_lines():
                    if line == "data: [DONE]":
                        done = True
                    elif line.startswith("data: {") and '"usage":{' in line:
                        usage = json.loads(line[6:])["usage"]
                if not done or usage is None:
                    raise httpx.ReadError("stream without [DONE]")
            else:
                usage = json.loads(response.read())["usage"]
    except (httpx.HTTPError, json.JSONDecodeError, KeyError):
        with outcomes.lock:
            outcomes.cut_off += 1
        return
    assert request_id is not None
    with outcomes.lock:
        outcomes.received[request_id] = (user, usage["prompt_tokens"], usage["total_tokens"])


def run_load(url: str, event: NewEvent, total: int, stop: threading.Event, outcomes: Outcomes) -> None:
    def client(seed: int) -> None:
        chooser = random.Random(seed)
        with httpx.Client(timeout=30) as http:
            while not stop.is_set() and len(outcomes.received) < total:
                with outcomes.lock:
                    outcomes.sent += 1
                before = len(outcomes.received)
                kind = chooser.choice(["chat", "stream", "stream", "embeddings"])
                one_request(http, url, event.key(chooser.choice(USERS)), kind, outcomes)
                if len(outcomes.received) == before:
                    stop.wait(0.1)  # a client backs off a little after an error

    # Daemon threads: a failed test must not leave pytest waiting for clients at exit.
    threads = [threading.Thread(target=client, args=(seed,), daemon=True) for seed in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)


def kill_workers(service: Service, times: int, outcomes: Outcomes, total: int, seed: int) -> list[int]:
    """SIGKILL the current worker ``times`` times at random moments of the load; the pids killed."""
    chooser = random.Random(seed)
    killed = []
    for index in range(times):
        # Spread the kills over the run: each after a random share of the next fifth of the requests.
        target = int(total * (index + chooser.uniform(0.2, 0.9)) / (times + 1))
        wait_for(lambda target=target: len(outcomes.received) >= target, timeout=120, what=f"{target} answers")
        pid = worker_pids(service)[-1]
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)
        wait_for(lambda pid=pid: worker_pids(service)[-1] != pid, timeout=60, what="the worker restarted")
    return killed


async def check_usage(tables: Tables, event: NewEvent, outcomes: Outcomes) -> dict[str, Any]:
    log = await request_log(tables, event.event.id)
    logged = {entry["request_id"]: entry for entry in log}
    assert len(logged) == len(log), "a request was logged twice"
    # Every full answer is logged as delivered, token for token.
    for request_id, (user, prompt_tokens, total_tokens) in outcomes.received.items():
        entry = logged.get(request_id)
        assert entry is not None, f"request {request_id} was received in full but is not logged"
        assert (entry["user"], entry["status"], entry["prompt_tokens"], entry["total_tokens"]) == (
            user,
            200,
            prompt_tokens,
            total_tokens,
        )
    # A logged 200 the client did not get in full: only a request cut off by a kill right after its record was stored.
    charged_not_received = {rid for rid, e in logged.items() if e["status"] == 200 and rid not in outcomes.received}
    assert len(charged_not_received) <= outcomes.cut_off
    # The usage report (the attendees' days) agrees with the log.
    data = await report(tables, event.event.id, "user")
    assert data["totals"]["requests"] == len(log)
    assert data["totals"]["total_tokens"] == sum(entry["total_tokens"] for entry in log)
    for row in data["rows"]:
        assert row["requests"] == sum(1 for entry in log if entry["user"] == row["key"])
    return {"logged": len(log), "charged_not_received": len(charged_not_received)}


async def consistent(tables: Tables, event: NewEvent, outcomes: Outcomes) -> dict[str, Any] | str:
    try:
        return await check_usage(tables, event, outcomes)
    except AssertionError as failed:
        return str(failed)


def report_figures(what: str, figures: dict[str, Any], outcomes: Outcomes) -> None:
    print(
        f"\n{what}: {outcomes.sent} sent, {len(outcomes.received)} received in full, {outcomes.cut_off} cut off, "
        f"{outcomes.refused} refused; {figures['logged']} logged, {figures['charged_not_received']} charged "
        "but cut off"
    )


async def assert_no_slot_left_reserved(tables: Tables, event: NewEvent) -> None:
    """After the reconciler: each attendee's reserved slots are exactly its delivered requests."""
    log = await request_log(tables, event.event.id)

    async def days() -> list[dict[str, Any]]:
        query = "PartitionKey eq @pk and RowKey lt @log"
        rows = tables.usage.query_entities(query, parameters={"pk": event.event.id, "log": "log|"})
        return [row async for row in rows]

    def settled(entities: list[dict[str, Any]]) -> bool:
        for entity in entities:
            delivered = sum(1 for entry in log if entry["user"] == entity["user"] and 200 <= entry["status"] < 300)
            held = [e for e in json.loads(entity.get("inflight", "{}")).values() if e[3] == 0]
            if entity["reserved"] != delivered or held:
                return False
        return True

    await eventually(days, settled, timeout=3 * LEASE_SECONDS + 10, what="the reconciler to give back the slots")


@pytest.fixture
def slow_simulator() -> Iterator[str]:
    # Answers of a few tens of milliseconds: kills land in the middle of many of them.
    service, url = start_simulator("--latency-ms", "10", "--tokens-per-second", "400")
    yield url
    service.stop()


def start_loaded_app(connection_string: str, upstream: str) -> tuple[Service, str]:
    env = app_env(connection_string, upstream, RESERVATION_LEASE_SECONDS=str(LEASE_SECONDS))
    return start_app(env, "--timer-interval", "1")


@pytest.mark.timeout(300)
async def test_killed_workers_lose_no_delivered_usage(
    azurite: str, slow_simulator: str, make_event: MakeEvent, tables: Tables
) -> None:
    stop = threading.Event()
    service, url = start_loaded_app(azurite, slow_simulator)
    try:
        event = await make_event(daily_requests=100_000)
        outcomes, total = Outcomes(), 2400
        load = threading.Thread(target=run_load, args=(url, event, total, stop, outcomes), daemon=True)
        load.start()
        killed = kill_workers(service, 5, outcomes, total, seed=7)
        load.join(300)
        assert len(killed) == 5 and len(outcomes.received) >= total
        figures = await check_usage(tables, event, outcomes)
        await assert_no_slot_left_reserved(tables, event)
        report_figures("kills", figures, outcomes)
    finally:
        stop.set()
        service.stop()


@pytest.mark.timeout(300)
async def test_killed_workers_and_a_storage_outage_lose_no_delivered_usage(
    azurite: str, slow_simulator: str, make_event: MakeEvent, tables: Tables
) -> None:
    port = int(azurite.split("TableEndpoint=http://127.0.0.1:")[1].split("/")[0])
    relay = Forwarder(port)
    stop = threading.Event()
    service, url = start_loaded_app(azurite_connection_string(relay.port), slow_simulator)
    try:
        event = await make_event(daily_requests=100_000)
        outcomes, total = Outcomes(), 1500
        load = threading.Thread(target=run_load, args=(url, event, total, stop, outcomes), daemon=True)
        load.start()
        kill_workers(service, 2, outcomes, total // 2, seed=11)
        relay.cut()
        outage = threading.Event()
        outage.wait(15)  # the outage lasts 30 s: a kill in its middle
        pid = worker_pids(service)[-1]
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: worker_pids(service)[-1] != pid, timeout=60, what="the worker restarted")
        outage.wait(15)
        relay.restore()
        kill_workers(service, 2, outcomes, total, seed=13)
        load.join(300)
        # The last worker stores what it withheld during the outage once storage is back.
        figures = await eventually(
            lambda: consistent(tables, event, outcomes), lambda result: isinstance(result, dict), timeout=30
        )
        await assert_no_slot_left_reserved(tables, event)
        report_figures("kills and a 30 s storage outage", figures, outcomes)
    finally:
        stop.set()
        service.stop()
        relay.close()
