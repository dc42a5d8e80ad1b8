"""Guessed codes: weak chosen codes refused, unknown codes throttled per client address (real HTTP)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from proxy.policy.guessing import FailedLookups, client_address, weak_code_reason
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
    lookups.succeeded("a", "used-before")
    for _ in range(3):
        lookups.check("a", "guess")
        lookups.failed("a")
    with pytest.raises(Exception, match="Too many unknown event codes") as raised:
        lookups.check("a", "guess")
    assert raised.value.headers["retry-after"] == "60"  # type: ignore[attr-defined]
    lookups.check("a", "used-before")  # a code the address used before the throttle still passes
    lookups.succeeded("b", "guess")
    with pytest.raises(Exception, match="Too many unknown event codes"):
        lookups.check("a", "guess")  # one used by another address does not
    lookups.check("b", "guess")  # other addresses are not affected
    now[0] = 60.5
    lookups.check("a", "guess")


@pytest.fixture(scope="module")
def strict_app(azurite: str, simulator: str) -> Iterator[str]:
    """An app with the default throttle (every test client here is 127.0.0.1)."""
    service, url = start_app(app_env(azurite, simulator, EVENT_CACHE_SECONDS="1"))
    yield url
    service.stop()


def client_at(address: str) -> httpx.Client:
    """A client whose requests leave from ``address`` (127.0.0.0/8 is all loopback)."""
    return httpx.Client(transport=httpx.HTTPTransport(local_address=address), timeout=30)


def test_unknown_codes_are_throttled_without_slowing_valid_attendees(strict_app: str, http: httpx.Client) -> None:
    created = http.post(f"{strict_app}/api/manage/events", json={"name": "Throttle", **window()}, headers=AUTH).json()
    valid = {"api-key": f"{created['code']}/alice"}
    chat = f"{strict_app}/api/v1/chat/completions"
    with client_at("127.0.0.3") as classroom:  # an address of its own: the other test's addresses stay unthrottled
        assert classroom.post(chat, json=CHAT, headers=valid).status_code == 200
        statuses = []
        for attempt in range(12):
            guess = {"api-key": f"Guess{attempt:04d}xyz/mallory"}
            response = classroom.post(chat, json=CHAT, headers=guess)
            statuses.append(response.status_code)
        assert statuses == [401] * 10 + [429] * 2
        error = response.json()["error"]
        assert error["code"] == "rate_limited" and "unknown event codes" in error["message"]
        assert 1 <= int(response.headers["retry-after"]) <= 60
        # The valid code, used from this address before the throttle, goes through from the very same address.
        assert classroom.post(chat, json=CHAT, headers=valid).status_code == 200
        assert classroom.get(f"{strict_app}/api/v1/models", headers=valid).status_code == 200


def _seen(response: httpx.Response) -> tuple[int, bytes, list[tuple[str, str]]]:
    """What a client learns from an answer, but for what differs on every request anyway (id, date)."""
    headers = sorted((name, value) for name, value in response.headers.items() if name not in ("x-request-id", "date"))
    return response.status_code, response.content, headers


def test_a_throttled_address_learns_nothing_while_others_keep_working(strict_app: str, http: httpx.Client) -> None:
    """A guesser on 127.0.0.2 who has used up its failures gets the same 429 for the real code as for a wrong one,
    even for a code the worker has just seen in use; an attendee elsewhere, and one on the guesser's address who
    used her code before the throttle, keep working."""
    make = f"{strict_app}/api/manage/events"
    alice_event = http.post(make, json={"name": "Oracle A", **window()}, headers=AUTH).json()
    carol_event = http.post(make, json={"name": "Oracle C", **window()}, headers=AUTH).json()
    alice, carol = {"api-key": f"{alice_event['code']}/alice"}, {"api-key": f"{carol_event['code']}/carol"}
    mallory = {"api-key": f"{alice_event['code']}/mallory"}  # the code the guesser is after
    chat = f"{strict_app}/api/v1/chat/completions"
    guesses = 0
    with client_at("127.0.0.2") as guesser:
        assert guesser.post(chat, json=CHAT, headers=carol).status_code == 200  # before the throttle
        assert http.post(chat, json=CHAT, headers=alice).status_code == 200  # the worker has seen it in use

        def guess() -> httpx.Response:
            nonlocal guesses
            guesses += 1
            return guesser.post(chat, json=CHAT, headers={"api-key": f"Wrong{guesses:05d}xyz/mallory"})

        assert [guess().status_code for _ in range(10)] == [401] * 10
        found = 0
        for _ in range(20):
            before, right, after = guess(), guesser.post(chat, json=CHAT, headers=mallory), guess()
            found += right.status_code != 429
            # The wait shown may tick down between two answers: the right code's answer is one of its neighbours'.
            assert right.status_code == before.status_code == after.status_code == 429
            assert _seen(right) in (_seen(before), _seen(after))
            assert right.json()["error"]["code"] == "rate_limited"
        assert found == 0
        models = guesser.get(f"{strict_app}/api/v1/models", headers=mallory)
        assert models.status_code == 429 and models.json()["error"]["code"] == "rate_limited"
        # Carol, on the guesser's address, used her code before the throttle: she keeps working.
        assert guesser.post(chat, json=CHAT, headers=carol).status_code == 200
    # Alice, on another address, never noticed.
    assert http.post(chat, json=CHAT, headers=alice).status_code == 200
    assert guesses == 50
