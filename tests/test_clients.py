"""The clients attendees already use, unchanged, through the real app over HTTP."""

from __future__ import annotations

import httpx
from openai import AzureOpenAI, OpenAI

from proxy.ledger.reports import report, request_log
from proxy.storage.tables import Tables
from tests.conftest import MakeEvent
from tests.support import eventually, sim_stats

API_VERSION = "2024-10-21"
MESSAGES = [{"role": "user", "content": "Say hello to the workshop"}]


def clients(app: str, key: str) -> list[OpenAI]:
    return [
        OpenAI(base_url=f"{app}/api/v1", api_key=key, max_retries=0),
        AzureOpenAI(azure_endpoint=f"{app}/api/v1", api_key=key, api_version=API_VERSION, max_retries=0),
        AzureOpenAI(azure_endpoint=f"{app}/api", api_key=key, api_version=API_VERSION, max_retries=0),
    ]


async def test_chat_and_embeddings_with_every_client(app: str, make_event: MakeEvent) -> None:
    created = await make_event()
    for client in clients(app, created.key()):
        with client:  # closed at once, not left to the garbage collector with an open socket
            check_client(client)


def check_client(client: OpenAI) -> None:
    """Chat, a stream and embeddings through one client."""
    answer = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)  # type: ignore[arg-type]
    assert answer.choices[0].message.content
    assert answer.usage is not None and answer.usage.total_tokens > 0

    chunks = list(client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True))  # type: ignore[arg-type]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == answer.choices[0].message.content
    # The proxy asked upstream for usage; a client that did not ask never sees it.
    assert all(c.usage is None for c in chunks)

    embedded = client.embeddings.create(model="text-embedding-3-small", input=["one", "two"])
    assert len(embedded.data) == 2 and len(embedded.data[0].embedding) == 1536


async def test_stream_usage_shown_when_asked(app: str, make_event: MakeEvent) -> None:
    created = await make_event()
    with OpenAI(base_url=f"{app}/api/v1", api_key=created.key(), max_retries=0) as client:
        chunks = list(
            client.chat.completions.create(
                model="gpt-4o-mini",
                messages=MESSAGES,  # type: ignore[arg-type]
                stream=True,
                stream_options={"include_usage": True},
            )
        )
    usage = [c.usage for c in chunks if c.usage is not None]
    assert len(usage) == 1 and usage[0].total_tokens == usage[0].prompt_tokens + usage[0].completion_tokens


async def test_stream_is_relayed_as_server_sent_events(app: str, make_event: MakeEvent) -> None:
    key = (await make_event()).key()
    body = {"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True}
    with httpx.stream("POST", f"{app}/api/v1/chat/completions", json=body, headers={"api-key": key}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert events[0].startswith('data: {"id":""')  # Azure's prompt_filter_results chunk, first
    assert events[-1] == "data: [DONE]"
    assert not any('"usage":{' in e for e in events)


async def test_usage_report_equals_upstream_tokens(
    app: str, simulator: str, make_event: MakeEvent, tables: Tables
) -> None:
    created = await make_event()
    before = sim_stats(simulator)["usage"]
    for user in ("ann", "ben"):
        # Closed at once: a client left to the garbage collector leaves its socket open (ResourceWarning).
        with OpenAI(base_url=f"{app}/api/v1", api_key=created.key(user), max_retries=0) as client:
            client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)  # type: ignore[arg-type]
            list(client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True))  # type: ignore[arg-type]
            client.embeddings.create(model="text-embedding-3-small", input="tokens please")
    after = sim_stats(simulator)["usage"]
    upstream = {k: after[k] - before[k] for k in after}  # type: ignore[index]

    data = await eventually(
        lambda: report(tables, created.event.id, "user"),
        lambda d: d["totals"]["requests"] == 6,
        what="six recorded requests",
    )
    assert {name: data["totals"][name] for name in ("requests", *upstream)} == {"requests": 6, **upstream}
    assert [row["key"] for row in data["rows"]] == ["ann", "ben"]
    by_model = await report(tables, created.event.id, "model")
    assert {row["key"] for row in by_model["rows"]} == {"gpt-4o-mini", "text-embedding-3-small"}


async def test_every_upstream_request_is_logged_once(app: str, make_event: MakeEvent, tables: Tables) -> None:
    created = await make_event()
    ids = []
    with httpx.Client() as http:
        for index in range(5):
            body = {"model": "gpt-4o-mini", "messages": MESSAGES, "stream": index % 2 == 1}
            response = http.post(f"{app}/api/v1/chat/completions", json=body, headers={"api-key": created.key("cy")})
            assert response.status_code == 200
            ids.append(response.headers["x-request-id"])
        refused = http.post(
            f"{app}/api/v1/chat/completions", json={"model": "nope"}, headers={"api-key": created.key()}
        )
        assert refused.status_code == 404
    # Every answer names its request, refusals too; only those that reached upstream are logged.
    # Stored before each answer ended: no waiting.
    log = await request_log(tables, created.event.id)
    assert sorted(entry["request_id"] for entry in log) == sorted(ids)
    assert refused.headers["x-request-id"] not in ids
    for entry in log:
        assert entry["user"] == "cy" and entry["model"] == "gpt-4o-mini" and entry["kind"] == "chat"
        assert (
            entry["status"] == 200 and entry["total_tokens"] == entry["prompt_tokens"] + entry["completion_tokens"] > 0
        )
        assert entry["latency_ms"] > 0 and entry["time"]
    assert sorted(entry["stream"] for entry in log) == [False, False, False, True, True]
