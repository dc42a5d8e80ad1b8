"""One attendee cannot exhaust a worker's memory with large bodies, and others are served meanwhile.

The app runs under the real worker behind the host emulator with a small body limit and
memory budget (``MAX_REQUEST_BYTES``, ``BODY_MEMORY_BYTES``), so that 64 bodies of the
maximum size stay quick to send; the bound scales with the settings. The worker's peak
resident memory is read from ``/proc/PID/status`` (``VmHWM``).
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import orjson
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from proxy.errors import ProxyError
from proxy.ledger.reports import request_log
from proxy.storage.tables import Tables
from proxy.upstream.payload import BodyBudget, read_json, release_body
from tests.conftest import LENIENT, MakeEvent
from tests.support import Service, app_env, eventually, start_app, start_simulator, worker_pids

MiB = 1024 * 1024
BODY_LIMIT = 8 * MiB
BUDGET = 32 * MiB
BODIES = 64
# What the worker may grow by while the 64 bodies are in flight: what the budget holds,
# about three times over (the bytes read, the parsed body, the body sent upstream and what
# the socket has not taken yet), and room for the allocator (proxy/config/settings.py). Without a
# budget every body is read at once: 64 x 8 MiB, each held twice or more (about 900 MiB).
GROWTH_BOUND = 4 * BUDGET
HOLD_MS = 10_000  # how long upstream holds mallory's large bodies: others are asked meanwhile


def kib(status: str, field: str) -> int:
    line = next(line for line in status.splitlines() if line.startswith(field + ":"))
    return int(line.split()[1])


def memory(pid: int) -> tuple[int, int]:
    """The worker's resident memory now and its peak so far, in bytes."""
    status = Path(f"/proc/{pid}/status").read_text()
    return kib(status, "VmRSS") * 1024, kib(status, "VmHWM") * 1024


def maximal_body(size: int, slow_ms: int = 0) -> bytes:
    """A chat request of exactly ``size`` bytes: a prompt and an inline image, as a vision client sends; upstream
    answers it ``slow_ms`` late."""
    shell = {
        "model": "gpt-4o-mini",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": f"SIM_SLOW_MS={slow_ms} What is in this picture?"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,"}},
                ],
            }
        ],
    }
    room = size - len(orjson.dumps(shell))
    image = base64.b64encode(b"\x89PNG" * (room // 4 * 3 // 4 + 1))[:room].decode()
    shell["messages"][0]["content"][1]["image_url"]["url"] += image  # type: ignore[index]
    body = orjson.dumps(shell)
    assert len(body) == size
    return body


@pytest.fixture
def slow_upstream() -> Iterator[str]:
    service, url = start_simulator()
    yield url
    service.stop()


@pytest.fixture
def budgeted(azurite: str, slow_upstream: str) -> Iterator[tuple[Service, str]]:
    env = app_env(azurite, slow_upstream, MAX_REQUEST_BYTES=str(BODY_LIMIT), BODY_MEMORY_BYTES=str(BUDGET), **LENIENT)
    service, url = start_app(env)
    yield service, url
    service.stop()


async def test_maximum_size_bodies_at_once_hold_bounded_memory(
    budgeted: tuple[Service, str], slow_upstream: str, make_event: MakeEvent, tables: Tables
) -> None:
    service, url = budgeted
    created = await make_event()
    pid = worker_pids(service)[-1]
    body, held = maximal_body(BODY_LIMIT), maximal_body(BODY_LIMIT, HOLD_MS)
    chat = f"{url}/api/v1/chat/completions"
    small = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    limits = httpx.Limits(max_connections=BODIES + 8)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        # Warm the worker (imports, pools) so that what follows measures bodies, not start-up.
        warm = await client.post(chat, json=small, headers={"api-key": created.key("bob")})
        assert warm.status_code == 200, warm.text
        before, _ = memory(pid)
        headers = {"api-key": created.key("mallory"), "content-type": "application/json"}
        first = unseen = time.monotonic()  # not upstream yet when the simulator answered the poll sent then
        started = await upstream_requests(client, slow_upstream)
        sending = [asyncio.create_task(client.post(chat, content=held, headers=headers)) for _ in range(BODIES)]
        while True:
            polled = time.monotonic()
            if await upstream_requests(client, slow_upstream) > started:
                break
            unseen = polled
            assert polled - first < 60, "no large body reached upstream"
            await asyncio.sleep(0.02)
        # The first large body reached upstream after ``unseen`` and is held there HOLD_MS: other attendees ask.
        other = await client.post(chat, json=small, headers={"api-key": created.key("bob")})
        assert other.status_code == 200, other.text
        answered = time.monotonic()
        # Another attendee's large body too: mallory holds no more than her share.
        large = await client.post(chat, content=body, headers={**headers, "api-key": created.key("carol")})
        assert large.status_code == 200, large.text
        answers = await asyncio.gather(*sending)
        # Every body was let go: the whole budget is free again (a leak would refuse this one).
        after = await client.post(chat, content=body, headers=headers)
        assert after.status_code == 200, after.text
    _, peak = memory(pid)
    statuses = sorted(answer.status_code for answer in answers)
    served = statuses.count(200)
    print(
        f"worker RSS before {before / MiB:.0f} MiB, peak {peak / MiB:.0f} MiB; {served} of {BODIES} served; "
        f"bob answered {answered - unseen:.2f} s into the hold"
    )
    # Bob's answer came while a large body was still held upstream: by time (the hold began after ``unseen``), not
    # by counting mallory's unfinished requests (under load, one of 64 was left when bob's answer came).
    assert answered < unseen + HOLD_MS / 1000, f"bob answered {answered - unseen:.1f} s after, past the hold"
    assert set(statuses) <= {200, 503}, statuses
    assert served >= 1
    for answer in answers:
        if answer.status_code == 503:
            assert answer.json()["error"]["code"] == "server_busy" and answer.headers["retry-after"]
    assert peak - before < GROWTH_BOUND, f"the worker grew by {(peak - before) / MiB:.0f} MiB"
    # A refused body cost nothing: only the served ones were admitted and logged.
    log = await eventually(
        lambda: request_log(tables, created.event.id), lambda log: len(log) >= served + 4, what="the usage log"
    )
    assert sorted(entry["user"] for entry in log) == ["bob", "bob", "carol"] + ["mallory"] * (served + 1)


async def upstream_requests(client: httpx.AsyncClient, simulator: str) -> int:
    return int((await client.get(f"{simulator}/_sim/stats")).json()["requests"])


async def test_a_body_of_unknown_length_is_held_as_it_is_read() -> None:
    """A chunked body (no Content-Length, as a streaming host may forward it) is counted chunk by chunk."""
    budget = BodyBudget(1 * MiB)  # bodies over 256 KiB may hold 768 KiB of it
    holding: list[Request] = []

    async def endpoint(request: Request) -> Response:
        try:
            await read_json(request, 4 * MiB, budget)
        except ProxyError as error:
            release_body(request)  # as proxy.edge.handlers.answering does whatever the handler raised
            return Response(error.body(), status_code=error.status)
        holding.append(request)  # still held, as by a handler that has not returned
        return Response(str(budget.held))

    app = Starlette(routes=[Route("/", endpoint, methods=["POST"])])

    async def chunked(size: int) -> AsyncIterator[bytes]:
        yield b'{"pad": "'
        for _ in range(size // 65536):
            yield b"x" * 65536
        yield b'"}'

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://proxy") as client:
        first = await client.post("/", content=chunked(640 * 1024))
        assert first.status_code == 200 and "content-length" not in first.request.headers
        assert int(first.text) > 640 * 1024
        refused = await client.post("/", content=chunked(320 * 1024))  # would pass 768 KiB: refused mid-read
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "server_busy"
        small = await client.post("/", content=chunked(128 * 1024))  # the quarter kept for small bodies
        assert small.status_code == 200
        release_body(holding.pop(0))
        again = await client.post("/", content=chunked(320 * 1024))
        assert again.status_code == 200
    for request in holding:
        release_body(request)
    assert budget.held == 0
