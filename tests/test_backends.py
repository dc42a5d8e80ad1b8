"""Several upstream backends (``AZURE_OPENAI_BACKENDS``): choice, failover, cooling down, usage by backend.

Each backend is a real simulator process with its own quota, failure or
latency; the app runs under the real worker behind the host emulator, and the
clients are the official ``openai`` SDK (with its retries off, so that any
error the proxy let through would show) and httpx.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI

from proxy.config.backends import FAILURES_TO_OPEN, OPEN_SECONDS, Backend, Health, retry_after_seconds
from proxy.config.settings import Settings, SettingsError
from proxy.ledger.reports import report, request_log
from proxy.storage.tables import Tables
from tests.conftest import LENIENT, MakeEvent
from tests.support import (
    ORGANIZER_KEY,
    ROOT,
    Service,
    app_env,
    eventually,
    free_port,
    sim_stats,
    start_app,
    start_simulator,
)

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


class Sims:
    """Simulator processes, stopped together."""

    def __init__(self) -> None:
        self.services: list[Service] = []

    def start(self, *options: str) -> str:
        service, url = start_simulator(*options)
        self.services.append(service)
        return url

    def stop(self) -> None:
        for service in self.services:
            service.stop()


@pytest.fixture
def sims() -> Iterator[Sims]:
    started = Sims()
    yield started
    started.stop()


def backends_app(azurite: str, backends: list[dict[str, Any]], **extra: str) -> tuple[Service, str]:
    """An app whose backends are ``backends``, each with the simulators' key setting."""
    listed = [{"api_key_setting": "AZURE_OPENAI_API_KEY", **backend} for backend in backends]
    env = app_env(azurite, "", AZURE_OPENAI_BACKENDS=json.dumps(listed), **LENIENT, **extra)
    del env["AZURE_OPENAI_ENDPOINT"]
    return start_app(env)


def requests_to(simulator: str) -> int:
    return int(sim_stats(simulator)["requests"])  # type: ignore[call-overload]


# The routing hint itself, with a clock of our own


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


A = Backend("a", "http://a", priority=1)
B = Backend("b", "http://b", priority=2)
C = Backend("c", "http://c", priority=2, deployments={"gpt-4o-mini": "mini-c"})


def test_order_is_by_priority_and_cooled_backends_are_left_out() -> None:
    clock = Clock()
    health = Health(clock)
    assert health.plan([B, A], "gpt-4o-mini").order[0] is A
    assert [b.name for b in health.plan([A, B, C], "other").order] == ["a", "b"]  # c serves one model only
    assert C.deployment("gpt-4o-mini") == "mini-c" and A.deployment("x") == "x"
    health.throttled(A, "gpt-4o-mini", 2.0)
    plan = health.plan([A, B], "gpt-4o-mini")
    assert [b.name for b in plan.order] == ["b"] and plan.cooled == [(2.0, A)]
    assert health.cooled_for(A, "gpt-4o-mini") == 2.0 and health.cooled_for(B, "gpt-4o-mini") == 0.0
    assert [b.name for b in health.plan([A, B], "other").order] == ["a", "b"]  # per model: per deployment quota
    clock.now += 2.0
    assert [b.name for b in health.plan([A, B], "gpt-4o-mini").order] == ["a", "b"]


def test_a_failing_backend_opens_then_is_probed_with_growing_back_off() -> None:
    clock = Clock()
    health = Health(clock)
    for _ in range(FAILURES_TO_OPEN - 1):
        health.failed(A, "m")
    assert [b.name for b in health.plan([A, B], "m").order] == ["a", "b"]
    health.failed(A, "m")
    assert [b.name for b in health.plan([A, B], "m").order] == ["b", "a"]  # open: last resort only
    clock.now += 5.0
    assert [b.name for b in health.plan([A, B], "m").order] == ["a", "b"]  # half-open: one probe
    health.attempting(A, "m")
    assert [b.name for b in health.plan([A, B], "m").order] == ["b", "a"]  # no second probe meanwhile
    health.failed(A, "m")  # the probe failed: open for twice as long
    clock.now += 9.0
    assert health.plan([A, B], "m").order[0] is B
    clock.now += 1.0
    health.attempting(A, "m")
    health.succeeded(A, "m")
    assert health.plan([A, B], "m").order[0] is A and health.report([A])[0]["models"] == {}


def test_weights_share_the_first_choice() -> None:
    health = Health()
    heavy, light = Backend("heavy", "http://h", weight=3), Backend("light", "http://l", weight=1)
    firsts = [health.plan([heavy, light], "m").order[0].name for _ in range(20_000)]
    assert abs(firsts.count("heavy") / len(firsts) - 0.75) < 0.015


def test_retry_after_headers() -> None:
    assert retry_after_seconds({"retry-after-ms": "1500", "retry-after": "9"}) == 1.5
    assert retry_after_seconds({"retry-after": "7"}) == 7.0
    assert retry_after_seconds({"retry-after": "Thu, 01 Jan 1970 00:00:10 GMT"}, now=lambda: 4.0) == 6.0
    assert retry_after_seconds({}) == 5.0


def test_backends_setting_is_validated_and_unset_means_the_endpoint() -> None:
    base = {"STORAGE_CONNECTION_STRING": "UseDevelopmentStorage=true"}
    single = Settings.from_env({**base, "AZURE_OPENAI_ENDPOINT": "https://west.openai.azure.com/"})
    named = [(b.name, b.endpoint, b.api_key) for b in single.backends]
    assert named == [("west", "https://west.openai.azure.com", None)]
    listed = [
        {"name": "one", "endpoint": "https://one.openai.azure.com", "api_key_setting": "KEY_ONE"},
        {"name": "two", "endpoint": "https://two.openai.azure.com", "priority": 2, "weight": 0.5, "deployments": ["m"]},
    ]
    both = Settings.from_env({**base, "AZURE_OPENAI_BACKENDS": json.dumps(listed), "KEY_ONE": "k1"})
    assert [b.api_key for b in both.backends] == ["k1", None] and both.backends[1].deployments == {"m": "m"}
    bad = [
        ("[]", "non-empty"),
        ('[{"name": "x"}]', "endpoint"),
        ('[{"name": "x", "endpoint": "https://x", "region": "y"}]', "unknown fields: region"),
        ('[{"name": "x", "endpoint": "https://x", "weight": 0}]', "weight"),
        ('[{"name": "x", "endpoint": "https://x", "api_key_setting": "NOPE"}]', "NOPE"),
        ('[{"name": "x", "endpoint": "https://x"}, {"name": "x", "endpoint": "https://y"}]', "twice: x"),
    ]
    for raw, named in bad:
        with pytest.raises(SettingsError, match=named):
            Settings.from_env({**base, "AZURE_OPENAI_BACKENDS": raw})


# Through the app


async def test_a_throttled_first_backend_fails_over_and_cools_down(
    azurite: str, sims: Sims, make_event: MakeEvent, tables: Tables
) -> None:
    created = await make_event()  # before the blocking starts: Azurite's keep-alive
    retry = 4.0  # the first backend's Retry-After
    first = sims.start("--throttle-fraction", "1", "--throttle-retry-ms", str(int(retry * 1000)))
    second = sims.start("--latency-ms", "20")
    service, url = backends_app(
        azurite,
        [{"name": "first", "endpoint": first, "priority": 1}, {"name": "second", "endpoint": second, "priority": 2}],
    )
    try:
        client = OpenAI(base_url=f"{url}/api/v1", api_key=created.key(), max_retries=0)
        client.models.list()  # the worker has read the event: the first request below is a warm one
        sent = time.monotonic()
        answers = [client.chat.completions.create(**CHAT)]  # type: ignore[call-overload]
        # The 429 came after ``sent``: every request answered less than ``retry`` after it was sent while the first
        # backend was cooled, and must not have called it. Measured by time, not by count: on a busy machine
        # fewer of them fit in the window, and those after it may call the first backend again (429 again).
        calls = [(time.monotonic() - sent, requests_to(first))]  # (answered, s after sent; first's calls)
        for stream in (False, False, False, False, False, True):
            if stream:
                chunks = client.chat.completions.create(**CHAT, stream=True)  # type: ignore[call-overload]
                assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            else:
                answers.append(client.chat.completions.create(**CHAT))  # type: ignore[call-overload]
            calls.append((time.monotonic() - sent, requests_to(first)))
        assert all(a.choices[0].message.content for a in answers)
        cooled = [count for answered, count in calls if answered < retry]
        assert len(cooled) >= 2, f"no request fit in the {retry} s window after the 429: {calls}"
        assert cooled == [1] * len(cooled), calls  # cooled after its 429: not called again
        assert requests_to(second) == 7  # every request was answered by the second backend
        # Its Retry-After has passed since the last 429 (which came before the answer that counted it).
        last_429 = next(answered for answered, count in calls if count == calls[-1][1])
        await asyncio.sleep(max(0.0, sent + last_429 + retry - time.monotonic()))
        client.chat.completions.create(**CHAT)  # type: ignore[call-overload]
        assert requests_to(first) == calls[-1][1] + 1  # tried again (and throttled again)
        log = await eventually(
            lambda: request_log(tables, created.event.id), lambda entries: len(entries) == 8, what="8 requests"
        )
        assert {entry["backend"] for entry in log} == {"second"}
        assert {entry["status"] for entry in log} == {200}
    finally:
        service.stop()


async def test_weights_split_the_load_and_usage_by_backend_adds_up(
    azurite: str, sims: Sims, make_event: MakeEvent, tables: Tables, tmp_path: Path
) -> None:
    created = await make_event()  # before the blocking starts: Azurite's keep-alive
    heavy, light = sims.start(), sims.start()
    service, url = backends_app(
        azurite,
        [{"name": "heavy", "endpoint": heavy, "weight": 3}, {"name": "light", "endpoint": light, "weight": 1}],
    )
    try:
        headers = {"api-key": created.key()}
        limits = httpx.Limits(max_connections=16)
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=30, limits=limits) as http:
            gate = asyncio.Semaphore(16)

            async def one(index: int) -> int:
                async with gate:
                    body = {**CHAT, "messages": [{"role": "user", "content": f"hello {index}"}]}
                    return (await http.post("/api/v1/chat/completions", json=body)).status_code

            statuses = await asyncio.gather(*(one(i) for i in range(1000)))
        assert statuses == [200] * 1000
        share = requests_to(heavy) / 1000
        assert requests_to(heavy) + requests_to(light) == 1000
        assert abs(share - 0.75) <= 0.05, share

        by_backend = await eventually(
            lambda: report(tables, created.event.id, "backend"),
            lambda data: data["totals"]["requests"] == 1000,
            timeout=30,
            what="1000 recorded requests",
        )
        rows = {row["key"]: row for row in by_backend["rows"]}
        organizer = {"authorization": f"Bearer {ORGANIZER_KEY}"}
        api = httpx.get(f"{url}/api/manage/events/{created.event.id}/usage?by=backend", headers=organizer).json()
        assert api["rows"] == by_backend["rows"] and api["totals"] == by_backend["totals"]
        env = {k: v for k, v in app_env(azurite, "").items() if not k.startswith("AZURE_")}
        env["PYTHONPATH"] = str(ROOT)
        command = [sys.executable, "-m", "proxy.manage", "usage", created.event.id, "--by", "backend", "--json"]
        done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["rows"] == by_backend["rows"]

        assert set(rows) == {"heavy", "light"}
        assert rows["heavy"]["requests"] == requests_to(heavy)
        for figure in ("requests", "prompt_tokens", "completion_tokens", "total_tokens"):
            assert sum(row[figure] for row in rows.values()) == by_backend["totals"][figure] > 0

        # A request upstream refuses as such (400, a content filter) is not sent to another backend.
        flagged = {**CHAT, "messages": [{"role": "user", "content": "SIM_CONTENT_FILTER"}]}
        client = OpenAI(base_url=f"{url}/api/v1", api_key=created.key("bob"), max_retries=0)  # alice is at her cap
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(**flagged)  # type: ignore[call-overload]
        assert requests_to(heavy) + requests_to(light) == 1001
    finally:
        service.stop()


async def test_streams_fail_over_before_their_first_byte_only(azurite: str, sims: Sims, make_event: MakeEvent) -> None:
    created = await make_event()  # before the blocking starts: Azurite's keep-alive
    down = sims.start("--fail-status", "503")
    healthy = sims.start()
    backends = [
        {"name": "unreachable", "endpoint": f"http://127.0.0.1:{free_port()}", "priority": 1},
        {"name": "down", "endpoint": down, "priority": 2},
        {"name": "healthy", "endpoint": healthy, "priority": 3},
    ]
    service, url = backends_app(azurite, backends)
    try:
        client = OpenAI(base_url=f"{url}/api/v1", api_key=created.key(), max_retries=0)
        calls = []  # per stream: when sent, when answered, the failing backend's calls by then
        for _ in range(FAILURES_TO_OPEN + 2):
            sent = time.monotonic()
            chunks = list(client.chat.completions.create(**CHAT, stream=True))  # type: ignore[call-overload]
            assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            calls.append((sent, time.monotonic(), requests_to(down)))
        assert [count for *_, count in calls[:FAILURES_TO_OPEN]] == list(range(1, FAILURES_TO_OPEN + 1))
        # After FAILURES_TO_OPEN failures in a row, the failing backend is open for OPEN_SECONDS from its last
        # failure (after the stream that failed it was sent) and no longer called: checked on the streams answered
        # in that time (by time, not count: on a busy machine a later one may be its half-open probe).
        opened_after = calls[FAILURES_TO_OPEN - 1][0]
        opened = [count for _, answered, count in calls[FAILURES_TO_OPEN:] if answered < opened_after + OPEN_SECONDS]
        assert opened and opened == [FAILURES_TO_OPEN] * len(opened), [(a - opened_after, n) for _, a, n in calls]
        assert requests_to(healthy) == FAILURES_TO_OPEN + 2

        broken = {**CHAT, "messages": [{"role": "user", "content": "SIM_BREAK_STREAM"}], "stream": True}
        with httpx.stream(
            "POST", f"{url}/api/v1/chat/completions", json=broken, headers={"api-key": created.key()}
        ) as response:
            assert response.status_code == 200
            events = [line for line in response.iter_lines() if line.startswith("data: ")]
        assert '"code":"upstream_error"' in events[-1] and "data: [DONE]" not in events
        assert requests_to(healthy) == FAILURES_TO_OPEN + 3  # a stream under way is not sent again
        with pytest.raises(openai.APIError):
            list(client.chat.completions.create(**broken))  # type: ignore[call-overload]
    finally:
        service.stop()


async def test_a_misconfigured_backend_is_skipped_and_named_in_the_log(
    azurite: str, sims: Sims, make_event: MakeEvent
) -> None:
    created = await make_event()  # before the blocking starts: Azurite's keep-alive
    wrong_key = sims.start("--api-key", "another-key")  # 401 for the proxy's key
    no_deployment = sims.start()
    healthy = sims.start()
    backends = [
        {"name": "wrong-key", "endpoint": wrong_key, "priority": 1},
        {"name": "no-deployment", "endpoint": no_deployment, "priority": 2, "deployments": {"gpt-4o-mini": "absent"}},
        {"name": "healthy", "endpoint": healthy, "priority": 3},
    ]
    service, url = backends_app(azurite, backends)
    try:
        client = OpenAI(base_url=f"{url}/api/v1", api_key=created.key(), max_retries=0)
        assert client.chat.completions.create(**CHAT).choices[0].message.content  # type: ignore[call-overload]
        assert sim_stats(no_deployment)["by_deployment"] == {"absent": 1}  # the deployment named for it there
        service.wait_for_output("backend 'no-deployment' answered 404")
        assert "backend 'wrong-key' answered 401" in service.text and "another-key" not in service.text
        # The organizer's probe (and so the doctor) checks each backend on its own.
        organizer = {"authorization": f"Bearer {ORGANIZER_KEY}"}
        probe = httpx.post(f"{url}/api/manage/probe", headers=organizer, json={"models": ["gpt-4o-mini"]}, timeout=30)
        found = {r["backend"]: (r["ok"], r["status"]) for r in probe.json()["results"]}
        assert found == {"wrong-key": (False, 401), "no-deployment": (False, 404), "healthy": (True, 200)}
    finally:
        service.stop()


async def test_upstream_refusing_the_proxy_is_a_502_for_the_organizer(
    azurite: str, sims: Sims, make_event: MakeEvent
) -> None:
    """Upstream's 401 or "deployment not found" is about the proxy's identity or setup, not the attendee's key."""
    created = await make_event()  # before the blocking starts: Azurite's keep-alive
    wrong_key = sims.start("--api-key", "another-key")  # 401 for the proxy's key
    no_deployment = sims.start()
    backends = [
        {"name": "wrong-key", "endpoint": wrong_key, "deployments": {"gpt-4o-mini": "gpt-4o-mini"}},
        {"name": "no-deployment", "endpoint": no_deployment, "priority": 2,
         "deployments": {"text-embedding-3-small": "absent"}},
    ]  # fmt: skip
    service, url = backends_app(azurite, backends)
    try:
        with httpx.Client(base_url=url, headers={"api-key": created.key()}, timeout=30) as http:
            answers = {
                "chat": http.post("/api/v1/chat/completions", json=CHAT),
                "stream": http.post("/api/v1/chat/completions", json={**CHAT, "stream": True}),
                "responses": http.post("/api/v1/responses", json={"model": "gpt-4o-mini", "input": "hi"}),
                "embeddings": http.post("/api/v1/embeddings", json={"model": "text-embedding-3-small", "input": "x"}),
            }
        for what, answer in answers.items():
            assert answer.status_code == 502, (what, answer.text)
            error = answer.json()["error"]
            assert error["code"] == "upstream_error" and "organizer" in error["message"], (what, error)
        assert "'wrong-key'" in answers["chat"].json()["error"]["message"]
        assert "401" in answers["responses"].json()["error"]["message"]
        assert "DeploymentNotFound" in answers["embeddings"].json()["error"]["message"]
    finally:
        service.stop()


async def test_all_throttled_answers_429_with_the_shortest_wait(
    azurite: str, sims: Sims, make_event: MakeEvent
) -> None:
    created = await make_event()  # before the blocking starts: Azurite's keep-alive
    slow_to_recover = sims.start("--throttle-fraction", "1", "--throttle-retry-ms", "30000")
    soon_ms = 10_000  # long enough for the checks below to fit in its cooldown on a busy machine (the test waits none)
    soon = sims.start("--throttle-fraction", "1", "--throttle-retry-ms", str(soon_ms))
    down = sims.start("--fail-status", "500")
    service, url = backends_app(
        azurite,
        [
            {"name": "west", "endpoint": slow_to_recover},
            {"name": "east", "endpoint": soon},
            {"name": "down", "endpoint": down, "priority": 2},
        ],
    )
    try:
        with httpx.Client(base_url=url, headers={"api-key": created.key()}) as http:
            sent = time.monotonic()  # the 429s came after this: both are cooled until soon_ms after it, at least
            first = http.post("/api/v1/chat/completions", json=CHAT)
            assert first.status_code == 429, first.text
            waits = (first.headers["retry-after-ms"], first.headers["retry-after"])
            assert waits == (str(soon_ms), str(soon_ms // 1000))
            assert requests_to(slow_to_recover) == requests_to(soon) == 1

            again = http.post("/api/v1/chat/completions", json=CHAT)  # both cooled: no call at all
            waited_ms = (time.monotonic() - sent) * 1000
            assert again.status_code == 429 and again.json()["error"]["code"] == "rate_limited"
            # The shortest wait left: soon's, less what has passed since its 429.
            left_ms = int(again.headers["retry-after-ms"])
            assert soon_ms - waited_ms <= left_ms <= soon_ms
            assert again.headers["retry-after"] == str(-(-left_ms // 1000))  # rounded up
            assert requests_to(slow_to_recover) == requests_to(soon) == 1
            assert requests_to(down) == 2  # the lower priority was tried each time, and failed
            states = {b["name"]: b["models"] for b in http.get("/api/health").json()["backends"]}
            assert time.monotonic() - sent < soon_ms / 1000, "the checks above outlasted the cooldown they check"
            assert states["east"]["gpt-4o-mini"].startswith("cooled for ") and states["down"] == {}
            assert "127.0.0.1" not in json.dumps(states)

        client = OpenAI(base_url=f"{url}/api/v1", api_key=created.key(), max_retries=0)
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(**CHAT)  # type: ignore[call-overload]
    finally:
        service.stop()


async def test_a_slow_backend_is_left_for_the_next_within_the_budget(
    azurite: str, sims: Sims, make_event: MakeEvent, tables: Tables
) -> None:
    created = await make_event()  # before the blocking starts: Azurite's keep-alive
    slow = sims.start("--latency-ms", "3000")
    fast = sims.start()
    backends = [{"name": "slow", "endpoint": slow, "priority": 1}, {"name": "fast", "endpoint": fast, "priority": 2}]
    service, url = backends_app(azurite, backends, UPSTREAM_TIMEOUT_SECONDS="4")
    try:
        client = OpenAI(base_url=f"{url}/api/v1", api_key=created.key(), max_retries=0, timeout=30)
        started = time.monotonic()
        chunks = list(client.chat.completions.create(**CHAT, stream=True))  # type: ignore[call-overload]
        streamed_in = time.monotonic() - started
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        # A stream waits for its headers half the budget while another backend remains, then fails over: the fast
        # backend answers it (below), not the slow one, which would have answered 3 s after it was called.
        assert streamed_in >= 2.0 and requests_to(slow) == requests_to(fast) == 1
        started = time.monotonic()
        assert client.chat.completions.create(**CHAT).choices[0].message.content  # type: ignore[call-overload]
        # Not streamed: the whole answer comes with the headers, so the slow backend gets all the budget.
        assert time.monotonic() - started >= 3.0 and requests_to(slow) == 2 and requests_to(fast) == 1
        log = await eventually(
            lambda: request_log(tables, created.event.id), lambda entries: len(entries) == 2, what="2 requests"
        )
        assert sorted((entry["stream"], entry["backend"]) for entry in log) == [(False, "slow"), (True, "fast")]
    finally:
        service.stop()


def test_simulator_quotas_answer_with_azure_429_headers(sims: Sims) -> None:
    """The knobs the backends above are built from: tokens per minute, a throttled share, a failing status."""
    path = "/openai/deployments/gpt-4o-mini/chat/completions?api-version=2024-10-21"
    headers = {"api-key": "k"}
    tokens = sims.start("--tpm-limit", "40")
    with httpx.Client(base_url=tokens, headers=headers) as http:
        first = http.post(path, json=CHAT)
        used = first.json()["usage"]["total_tokens"]
        assert first.status_code == 200 and int(first.headers["x-ratelimit-remaining-tokens"]) == 40 - used
        while (answer := http.post(path, json=CHAT)).status_code == 200:
            pass
        assert answer.status_code == 429 and answer.headers["x-ratelimit-remaining-tokens"] == "0"
        assert 0 < int(answer.headers["retry-after-ms"]) <= 60_000 and 1 <= int(answer.headers["retry-after"]) <= 60
        assert answer.json()["error"]["code"] == "429"

    half = sims.start("--throttle-fraction", "0.5", "--throttle-retry-ms", "250")
    with httpx.Client(base_url=half, headers=headers) as http:
        statuses = [http.post(path, json=CHAT).status_code for _ in range(10)]
        assert statuses == [200, 429] * 5
        assert http.post(path, json=CHAT).status_code == 200
        assert http.post(path, json={**CHAT, "stream": True}).headers["retry-after-ms"] == "250"
    assert sim_stats(half)["throttled"] == 6

    down = sims.start("--fail-status", "503")
    assert httpx.post(f"{down}{path}", json=CHAT, headers=headers).status_code == 503
