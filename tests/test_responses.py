"""The Responses API through the real app: the official SDK unchanged, usage, and privacy between attendees."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import httpx
import openai
import pytest
from langchain_openai import ChatOpenAI
from openai import AzureOpenAI, OpenAI

from proxy.ledger.reports import report, request_log
from proxy.policy.events import EventStore
from proxy.storage.tables import Tables
from proxy.upstream.payload import pseudonym
from tests.conftest import MakeEvent
from tests.support import app_env, azurite_connection_string, eventually, sim_stats, start_app, start_simulator
from tests.test_durability import Forwarder

MODEL = "gpt-4o-mini"


_OPEN: list[OpenAI] = []


def client(app: str, key: str) -> OpenAI:
    _OPEN.append(OpenAI(base_url=f"{app}/api/v1", api_key=key, max_retries=0))
    return _OPEN[-1]


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    while _OPEN:
        _OPEN.pop().close()


async def test_create_stream_retrieve_chain_delete_with_the_sdk(
    app: str, simulator: str, make_event: MakeEvent
) -> None:
    created = await make_event(max_tokens=64)
    sdk = client(app, created.key())

    first = sdk.responses.create(model=MODEL, input="Name three rivers", instructions="Be brief")
    assert first.status == "completed" and first.output_text and first.usage is not None
    sent: Any = sim_stats(simulator)["last_body"]
    # The cap is set when the client sends none; upstream sees a pseudonym, not the name.
    assert sent["max_output_tokens"] == 64 and sent["user"] == pseudonym(created.event.id, "alice")

    events = list(sdk.responses.create(model=MODEL, input="And three lakes", stream=True))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    streamed = events[-1].response  # type: ignore[union-attr]
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == streamed.output_text == first.output_text
    assert streamed.usage is not None and streamed.usage.total_tokens > 0

    with sdk.responses.stream(model=MODEL, input="Stream with the helper") as stream:
        final = stream.get_final_response()
    assert final.output_text == first.output_text

    second = sdk.responses.create(model=MODEL, input="Which is longest?", previous_response_id=first.id)
    assert sim_stats(simulator)["last_body"]["previous_response_id"] == first.id  # type: ignore[index]
    # Upstream counted the first turn as input of the second.
    assert second.usage is not None and first.usage.input_tokens < second.usage.input_tokens

    assert sdk.responses.retrieve(first.id).output_text == first.output_text
    assert sdk.responses.retrieve(streamed.id).id == streamed.id
    items = list(sdk.responses.input_items.list(second.id))
    assert [item.type for item in items] == ["message"]
    sdk.responses.input_items.list(second.id, order="asc", limit=5)
    # Paging passes through; the v1 API gets no dated api-version.
    assert sim_stats(simulator)["last_query"] == {"order": "asc", "limit": "5"}

    sdk.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        sdk.responses.retrieve(first.id)
    with pytest.raises(openai.NotFoundError):
        sdk.responses.create(model=MODEL, input="again", previous_response_id=first.id)


async def test_usage_matches_upstream_and_is_stored_before_the_end(
    app: str, simulator: str, make_event: MakeEvent, tables: Tables
) -> None:
    created = await make_event()
    before = sim_stats(simulator)["usage"]
    for user in ("ann", "ben"):
        sdk = client(app, created.key(user))
        sdk.responses.create(model=MODEL, input="Count to three")
        list(sdk.responses.create(model=MODEL, input="Count to four", stream=True))
    after = sim_stats(simulator)["usage"]
    upstream = {k: after[k] - before[k] for k in after}  # type: ignore[index]

    # Stored before each answer ended: no waiting.
    log = await request_log(tables, created.event.id)
    assert sorted((e["user"], e["stream"]) for e in log) == [
        ("ann", False),
        ("ann", True),
        ("ben", False),
        ("ben", True),
    ]
    assert all(e["kind"] == "responses" and e["status"] == 200 and e["model"] == MODEL for e in log)
    # Upstream's figures, streamed or not: none of them marked as the proxy's estimate.
    assert [e["estimated"] for e in log] == [False] * 4
    data = await report(tables, created.event.id, "user")
    assert {name: data["totals"][name] for name in ("requests", *upstream)} == {"requests": 4, **upstream}
    assert [row["key"] for row in data["rows"]] == ["ann", "ben"]


async def test_another_attendee_or_event_sees_nothing(app: str, make_event: MakeEvent) -> None:
    created, elsewhere = await make_event(), await make_event()
    alice = client(app, created.key("alice"))
    mine = alice.responses.create(model=MODEL, input="my secret plan")
    streamed = list(alice.responses.create(model=MODEL, input="my other plan", stream=True))[-1].response  # type: ignore[union-attr]
    never = "resp_" + "0" * 48

    def not_found(sdk: OpenAI, response_id: str) -> list[str]:
        """The messages of every way to reach a response, each of which must be a 404."""
        messages = []
        for call in (
            lambda: sdk.responses.retrieve(response_id),
            lambda: sdk.responses.input_items.list(response_id),
            lambda: sdk.responses.delete(response_id),
            lambda: sdk.responses.create(model=MODEL, input="go on", previous_response_id=response_id),
        ):
            with pytest.raises(openai.NotFoundError) as raised:
                call()
            messages.append(raised.value.message.replace(response_id, "ID"))
        return messages

    bob = client(app, created.key("bob"))
    alice_elsewhere = client(app, elsewhere.key("alice"))
    baseline = not_found(bob, never)
    for response_id in (mine.id, streamed.id):
        # The same answers as for an id that never existed: nothing tells that it does.
        assert not_found(bob, response_id) == baseline
        assert not_found(alice_elsewhere, response_id) == baseline
    assert alice.responses.retrieve(mine.id).output_text == mine.output_text  # bob's delete did nothing
    assert alice.responses.retrieve(streamed.id).id == streamed.id
    with pytest.raises(openai.NotFoundError):
        bob.responses.retrieve("not an id/../x")


async def test_fields_the_proxy_refuses(app: str, make_event: MakeEvent) -> None:
    created = await make_event(max_tokens=100)
    key = created.key()
    cases: list[tuple[dict[str, Any], int, str, str]] = [
        ({"conversation": "conv_123"}, 400, "invalid_request", "conversation"),
        ({"background": True}, 400, "invalid_request", "background"),
        ({"background": "true"}, 400, "invalid_request", "background"),
        ({"background": 1}, 400, "invalid_request", "background"),
        ({"background": "false"}, 400, "invalid_request", "background"),
        ({"session_id": "s1"}, 400, "invalid_request", "session_id"),
        ({"input": [{"type": "item_reference", "id": "msg_1"}]}, 400, "invalid_request", "input"),
        ({"max_output_tokens": 101}, 400, "max_tokens_exceeds_cap", "max_output_tokens"),
        ({"max_output_tokens": "many"}, 400, "invalid_request", "max_output_tokens"),
        ({"model": "gpt-5"}, 404, "model_not_found", "model"),
    ]
    with httpx.Client(timeout=30) as http:
        for extra, status, code, param in cases:
            body = {"model": MODEL, "input": "hi", **extra}
            answer = http.post(f"{app}/api/v1/responses", json=body, headers={"api-key": key})
            assert answer.status_code == status, (extra, answer.text)
            error = answer.json()["error"]
            assert (error["code"], error["param"]) == (code, param), error
            assert param in error["message"] or code == "model_not_found"
        # The one value that means "not in the background" goes through.
        body = {"model": MODEL, "input": "hi", "background": False}
        assert http.post(f"{app}/api/v1/responses", json=body, headers={"api-key": key}).status_code == 200


async def test_unstored_and_broken_responses(app: str, simulator: str, make_event: MakeEvent, tables: Tables) -> None:
    created = await make_event()
    sdk = client(app, created.key())
    unstored = sdk.responses.create(model=MODEL, input="forget me", store=False)
    with pytest.raises(openai.NotFoundError):
        sdk.responses.retrieve(unstored.id)

    # A response of the caller's that upstream no longer has: upstream's own 404 is the client's to see.
    gone = sdk.responses.create(model=MODEL, input="soon gone")
    removed = httpx.delete(f"{simulator}/openai/v1/responses/{gone.id}", headers={"api-key": "simulator-key"})
    assert removed.status_code == 200
    with pytest.raises(openai.NotFoundError) as missing:
        sdk.responses.retrieve(gone.id)
    assert gone.id in missing.value.message

    with pytest.raises(openai.APIError) as raised:
        list(sdk.responses.create(model=MODEL, input="SIM_BREAK_STREAM", stream=True))
    assert "incomplete" in raised.value.message
    # A broken stream is recorded in the background, as failed: its slot is given back.
    log = await eventually(
        lambda: request_log(tables, created.event.id), lambda log: len(log) == 3, what="three logged requests"
    )
    assert sorted(e["status"] for e in log) == [200, 200, 502]


async def test_azure_clients(app: str, make_event: MakeEvent) -> None:
    key = (await make_event()).key()
    for endpoint in (f"{app}/api/v1", f"{app}/api"):
        sdk = AzureOpenAI(azure_endpoint=endpoint, api_key=key, api_version="preview", max_retries=0)
        _OPEN.append(sdk)
        answer = sdk.responses.create(model=MODEL, input="hello from Azure")
        events = list(
            sdk.responses.create(model=MODEL, input="hello again", stream=True, previous_response_id=answer.id)
        )
        assert events[-1].type == "response.completed"
        assert sdk.responses.retrieve(answer.id).output_text == answer.output_text
        assert len(list(sdk.responses.input_items.list(answer.id))) == 1
        sdk.responses.delete(answer.id)
        with pytest.raises(openai.NotFoundError):
            sdk.responses.retrieve(answer.id)


async def test_caps_and_window_apply(app: str, make_event: MakeEvent, tables: Tables) -> None:
    created = await make_event(daily_requests=2)
    sdk = client(app, created.key())
    kept = sdk.responses.create(model=MODEL, input="one")
    list(sdk.responses.create(model=MODEL, input="two", stream=True))
    with pytest.raises(openai.RateLimitError) as refused:
        sdk.responses.create(model=MODEL, input="three")
    assert refused.value.code == "daily_request_cap_exceeded"
    # Reading a stored response costs no request.
    assert sdk.responses.retrieve(kept.id).id == kept.id

    await EventStore(tables, None, 0).save(replace(created.event, active=False))
    await asyncio.sleep(1.5)  # the app caches events for a second
    with pytest.raises(openai.PermissionDeniedError):
        sdk.responses.retrieve(kept.id)
    # Deleting what one stored stays possible once the event is off.
    sdk.responses.delete(kept.id)


async def test_storage_outage_fails_closed(azurite: str, make_event: MakeEvent) -> None:
    """No stream completes whose usage cannot be stored, and an unreadable owner is a 503, never a 404."""
    created = await make_event(daily_requests=None)  # before the starts below block this loop
    relay = Forwarder(int(azurite.split("TableEndpoint=http://127.0.0.1:")[1].split("/")[0]))
    simulator, upstream = start_simulator("--tokens-per-second", "40", "--completion-tokens", "20")
    service, url = start_app(app_env(azurite_connection_string(relay.port), upstream, EVENT_CACHE_SECONDS="60"))
    try:
        sdk = client(url, created.key())
        kept = sdk.responses.create(model=MODEL, input="before the outage")
        body = {"model": MODEL, "input": "during the outage", "stream": True}
        with httpx.stream("POST", f"{url}/api/v1/responses", json=body, headers={"api-key": created.key()}) as r:
            lines = r.iter_lines()
            assert next(lines) == "event: response.created"
            relay.cut()  # storage goes away while the answer is coming
            rest = [line for line in lines if line]
        assert "event: response.completed" not in rest and rest[-2] == "event: error"
        assert '"code":"storage_unavailable"' in rest[-1]
        with pytest.raises(openai.InternalServerError) as unavailable:
            sdk.responses.retrieve(kept.id)
        assert unavailable.value.status_code == 503
        relay.restore()
        again = await eventually(
            lambda: asyncio.to_thread(
                httpx.get, f"{url}/api/v1/responses/{kept.id}", headers={"api-key": created.key()}
            ),
            lambda response: response.status_code == 200,
            timeout=20,
        )
        assert again.json()["id"] == kept.id
    finally:
        service.stop()
        simulator.stop()
        relay.close()


async def test_responses_with_several_backends(azurite: str, simulator: str, make_event: MakeEvent) -> None:
    """Backends that list their deployments serve the Responses API from the first one."""
    listed = [
        {"name": "first", "endpoint": simulator, "priority": 1, "weight": 1, "deployments": ["gpt-4o-mini"]},
        {"name": "spare", "endpoint": simulator, "priority": 2, "weight": 1, "deployments": ["gpt-4o-mini", "gpt-4.1"]},
    ]
    keyed = [{"api_key_setting": "AZURE_OPENAI_API_KEY", **backend} for backend in listed]
    env = app_env(azurite, "", AZURE_OPENAI_BACKENDS=json.dumps(keyed), EVENT_CACHE_SECONDS="1")
    del env["AZURE_OPENAI_ENDPOINT"]
    created = await make_event(models=(MODEL, "gpt-4.1"))  # before the app's start blocks this loop
    service, url = start_app(env)
    try:
        sdk = client(url, created.key())
        first = sdk.responses.create(model=MODEL, input="one")
        second = sdk.responses.create(model=MODEL, input="two", previous_response_id=first.id)
        assert sdk.responses.retrieve(second.id).previous_response_id == first.id
        # A model the Responses API's backend does not serve: the operator is told, no slot is spent.
        with pytest.raises(openai.APIStatusError) as refused:
            sdk.responses.create(model="gpt-4.1", input="three")
        assert refused.value.status_code == 502 and "AZURE_OPENAI_BACKENDS" in refused.value.message
    finally:
        service.stop()


async def test_langchain_on_the_responses_api(app: str, make_event: MakeEvent) -> None:
    key = (await make_event()).key("lc")
    model = ChatOpenAI(base_url=f"{app}/api/v1", api_key=key, model=MODEL, use_responses_api=True, max_retries=0)
    answer = model.invoke("Say hello to the workshop")
    assert answer.text and answer.response_metadata["id"].startswith("resp_")
    streamed = "".join(chunk.text for chunk in model.stream("Say hello to the workshop"))
    assert streamed == answer.text
