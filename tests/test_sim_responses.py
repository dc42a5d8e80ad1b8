"""The simulator's Responses API on its own: the wire format the proxy and the SDK rely on."""

from __future__ import annotations

from typing import Any

import httpx
import orjson
import pytest

URL = "/openai/v1/responses"
HEADERS = {"api-key": "k"}


def events(simulator: str, body: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The stream as (``event:`` line, data) pairs; fails on anything but ``event``/``data`` pairs."""
    with httpx.stream("POST", simulator + URL, json={**body, "stream": True}, headers=HEADERS) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read()
    pairs = []
    for block in raw.decode().split("\n\n")[:-1]:
        event, data = block.split("\n")
        assert event.startswith("event: ") and data.startswith("data: ")
        pairs.append((event[7:], orjson.loads(data[6:])))
    return pairs


def test_stream_event_sequence(simulator: str) -> None:
    pairs = events(simulator, {"model": "gpt-4o-mini", "input": "hello"})
    kinds = [kind for kind, _ in pairs]
    deltas = kinds.count("response.output_text.delta")
    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * deltas,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert all(data["type"] == kind for kind, data in pairs)
    assert [data["sequence_number"] for _, data in pairs] == list(range(len(pairs)))
    created, completed = pairs[0][1]["response"], pairs[-1][1]["response"]
    assert created["status"] == "in_progress" and created["usage"] is None and created["output"] == []
    text = "".join(data["delta"] for kind, data in pairs if kind == "response.output_text.delta")
    assert completed["output"][0]["content"][0]["text"] == text and completed["id"] == created["id"]
    usage = completed["usage"]
    assert usage["output_tokens"] == deltas and usage["total_tokens"] == usage["input_tokens"] + deltas
    # Stored: retrievable by id once the stream has ended.
    assert httpx.get(f"{simulator}{URL}/{created['id']}", headers=HEADERS).json() == completed


def test_max_output_tokens_makes_an_incomplete_response(simulator: str) -> None:
    pairs = events(simulator, {"model": "gpt-4o-mini", "input": "hello", "max_output_tokens": 3})
    assert pairs[-1][0] == "response.incomplete"
    final = pairs[-1][1]["response"]
    assert final["incomplete_details"] == {"reason": "max_output_tokens"} and final["usage"]["output_tokens"] == 3


def test_chaining_and_input_items(simulator: str) -> None:
    with httpx.Client(base_url=simulator, headers=HEADERS) as http:
        first = http.post(URL, json={"model": "gpt-4o-mini", "input": "one"}).json()
        second = http.post(
            URL,
            json={
                "model": "gpt-4o-mini",
                "previous_response_id": first["id"],
                "input": [{"role": "user", "content": "two"}, {"role": "user", "content": "three"}],
            },
        ).json()
        assert second["usage"]["input_tokens"] > first["usage"]["input_tokens"]
        listed = http.get(f"{URL}/{second['id']}/input_items", params={"order": "asc", "limit": 1}).json()
        assert [i["content"][0]["text"] for i in listed["data"]] == ["two"] and listed["has_more"] is True
        newest = http.get(f"{URL}/{second['id']}/input_items").json()
        assert [i["content"][0]["text"] for i in newest["data"]] == ["three", "two"]
        assert http.delete(f"{URL}/{first['id']}").json()["deleted"] is True
        missing = http.post(URL, json={"model": "gpt-4o-mini", "input": "x", "previous_response_id": first["id"]})
        assert missing.status_code == 400 and missing.json()["error"]["code"] == "previous_response_not_found"
        assert http.get(f"{URL}/{first['id']}").status_code == 404
        unstored = http.post(URL, json={"model": "gpt-4o-mini", "input": "x", "store": False}).json()
        assert http.get(f"{URL}/{unstored['id']}").status_code == 404


@pytest.mark.parametrize(
    ("query", "body", "headers", "status"),
    [
        ({"api-version": "2024-10-21"}, {"model": "gpt-4o-mini", "input": "x"}, HEADERS, 400),
        ({"api-version": "preview"}, {"model": "gpt-4o-mini", "input": "x"}, HEADERS, 200),
        ({}, {"model": "text-embedding-3-small", "input": "x"}, HEADERS, 400),
        ({}, {"model": "no-such-deployment", "input": "x"}, HEADERS, 404),
        ({}, {"model": "gpt-4o-mini", "input": "x"}, {}, 401),
        ({}, {"model": "gpt-4o-mini", "input": "SIM_CONTENT_FILTER"}, HEADERS, 400),
    ],
)
def test_refusals(
    simulator: str, query: dict[str, str], body: dict[str, Any], headers: dict[str, str], status: int
) -> None:
    assert httpx.post(simulator + URL, params=query, json=body, headers=headers).status_code == status
