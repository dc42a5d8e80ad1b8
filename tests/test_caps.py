"""Event policy: max_tokens, models, daily request and token caps, tokens per minute, state."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI

from proxy.admission.days import seconds_to_midnight
from proxy.policy.events import EventStore
from proxy.storage.tables import Tables
from tests.conftest import MakeEvent
from tests.support import CACHE_SECONDS, Service, eventually, seen_within, sim_stats

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


def chat(http: httpx.Client, app: str, key: str, **fields: Any) -> httpx.Response:
    return http.post(f"{app}/api/v1/chat/completions", json={**CHAT, **fields}, headers={"api-key": key})


async def event_info(app: str, key: str) -> dict[str, Any]:
    async with httpx.AsyncClient() as client:
        response = await client.get(f"{app}/api/v1/event", headers={"api-key": key})
    data: dict[str, Any] = response.json()
    return data


async def test_max_tokens_cap(app: str, http: httpx.Client, make_event: MakeEvent, simulator: str) -> None:
    key = (await make_event(max_tokens=100)).key()
    for field in ("max_tokens", "max_completion_tokens"):
        response = chat(http, app, key, **{field: 101})
        assert response.status_code == 400
        error = response.json()["error"]
        assert error["code"] == "max_tokens_exceeds_cap" and error["param"] == field and "100" in error["message"]
    assert chat(http, app, key, max_tokens=100).status_code == 200
    assert sim_stats(simulator)["last_body"]["max_tokens"] == 100  # type: ignore[index]
    assert chat(http, app, key).status_code == 200
    # Set as max_completion_tokens, which reasoning models (gpt-5.4, the Bicep's default) require.
    last = sim_stats(simulator)["last_body"]
    assert last["max_completion_tokens"] == 100 and "max_tokens" not in last  # type: ignore[index,operator]
    embedded = http.post(
        f"{app}/api/v1/embeddings", json={"model": "text-embedding-3-small", "input": "x"}, headers={"api-key": key}
    )
    assert embedded.status_code == 200
    assert not {"max_tokens", "max_completion_tokens"} & set(sim_stats(simulator)["last_body"])  # type: ignore[arg-type]


async def test_models_lists_exactly_the_allowed(app: str, make_event: MakeEvent) -> None:
    created = await make_event(models=("gpt-4o-mini", "my-deployment"))
    client = OpenAI(base_url=f"{app}/api/v1", api_key=created.key(), max_retries=0)
    assert [m.id for m in client.models.list()] == ["gpt-4o-mini", "my-deployment"]
    with pytest.raises(openai.NotFoundError) as raised:
        client.embeddings.create(model="text-embedding-3-small", input="x")
    assert "gpt-4o-mini, my-deployment" in str(raised.value)


async def test_daily_request_cap(app: str, http: httpx.Client, make_event: MakeEvent, simulator: str) -> None:
    key = (await make_event(daily_requests=3)).key()
    remaining = [chat(http, app, key).headers["x-ratelimit-remaining-requests"] for _ in range(3)]
    assert remaining == ["2", "1", "0"]
    before = sim_stats(simulator)["requests"]
    refused = chat(http, app, key)
    assert refused.status_code == 429
    error = refused.json()["error"]
    assert error["code"] == "daily_request_cap_exceeded" and "3 requests" in error["message"]
    retry_after = int(refused.headers["retry-after"])
    assert abs(retry_after - seconds_to_midnight(datetime.now(UTC))) <= 5
    assert sim_stats(simulator)["requests"] == before  # refused requests never reach upstream
    other = chat(http, app, key.replace("/alice", "/bob"))
    assert other.status_code == 200  # caps are per attendee


async def test_failed_request_gives_its_slot_back(app: str, http: httpx.Client, make_event: MakeEvent) -> None:
    key = (await make_event(daily_requests=2)).key()
    flagged = chat(http, app, key, messages=[{"role": "user", "content": "SIM_CONTENT_FILTER"}])
    assert flagged.status_code == 400
    await eventually(lambda: event_info(app, key), lambda i: i["remaining_today"]["requests"] == 2, what="refund")
    assert [chat(http, app, key).status_code for _ in range(3)] == [200, 200, 429]


async def test_daily_token_cap_sees_each_answer_before_the_next_request(
    app: str, http: httpx.Client, make_event: MakeEvent
) -> None:
    cap = 40
    key = (await make_event(daily_tokens=cap, max_tokens=16)).key()
    spent: list[int] = []
    for _ in range(10):
        response = chat(http, app, key)
        if response.status_code != 200:
            break
        spent.append(response.json()["usage"]["total_tokens"])
        # Recorded before the answer ended, in-flight estimates included: nothing left means 0.
        assert int(response.headers["x-ratelimit-remaining-tokens"]) <= max(0, cap - sum(spent))
    assert response.status_code == 429
    assert response.json()["error"]["code"] == "daily_token_cap_exceeded" and f"{cap} tokens" in response.text
    assert int(response.headers["retry-after"]) > 0
    assert sum(spent[:-1]) < cap <= sum(spent)  # the last request started below the cap, and no other did after
    info = await event_info(app, key)
    assert info["usage_today"]["total_tokens"] == sum(spent) and info["remaining_today"]["tokens"] == 0


async def test_tokens_per_minute(app: str, http: httpx.Client, make_event: MakeEvent) -> None:
    created = await make_event(tpm=50, max_tokens=40)

    async def second_of_minute() -> float:
        return time.time() % 60

    for attempt in range(3):
        # Both requests must fall in one fixed minute window: if this one is nearly over, wait for the next; if
        # they straddled two anyway (a slow machine), again with another name.
        if await second_of_minute() > 55:
            await eventually(second_of_minute, lambda second: second < 50, timeout=10, what="a new minute")
        key, minute = created.key(f"alice{attempt}"), time.time() // 60
        assert chat(http, app, key).status_code == 200  # an empty window admits even a large estimate
        refused = chat(http, app, key)
        if time.time() // 60 == minute:
            break
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "rate_limited" and "50 tokens per minute" in refused.text
    assert 1 <= int(refused.headers["retry-after"]) <= 60


async def test_event_endpoint_shows_caps_and_remaining(app: str, http: httpx.Client, make_event: MakeEvent) -> None:
    created = await make_event(daily_requests=5, daily_tokens=1000, tpm=5000, max_tokens=200, time_zone="Asia/Tokyo")
    key = created.key()
    assert chat(http, app, key).status_code == 200
    info = await eventually(lambda: event_info(app, key), lambda i: i["usage_today"]["requests"] == 1)
    assert info["name"] == created.event.name and info["time_zone"] == "Asia/Tokyo" and info["open"] is True
    caps = {"max_tokens": 200, "daily_requests": 5, "daily_tokens": 1000, "tpm": 5000}
    assert {name: info["caps"][name] for name in caps} == caps
    assert info["caps"]["event_requests"] is None and info["caps"]["max_attendees"] is None
    assert info["event_budget_exhausted"] is False and info["blocked"] is False
    assert info["remaining_today"]["requests"] == 4
    assert info["remaining_today"]["tokens"] == 1000 - info["usage_today"]["total_tokens"]
    assert info["user"] == "alice" and created.code not in str(info)


async def test_disabling_takes_effect_within_the_cache_time(
    app: str, http: httpx.Client, make_event: MakeEvent, tables: Tables
) -> None:
    created = await make_event()
    assert chat(http, app, created.key()).status_code == 200
    await EventStore(tables, None, 0).save(replace(created.event, active=False))

    seen_within(CACHE_SECONDS, lambda: chat(http, app, created.key()).status_code, lambda s: s == 403, "disabled")
    assert chat(http, app, created.key()).json()["error"]["code"] == "event_disabled"


async def test_cap_is_exact_across_two_instances(
    app: str, app_process: tuple[Service, str], make_event: MakeEvent, simulator: str
) -> None:
    cap = 10
    key = (await make_event(daily_requests=cap)).key()
    urls = [app, app_process[1]]
    before = sim_stats(simulator)["requests"]
    limits = httpx.Limits(max_connections=100)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        responses = await asyncio.gather(
            *(
                client.post(f"{urls[i % 2]}/api/v1/chat/completions", json=CHAT, headers={"api-key": key})
                for i in range(cap * 4)
            )
        )
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] * cap + [429] * (cap * 3)
    assert {r.json()["error"]["code"] for r in responses if r.status_code == 429} == {"daily_request_cap_exceeded"}
    assert sim_stats(simulator)["requests"] == before + cap
