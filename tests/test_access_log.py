"""The access log: one line per request, whatever its answer, matching the client's x-request-id; no secret in it."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from tests.conftest import LENIENT, MakeEvent
from tests.support import ORGANIZER_KEY, ROOT, Service, app_env, start_app, start_simulator

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
SIMULATOR_KEY = "simulator-key"  # app_env's AZURE_OPENAI_API_KEY
LINE = re.compile(r"^time=\S+ request_id=([0-9a-f]{32}) .*$", re.MULTILINE)


def faulty_env(azurite: str, simulator: str, **extra: str) -> dict[str, str]:
    """The app with tests/faults' bugs (a 500 on demand), a 4 KiB body limit and a 1 s upstream timeout."""
    parts = (str(ROOT / "tests" / "faults"), str(ROOT), os.environ.get("PYTHONPATH"))
    return app_env(
        azurite,
        simulator,
        PYTHONPATH=os.pathsep.join(p for p in parts if p),
        MAX_REQUEST_BYTES="4096",
        UPSTREAM_TIMEOUT_SECONDS="1",
        **LENIENT,
        **extra,
    )


@pytest.fixture(scope="module")
def logged_app(azurite: str, simulator: str) -> Iterator[tuple[Service, str]]:
    service, url = start_app(faulty_env(azurite, simulator))
    yield service, url
    service.stop()


def access_lines(service: Service) -> dict[str, dict[str, str]]:
    """The logfmt access lines printed so far, by request id."""
    lines: dict[str, dict[str, str]] = {}
    for match in LINE.finditer(service.text):
        fields = dict(re.findall(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)', match.group(0)))
        assert match.group(1) not in lines, f"two lines for {match.group(1)}"
        lines[match.group(1)] = {k: json.loads(v) if v.startswith('"') else v for k, v in fields.items()}
    return lines


async def test_one_line_per_request_of_every_kind_and_no_secret(
    logged_app: tuple[Service, str], make_event: MakeEvent
) -> None:
    service, url = logged_app
    now = datetime.now(UTC)
    open_event = await make_event(max_tokens=100, max_attendees=3, blocked=("mallory",))
    one_request = await make_event(daily_requests=1)
    budget = await make_event(event_requests=1)
    later = await make_event(starts_at=now + timedelta(hours=1), ends_at=now + timedelta(hours=2))
    over = await make_event(starts_at=now - timedelta(hours=2), ends_at=now - timedelta(hours=1))
    off = await make_event(active=False)
    other = await make_event()
    key = {"api-key": open_event.key()}
    chat, api = f"{url}/api/v1/chat/completions", f"{url}/api"
    sent: list[tuple[httpx.Response, int, str | None]] = []  # answer, expected status, expected error code

    def expect(response: httpx.Response, status: int, error: str | None = None) -> str:
        assert response.status_code == status, response.text
        sent.append((response, status, error))
        return response.headers["x-request-id"]

    with httpx.Client(timeout=30) as http:
        expect(http.post(chat, json=CHAT, headers=key), 200)
        with http.stream("POST", chat, json={**CHAT, "stream": True}, headers=key) as streamed:
            assert b"[DONE]" in streamed.read()
        expect(streamed, 200)
        expect(
            http.post(f"{api}/v1/embeddings", json={"model": "text-embedding-3-small", "input": "x"}, headers=key), 200
        )
        expect(http.get(f"{api}/v1/models", headers=key), 200)
        expect(http.get(f"{api}/health"), 200)
        organizer = expect(http.get(f"{api}/manage/events", headers={"authorization": f"Bearer {ORGANIZER_KEY}"}), 200)
        expect(http.post(chat, content=b"{not json", headers=key), 400, "invalid_request")
        expect(http.post(chat, json={**CHAT, "max_tokens": 1000}, headers=key), 400, "max_tokens_exceeds_cap")
        expect(http.post(chat, json=CHAT), 401, "missing_credentials")
        expect(http.post(chat, json=CHAT, headers={"api-key": "NOPE-NOPE-NOPE/alice"}), 401, "invalid_event_code")
        expect(http.get(f"{api}/manage/events", headers={"authorization": "Bearer wrong"}), 401, "unauthorized")
        expect(http.post(chat, json=CHAT, headers={"api-key": later.key()}), 403, "event_not_started")
        expect(http.post(chat, json=CHAT, headers={"api-key": over.key()}), 403, "event_ended")
        expect(http.post(chat, json=CHAT, headers={"api-key": off.key()}), 403, "event_disabled")
        expect(http.post(chat, json=CHAT, headers={"api-key": open_event.key("mallory")}), 403, "attendee_blocked")
        for name in ("bob", "carol"):
            expect(http.post(chat, json=CHAT, headers={"api-key": open_event.key(name)}), 200)
        expect(http.post(chat, json=CHAT, headers={"api-key": open_event.key("dave")}), 403, "attendee_limit_reached")
        expect(http.post(chat, json={**CHAT, "model": "gpt-nope"}, headers=key), 404, "model_not_found")
        nowhere = expect(http.get(f"{api}/v1/nowhere?secret=query-value", headers=key), 404, "not_found")
        expect(http.get(chat, headers=key), 405, "method_not_allowed")
        expect(http.post(chat, content=b"x" * 5000, headers=key), 413, "request_too_large")
        expect(http.post(chat, json=CHAT, headers={"api-key": one_request.key()}), 200)
        expect(http.post(chat, json=CHAT, headers={"api-key": one_request.key()}), 429, "daily_request_cap_exceeded")
        expect(http.post(chat, json=CHAT, headers={"api-key": budget.key()}), 200)
        expect(http.post(chat, json=CHAT, headers={"api-key": budget.key("bob")}), 429, "event_budget_exhausted")
        expect(http.post(chat, json=CHAT, headers={"api-key": "FAULTY-LOOKUP/alice"}), 500, "internal_error")
        failing = {**CHAT, "messages": [{"role": "user", "content": "SIM_SERVER_ERROR"}]}
        upstream_failed = expect(http.post(chat, json=failing, headers=key), 502, "upstream_error")
        slow = {**CHAT, "messages": [{"role": "user", "content": "SIM_SLOW_MS=3000"}]}
        expect(http.post(chat, json=slow, headers=key), 504, "upstream_timeout")
        filtered = {**CHAT, "messages": [{"role": "user", "content": "SIM_CONTENT_FILTER"}]}
        expect(http.post(chat, json=filtered, headers=key), 400)  # upstream's own answer, passed through
        with http.stream(
            "POST", chat, json={**CHAT, "stream": True}, headers={"api-key": other.key("faulty-stream")}
        ) as broken:
            assert b'"internal_error"' in broken.read()
        expect(broken, 200, "internal_error")  # the stream ends with an error event after its 200

    ids = [response.headers["x-request-id"] for response, _, _ in sent]
    assert len(set(ids)) == len(ids)
    service.wait_for_output(ids[-1])  # a stream's line is written when it ends
    for request_id in ids:
        service.wait_for_output(f"request_id={request_id}")
    lines = access_lines(service)
    for response, status, error in sent:
        line = lines[response.headers["x-request-id"]]
        assert line["status"] == str(status)
        assert line.get("error") == error, line
        assert float(line["latency_ms"]) >= 0
    # Client requests and their lines, one for one: no line for a request that was not made.
    assert set(lines) == set(ids)

    first = lines[ids[0]]
    assert first["route"] == "/api/v1/chat/completions" and first["method"] == "POST"
    assert first["event"] == open_event.event.id and first["attendee"] == "alice" and first["model"] == "gpt-4o-mini"
    assert first["stream"] == "false" and int(first["prompt_tokens"]) > 0 and int(first["completion_tokens"]) > 0
    assert float(first["upstream_ms"]) <= float(first["latency_ms"]) and first["backend"].startswith("127.0.0.1:")
    stream_line = lines[ids[1]]
    assert stream_line["stream"] == "true" and int(stream_line["completion_tokens"]) > 0
    assert float(stream_line["first_chunk_ms"]) <= float(stream_line["latency_ms"])
    assert lines[nowhere]["route"] == "/api/{*path}"  # the template, never the path nor its query
    assert lines[organizer]["route"] == "/api/manage/events"
    assert lines[upstream_failed]["upstream_status"] == "500"  # what upstream answered, for the 502

    codes = [e.code for e in (open_event, one_request, budget, later, over, off, other)]
    for secret in [*codes, "NOPE-NOPE-NOPE", ORGANIZER_KEY, SIMULATOR_KEY, "query-value", "SIM_CONTENT_FILTER"]:
        assert secret not in service.text, secret


async def test_json_lines(azurite: str, simulator: str, make_event: MakeEvent) -> None:
    """``LOG_FORMAT=json``: each access line is one JSON object, the same fields."""
    created = await make_event()  # first: the blocking start would leave the test's storage pool stale
    service, url = start_app(faulty_env(azurite, simulator, LOG_FORMAT="json"))
    try:
        response = httpx.post(
            f"{url}/api/v1/chat/completions?api-version=2024-10-21", json=CHAT, headers={"api-key": created.key()}
        )
        request_id = response.headers["x-request-id"]
        service.wait_for_output(request_id)
        [line] = [line for line in service.output if request_id in line]
        fields = json.loads(line)
        assert fields["request_id"] == request_id and fields["status"] == 200 and fields["error"] is None
        assert fields["route"] == "/api/v1/chat/completions" and fields["stream"] is False
        assert fields["prompt_tokens"] > 0 and fields["event"] == created.event.id
        assert created.code not in service.text
    finally:
        service.stop()


def test_values_a_client_chooses_stay_on_one_line() -> None:
    """A model name with spaces, quotes, equals signs or a newline is quoted and escaped, never a second line."""
    from proxy.edge.access import logfmt

    line = logfmt({"model": 'gpt x="y"\nrequest_id=forged', "stream": False, "error": None, "status": 404})
    assert "\n" not in line and line.startswith('model="gpt x=\\"y\\"\\nrequest_id=forged" ')
    assert line.endswith(" stream=false status=404") and "error" not in line
    assert json.loads(line.split("=", 1)[1].rsplit(" stream=", 1)[0]) == 'gpt x="y"\nrequest_id=forged'


async def test_a_stream_the_client_leaves_is_logged_when_it_is_cut(azurite: str, make_event: MakeEvent) -> None:
    """The line of a stream is written at its end, here the client's disconnect: 200, client_disconnected."""
    created = await make_event()
    simulator, sim_url = start_simulator("--tokens-per-second", "4")  # 12 tokens: 3 s of stream
    service, url = start_app(app_env(azurite, sim_url, **LENIENT))
    try:
        body = {**CHAT, "stream": True}
        with (
            httpx.Client(timeout=30) as http,
            http.stream("POST", f"{url}/api/v1/chat/completions", json=body, headers={"api-key": created.key()}) as cut,
        ):
            next(cut.iter_raw())  # the first events, then the client goes away
        request_id = cut.headers["x-request-id"]
        service.wait_for_output(f"request_id={request_id}", timeout=20)
        line = access_lines(service)[request_id]
        assert line["status"] == "200" and line["error"] == "client_disconnected" and line["stream"] == "true"
    finally:
        service.stop()
        simulator.stop()
