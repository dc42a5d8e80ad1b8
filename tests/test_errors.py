"""Every error of DESIGN's table: status, OpenAI shape, an actionable message, nothing sent upstream."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from proxy import errors
from proxy.upstream.payload import pseudonym
from tests.conftest import MakeEvent
from tests.support import (
    ORGANIZER_KEY,
    ROOT,
    Service,
    app_env,
    azurite_connection_string,
    free_port,
    sim_stats,
    start_app,
)

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


def error_of(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert set(error) == {"message", "type", "code", "param"}
    assert error["code"] == code
    assert error["message"]
    return error


@pytest.fixture(scope="module")
def small_app(azurite: str, simulator: str) -> Iterator[tuple[Service, str]]:
    """An app with a 4 KiB body limit and a 1 s upstream timeout."""
    env = app_env(azurite, simulator, MAX_REQUEST_BYTES="4096", UPSTREAM_TIMEOUT_SECONDS="1")
    service, url = start_app(env)
    yield service, url
    service.stop()


async def test_credential_errors(app: str, http: httpx.Client, make_event: MakeEvent, simulator: str) -> None:
    created = await make_event()
    url = f"{app}/api/v1/chat/completions"
    before = sim_stats(simulator)["requests"]
    error_of(http.post(url, json=CHAT), 401, "missing_credentials")
    error_of(http.post(url, json=CHAT, headers={"api-key": created.code}), 401, "invalid_event_code")
    error_of(http.post(url, json=CHAT, headers={"api-key": "ab/alice"}), 401, "invalid_event_code")
    error_of(http.post(url, json=CHAT, headers={"api-key": f"{created.code}/bad name"}), 401, "invalid_event_code")
    error_of(http.post(url, json=CHAT, headers={"authorization": "Basic eDp5"}), 401, "invalid_event_code")
    unknown = error_of(http.post(url, json=CHAT, headers={"api-key": "NOPE-NOPE/alice"}), 401, "invalid_event_code")
    assert "NOPE-NOPE" not in unknown["message"]
    for header in ("api-key", "openai-event-code"):
        assert http.post(url, json=CHAT, headers={header: created.key()}).status_code == 200
    assert http.post(url, json=CHAT, headers={"authorization": f"Bearer {created.key()}"}).status_code == 200
    assert sim_stats(simulator)["requests"] == before + 3


async def test_bad_bodies_are_400_and_never_forwarded(
    app: str, http: httpx.Client, make_event: MakeEvent, simulator: str
) -> None:
    headers = {"api-key": (await make_event()).key()}
    url = f"{app}/api/v1/chat/completions"
    before = sim_stats(simulator)["requests"]
    error_of(http.post(url, content=b"{not json", headers=headers), 400, "invalid_request")
    error_of(http.post(url, content=b"[1, 2]", headers=headers), 400, "invalid_request")
    error_of(http.post(url, content=b"", headers=headers), 400, "invalid_request")
    cases = [
        ({"messages": CHAT["messages"]}, "model"),
        ({**CHAT, "model": 42}, "model"),
        ({**CHAT, "messages": "not json ["}, "messages"),
        ({**CHAT, "messages": {"role": "user"}}, "messages"),
        ({**CHAT, "stop": 7}, "stop"),
        ({**CHAT, "stream": "yes"}, "stream"),
        ({**CHAT, "max_tokens": "ten"}, "max_tokens"),
        ({**CHAT, "max_completion_tokens": 0}, "max_completion_tokens"),
    ]
    for body, param in cases:
        assert error_of(http.post(url, json=body, headers=headers), 400, "invalid_request")["param"] == param
    error = error_of(
        http.post(f"{app}/api/v1/embeddings", json={"model": "text-embedding-3-small"}, headers=headers),
        400,
        "invalid_request",
    )
    assert error["param"] == "input"
    assert sim_stats(simulator)["requests"] == before


# Azure refuses an empty "tools" array; a tool the model may call is forwarded as sent.
TOOL = {"type": "function", "function": {"name": "noop", "parameters": {"type": "object", "properties": {}}}}


async def test_messages_as_json_string_and_stop_as_string_are_accepted(
    app: str, http: httpx.Client, make_event: MakeEvent, simulator: str
) -> None:
    created = await make_event()
    headers = {"api-key": created.key()}
    body = {
        **CHAT,
        "messages": '[{"role": "user", "content": "hi"}]',
        "stop": "END",
        "seed": 7,
        "tools": [TOOL],
        # The attendee's identity upstream is the proxy's to give, whichever field carries it.
        "user": "alice@example.org",
        "safety_identifier": "alice@example.org",
    }
    assert http.post(f"{app}/api/v1/chat/completions", json=body, headers=headers).status_code == 200
    sent = sim_stats(simulator)["last_body"]
    assert isinstance(sent, dict)
    assert sent["messages"] == [{"role": "user", "content": "hi"}]
    assert sent["stop"] == "END" and sent["seed"] == 7 and sent["tools"] == [TOOL]
    assert sent["user"] == sent["safety_identifier"] == pseudonym(created.event.id, "alice")


async def test_event_window_and_state(app: str, http: httpx.Client, make_event: MakeEvent) -> None:
    now = datetime.now(UTC)
    url = f"{app}/api/v1/chat/completions"
    later = await make_event(
        starts_at=now + timedelta(days=2), ends_at=now + timedelta(days=3), time_zone="Europe/Paris"
    )
    error = error_of(http.post(url, json=CHAT, headers={"api-key": later.key()}), 403, "event_not_started")
    assert later.event.local(later.event.starts_at) in error["message"] and "Europe/Paris" in error["message"]
    over = await make_event(starts_at=now - timedelta(days=3), ends_at=now - timedelta(days=2))
    assert (
        "ended at"
        in error_of(http.post(url, json=CHAT, headers={"api-key": over.key()}), 403, "event_ended")["message"]
    )
    off = await make_event(active=False)
    error_of(http.post(url, json=CHAT, headers={"api-key": off.key()}), 403, "event_disabled")


async def test_model_not_allowed_lists_the_allowed(app: str, http: httpx.Client, make_event: MakeEvent) -> None:
    created = await make_event(models=("gpt-4o-mini",))
    headers = {"api-key": created.key()}
    error = error_of(
        http.post(f"{app}/api/v1/chat/completions", json={**CHAT, "model": "gpt-5"}, headers=headers),
        404,
        "model_not_found",
    )
    assert "gpt-4o-mini" in error["message"] and error["param"] == "model"
    azure = f"{app}/api/openai/deployments/text-embedding-3-small/embeddings?api-version=2024-10-21"
    error_of(http.post(azure, json={"input": "x"}, headers=headers), 404, "model_not_found")


def test_unknown_route_is_an_openai_404(app: str, http: httpx.Client) -> None:
    error_of(http.get(f"{app}/api/v2/whatever"), 404, "not_found")
    error_of(http.post(f"{app}/api/v1/completions", json={}), 404, "not_found")


async def test_body_over_the_limit_is_413(
    small_app: tuple[Service, str], make_event: MakeEvent, simulator: str
) -> None:
    _, url = small_app
    headers = {"api-key": (await make_event()).key()}
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * 5000}]}
    before = sim_stats(simulator)["requests"]
    with httpx.Client() as client:
        error_of(client.post(f"{url}/api/v1/chat/completions", json=big, headers=headers), 413, "request_too_large")

        def chunked() -> Iterator[bytes]:  # no content-length: the limit holds while reading
            yield b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "'
            for _ in range(10):
                yield b"y" * 1000
            yield b'"}]}'

        error_of(
            client.post(f"{url}/api/v1/chat/completions", content=chunked(), headers=headers), 413, "request_too_large"
        )
    assert sim_stats(simulator)["requests"] == before


async def test_upstream_timeout_is_504(small_app: tuple[Service, str], make_event: MakeEvent) -> None:
    _, url = small_app
    headers = {"api-key": (await make_event()).key()}
    slow = {**CHAT, "messages": [{"role": "user", "content": "SIM_SLOW_MS=3000"}]}
    with httpx.Client(timeout=10) as client:
        error_of(client.post(f"{url}/api/v1/chat/completions", json=slow, headers=headers), 504, "upstream_timeout")


async def test_upstream_errors_pass_through_or_are_502(
    app: str, azurite: str, http: httpx.Client, make_event: MakeEvent
) -> None:
    created = await make_event()
    headers = {"api-key": created.key()}
    flagged = {**CHAT, "messages": [{"role": "user", "content": "SIM_CONTENT_FILTER"}]}
    response = http.post(f"{app}/api/v1/chat/completions", json=flagged, headers=headers)
    assert response.status_code == 400 and response.json()["error"]["code"] == "content_filter"
    failing = {**CHAT, "messages": [{"role": "user", "content": "SIM_SERVER_ERROR"}]}
    failed = error_of(http.post(f"{app}/api/v1/chat/completions", json=failing, headers=headers), 502, "upstream_error")
    assert "status 500 (not retried" in failed["message"]  # says what happened: a 500 is not retried

    service, url = start_app(app_env(azurite, f"http://127.0.0.1:{free_port()}"))
    try:
        error = error_of(http.post(f"{url}/api/v1/chat/completions", json=CHAT, headers=headers), 502, "upstream_error")
        assert "could not be reached" in error["message"]
    finally:
        service.stop()


async def test_storage_down_fails_closed(simulator: str, http: httpx.Client) -> None:
    service, url = start_app(app_env(azurite_connection_string(free_port()), simulator))
    try:
        error_of(
            http.post(f"{url}/api/v1/chat/completions", json=CHAT, headers={"api-key": "SOME-CODE/alice"}),
            503,
            "storage_unavailable",
        )
        health = http.get(f"{url}/api/health")
        assert health.status_code == 503 and health.json()["storage"] == "unreachable"
    finally:
        service.stop()


async def test_no_secret_reaches_logs_responses_or_upstream(
    app_process: tuple[Service, str], http: httpx.Client, make_event: MakeEvent, simulator: str
) -> None:
    service, url = app_process
    created = await make_event()
    for headers in (
        {"api-key": created.key()},
        {"api-key": created.code},
        {"authorization": f"Bearer {created.key()}"},
    ):
        for body in (
            CHAT,
            {**CHAT, "model": "nope"},
            {**CHAT, "messages": [{"role": "user", "content": "SIM_SERVER_ERROR"}]},
        ):
            response = http.post(f"{url}/api/v1/chat/completions", json=body, headers=headers)
            assert created.code not in response.text
    http.get(f"{url}/api/manage/events", headers={"authorization": "Bearer wrong-key"})
    stats = sim_stats(simulator)
    assert created.code not in str(stats["last_headers"]) and created.code not in str(stats["last_body"])
    assert isinstance(stats["last_body"], dict) and stats["last_body"]["user"] != "alice"
    logs = service.text
    for secret in (created.code, "simulator-key", ORGANIZER_KEY, "wrong-key"):
        assert secret not in logs


def error_tree() -> dict[str, tuple[int, set[str]]]:
    """The tree drawn in ``proxy/errors.py``'s docstring: class name -> (status, the codes it answers with)."""
    entries: dict[str, tuple[int, list[str]]] = {}
    last = ""
    for line in (errors.__doc__ or "").splitlines():
        if found := re.search(r"[├└]── (\w+)\s+(\d{3})\s+(.*)", line):
            last = found[1]
            entries[last] = (int(found[2]), [found[3]])
        elif last and (more := re.fullmatch(r"[\s│]{20,}(\S.*)", line)):
            entries[last][1].append(more[1])
    tree = {}
    for name, (status, text) in entries.items():
        plain = re.sub(r"\([^)]*\)", "", " ".join(text))  # the codes, without the remarks in parentheses
        tree[name] = (status, {code for code in re.split(r"[\s/]+", plain) if code})
    return tree


def test_every_error_is_drawn_in_the_tree_and_documented_with_its_status() -> None:
    """Each ProxyError is in errors.py's tree with its status and code, and each (status, code) the proxy can
    answer with is in the documentation (the attendees' table, or the text for the organizer API)."""
    tree = error_tree()

    def subclasses(cls: type) -> set[type]:
        return {cls, *(sub for direct in cls.__subclasses__() for sub in subclasses(direct))}

    for cls in subclasses(errors.ProxyError) - {errors.ProxyError}:
        assert cls.__name__ in tree, f"{cls.__name__} is not drawn in proxy/errors.py's tree"
        status, codes = tree[cls.__name__]
        assert cls.status == status, (cls.__name__, cls.status, tree[cls.__name__])
        per_instance = cls.code == errors.ProxyError.code and cls.status != 500  # CapExceeded(..., code=...)
        assert per_instance or cls.code in codes, (cls.__name__, cls.code, tree[cls.__name__])
    drawn = {code for _, codes in tree.values() for code in codes}
    for path in (ROOT / "proxy").rglob("*.py"):
        for code in re.findall(r'\bcode="([a-z_]+)"', path.read_text()):
            assert code in drawn, f"{path.relative_to(ROOT)} answers {code!r}, not drawn in proxy/errors.py's tree"
    answered = {(status, code) for status, codes in tree.values() for code in codes}
    # The attendees' table (docs/attendees.md) has every error but the organizer API's own ...
    table = re.findall(r"^\| (\d{3}) \| ([^|]+) \|", (ROOT / "docs" / "attendees.md").read_text(), re.MULTILINE)
    in_table = {(int(status), code) for status, cell in table for code in re.findall(r"`([a-z_]+)`", cell)}
    organizer_api = {"unauthorized", "forbidden", "edit_conflict", "organizer_api_disabled"}
    assert {(status, code) for status, code in answered if code not in organizer_api} - in_table == set()
    # ... which the organizers' guide gives with their status.
    guide = (ROOT / "docs" / "organizers.md").read_text()
    assert {f"`{status} {code}`" for status, code in answered if code in organizer_api} - set(
        re.findall(r"`\d{3} [a-z_]+`", guide)
    ) == set()
