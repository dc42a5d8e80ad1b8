"""Budget alerts over real HTTP: one POST per threshold across two app processes, and after an outage.

The receiver is a real HTTP server on loopback. Requests cross the thresholds
concurrently on two app processes (each with its own worker behind the host
emulator), which share Azurite: the claim in storage must let only one of them
send each alert. During an outage nothing listens on the receiver's port; the
alert is retried until it comes back, then delivered once.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from proxy.admission.alerts import Alerts, check_webhook, masked
from proxy.config.hashing import SecretHasher
from proxy.policy.events import EventStore
from proxy.storage.tables import Tables
from tests.conftest import MakeEvent
from tests.support import CODE_HASH_KEY, Service, eventually, free_port


class Receiver:
    """An incoming-webhook endpoint on 127.0.0.1 that keeps every JSON body POSTed to it."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.bodies: list[dict[str, Any]] = []
        self._server: ThreadingHTTPServer | None = None

    def start(self) -> None:
        received = self.bodies

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", 0))
                received.append(json.loads(self.rfile.read(length)))
                self.send_response(200)
                self.send_header("content-length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    made = Receiver(free_port())
    yield made
    made.stop()


async def alert_rows(tables: Tables, event_id: str) -> list[dict[str, Any]]:
    query = tables.usage.query_entities(
        "PartitionKey eq @pk and RowKey ge @first and RowKey lt @after",
        parameters={"pk": event_id, "first": "alert|", "after": "alert}"},
    )
    return [dict(row) async for row in query]


async def chat(client: httpx.AsyncClient, base: str, key: str) -> int:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    answer = await client.post(f"{base}/api/v1/chat/completions", json=body, headers={"api-key": key})
    return answer.status_code


async def test_one_post_per_threshold_while_100_requests_cross_it_on_two_processes(
    app: str, app_process: tuple[Service, str], make_event: MakeEvent, tables: Tables, receiver: Receiver
) -> None:
    receiver.start()
    token = secrets.token_urlsafe(16)  # a webhook's path is its secret: it must reach no log line
    created = await make_event(
        name="Alerted", event_requests=100, daily_requests=None,
        alert_webhook=f"http://127.0.0.1:{receiver.port}/hooks/{token}",
    )  # fmt: skip
    second, second_url = app_process
    limits = httpx.Limits(max_connections=100)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        statuses = await asyncio.gather(*(
            chat(client, app if i % 2 else second_url, created.key(f"user{i % 10}")) for i in range(100)
        ))  # fmt: skip
        assert statuses.count(200) == 100
        # One more, refused: the budget is used up (and the event is looked at again).
        assert await chat(client, second_url, created.key("late")) == 429

    rows = await eventually(lambda: alert_rows(tables, created.event.id),
                            lambda found: len(found) == 2 and all(r["state"] == "delivered" for r in found),
                            timeout=30, what="both alerts delivered")  # fmt: skip
    assert sorted((body["budget"], body["percent"]) for body in receiver.bodies) == [
        ("event_requests", 80),
        ("event_requests", 100),
    ]
    assert len(receiver.bodies) == 2 and all(row["attempts"] == 1 for row in rows)
    for body in receiver.bodies:
        assert body.keys() == {"text", "event_id", "event", "budget", "used", "limit", "percent"}
        assert body["event_id"] == created.event.id and body["event"] == "Alerted" and body["limit"] == 100
        assert body["used"] >= body["percent"]
        assert "Alerted" in body["text"] and "100" in body["text"]
    assert token not in second.text


async def test_an_alert_waits_out_an_outage_and_is_delivered_once(
    app: str, make_event: MakeEvent, tables: Tables, receiver: Receiver
) -> None:
    # Nothing listens on the receiver's port yet: connections are refused.
    created = await make_event(name="Outage", event_tokens=300, daily_requests=None,
                               alert_webhook=f"http://127.0.0.1:{receiver.port}/hook")  # fmt: skip
    async with httpx.AsyncClient(timeout=60) as client:
        for _ in range(40):
            if await chat(client, app, created.key()) != 200:
                break
    sending = await eventually(
        lambda: alert_rows(tables, created.event.id),
        lambda found: len(found) == 2 and all(row["attempts"] >= 1 for row in found),
        timeout=30,
        what="both alerts attempted while the receiver is down",
    )
    assert all(row["state"] == "sending" for row in sending)
    receiver.start()
    await eventually(lambda: alert_rows(tables, created.event.id),
                     lambda found: all(row["state"] == "delivered" for row in found),
                     timeout=60, what="the alerts delivered once the receiver is back")  # fmt: skip
    assert sorted((body["budget"], body["percent"]) for body in receiver.bodies) == [
        ("event_tokens", 80),
        ("event_tokens", 100),
    ]


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://hooks.example.com/x", "must be https://"),
        ("ftp://hooks.example.com/x", "must be an https:// URL"),
        ("https://169.254.169.254/metadata", "private or link-local"),
        ("https://10.0.0.5/hook", "private or link-local"),
        ("https://user:pw@hooks.example.com/x", "user name or password"),
    ],
)
def test_webhook_urls_are_checked(url: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        check_webhook(url)
    assert check_webhook("https://hooks.slack.com/services/T0/B0/secret")
    assert masked("https://hooks.slack.com/services/T0/B0/secret") == "https://hooks.slack.com/…"


def test_the_api_takes_and_masks_the_webhook(app: str, http: httpx.Client) -> None:
    from tests.test_manage_api import AUTH, new_event

    created = new_event(http, app)
    url = f"{app}/api/manage/events/{created['id']}"
    patched = http.patch(url, json={"alert_webhook": "https://hooks.slack.com/services/T0/B0/s3cr3t"}, headers=AUTH)
    assert patched.status_code == 200 and patched.json()["alert_webhook"] == "https://hooks.slack.com/…"
    assert "s3cr3t" not in http.get(url, headers=AUTH).text
    refused = http.patch(url, json={"alert_webhook": "http://hooks.slack.com/x"}, headers=AUTH)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "alert_webhook"
    cleared = http.patch(url, json={"alert_webhook": None}, headers=AUTH)
    assert cleared.json()["alert_webhook"] is None


async def test_the_timer_sends_an_alert_whose_sender_died(
    make_event: MakeEvent, tables: Tables, receiver: Receiver
) -> None:
    """A claim left 'sending' past its lease (its instance was killed) is taken over and sent by the sweep."""
    receiver.start()
    created = await make_event(name="Orphaned", event_requests=10, alert_webhook=f"http://127.0.0.1:{receiver.port}/h")
    payload = {
        "text": "Event 'Orphaned' has used 80 % of its budget of 10 requests: 8 used.",
        "event_id": created.event.id,
        "event": "Orphaned",
        "budget": "event_requests",
        "used": 8,
        "limit": 10,
        "percent": 80,
    }
    for row, claimed_at in (("alert|event_requests|80", time.time() - 120), ("alert|event_requests|100", time.time())):
        await tables.usage_entities.insert({"PartitionKey": created.event.id, "RowKey": row, "state": "sending",
                                            "owner": "dead", "attempt_at": claimed_at, "attempts": 1,
                                            "payload": json.dumps(payload)})  # fmt: skip
    alerts = Alerts(tables, local=True)
    try:
        assert await alerts.sweep(EventStore(tables, SecretHasher(CODE_HASH_KEY), 0)) == 1  # the fresh claim is left
        await alerts.drain(timeout=30)
    finally:
        await alerts.aclose()
    assert receiver.bodies == [payload]
    rows = {row["RowKey"]: row for row in await alert_rows(tables, created.event.id)}
    assert rows["alert|event_requests|80"]["state"] == "delivered"
    assert rows["alert|event_requests|100"]["state"] == "sending"  # its claimant is still within its lease
