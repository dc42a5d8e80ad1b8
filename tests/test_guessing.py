"""Guessed codes: weak chosen codes refused, unknown codes throttled per client address (real HTTP)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from proxy.guessing import FailedLookups, client_address, weak_code_reason
from tests.support import ORGANIZER_KEY, app_env, start_app

AUTH = {"Authorization": f"Bearer {ORGANIZER_KEY}"}
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


def window() -> dict[str, str]:
    now = datetime.now(UTC)
    return {"start": (now - timedelta(hours=1)).isoformat(), "end": (now + timedelta(hours=2)).isoformat()}


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        ("hackathon", "characters"),
        ("hackathon-2026", "common words"),
        ("WORKSHOP_2027", "common words"),
        ("HackathonWorkshop", "common words"),
        ("1234567890", "common words"),
        ("aaaaabbbbbb", "different characters"),
    ],
)
def test_weak_chosen_codes_are_refused_with_a_generated_one(
    http: httpx.Client, app: str, code: str, reason: str
) -> None:
    assert weak_code_reason(code) is not None
    response = http.post(f"{app}/api/manage/events", json={"name": "Weak", "code": code, **window()}, headers=AUTH)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "invalid_request" and error["param"] == "code"
    assert "too easy to guess" in error["message"] and reason in error["message"]
    offered = error["message"].rsplit("such as ", 1)[1].rstrip(".")
    assert len(offered) == 16 and weak_code_reason(offered) is None


@pytest.mark.parametrize("code", ["Ramen-Kettle-94", "q7Xv2pLm9Rt", "CliCode1234", "Rotated-by-hand"])
def test_codes_that_are_not_common_words_are_accepted(code: str) -> None:
    assert weak_code_reason(code) is None


def test_rotating_to_a_weak_code_is_refused(http: httpx.Client, app: str) -> None:
    created = http.post(f"{app}/api/manage/events", json={"name": "Rotate", **window()}, headers=AUTH).json()
    url = f"{app}/api/manage/events/{created['id']}/rotate-code"
    refused = http.post(url, json={"code": "event-2026"}, headers=AUTH)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "code"


def test_client_address_is_the_platforms_last_forwarded_entry() -> None:
    assert client_address("203.0.113.7:51234", "10.0.0.1") == "203.0.113.7"
    assert client_address("1.2.3.4, 203.0.113.7", "10.0.0.1") == "203.0.113.7"  # a client's own entry is ignored
    assert client_address("[2001:db8::1]:443", None) == "2001:db8::1"
    assert client_address(None, "127.0.0.1") == "127.0.0.1"


def test_failures_are_counted_in_a_sliding_window() -> None:
    now = [0.0]
    lookups = FailedLookups(3, clock=lambda: now[0])
    for _ in range(3):
        lookups.check("a")
        lookups.failed("a")
    with pytest.raises(Exception, match="Too many unknown event codes") as raised:
        lookups.check("a")
    assert raised.value.headers["retry-after"] == "60"  # type: ignore[attr-defined]
    lookups.check("b")  # other addresses are not affected
    now[0] = 60.5
    lookups.check("a")


@pytest.fixture(scope="module")
def strict_app(azurite: str, simulator: str) -> Iterator[str]:
    """An app with the default throttle (every test client here is 127.0.0.1)."""
    service, url = start_app(app_env(azurite, simulator, EVENT_CACHE_SECONDS="1"))
    yield url
    service.stop()


def test_unknown_codes_are_throttled_without_slowing_valid_attendees(strict_app: str, http: httpx.Client) -> None:
    created = http.post(f"{strict_app}/api/manage/events", json={"name": "Throttle", **window()}, headers=AUTH).json()
    valid = {"api-key": f"{created['code']}/alice"}
    assert http.post(f"{strict_app}/api/v1/chat/completions", json=CHAT, headers=valid).status_code == 200
    statuses = []
    for attempt in range(12):
        guess = {"api-key": f"Guess{attempt:04d}xyz/mallory"}
        response = http.post(f"{strict_app}/api/v1/chat/completions", json=CHAT, headers=guess)
        statuses.append(response.status_code)
    assert statuses == [401] * 10 + [429] * 2
    error = response.json()["error"]
    assert error["code"] == "rate_limited" and "unknown event codes" in error["message"]
    assert 1 <= int(response.headers["retry-after"]) <= 60
    # The valid code, known to the worker, goes through from the very same address.
    assert http.post(f"{strict_app}/api/v1/chat/completions", json=CHAT, headers=valid).status_code == 200
    assert http.get(f"{strict_app}/api/v1/models", headers=valid).status_code == 200
