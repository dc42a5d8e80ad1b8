"""An answer upstream cuts short, before the client has a byte of it, is a 502, recorded once.

The upstream here is a small HTTP server that answers a chat request whose prompt holds ``CUT``
with its status, its headers and half of its body, then closes the connection (a backend that
crashed while sending); any other prompt gets the whole answer. The proxy reads a whole answer
before it sends anything (``proxy.upstream.client.read_answer``): the attendee gets
``upstream_error``, the request is in the log with that status, its slot is given back (upstream
failed, not the client), and the broken connection does not poison the pool for the next call.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import orjson
import pytest

from proxy.ledger.reports import request_log
from proxy.storage.tables import Tables
from tests.conftest import MakeEvent
from tests.support import app_env, eventually, serving, start_app

ANSWER = orjson.dumps(
    {
        "id": "chatcmpl-cut",
        "object": "chat.completion",
        "created": 1764720000,
        "model": "gpt-4o-mini",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi " * 200}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 200, "total_tokens": 205},
    }
)


class Cutter(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        cut = b"CUT" in body
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(ANSWER)))
        self.end_headers()
        self.wfile.write(ANSWER[: len(ANSWER) // 2] if cut else ANSWER)
        self.wfile.flush()
        self.close_connection = cut  # the connection ends with the body half sent

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def upstream() -> Iterator[ThreadingHTTPServer]:
    yield from serving(ThreadingHTTPServer(("127.0.0.1", 0), Cutter))


def chat(client: httpx.Client, url: str, key: str, prompt: str) -> httpx.Response:
    return client.post(
        f"{url}/api/v1/chat/completions",
        json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": prompt}]},
        headers={"api-key": key},
    )


async def test_an_answer_cut_upstream_is_a_502_recorded_once_and_its_slot_given_back(
    azurite: str, upstream: ThreadingHTTPServer, make_event: MakeEvent, tables: Tables
) -> None:
    created = await make_event(models=("gpt-4o-mini",), daily_requests=5)
    app, url = start_app(app_env(azurite, f"http://127.0.0.1:{upstream.server_address[1]}"))
    try:
        with httpx.Client(timeout=30) as client:
            cut = [chat(client, url, created.key("amy"), "CUT me short") for _ in range(2)]  # and retried
            whole = chat(client, url, created.key("amy"), "all of it")
    finally:
        app.stop()
    for answer in cut:
        assert answer.status_code == 502, answer.text
        assert answer.json()["error"]["code"] == "upstream_error"
        assert ANSWER[:20].decode() not in answer.text  # nothing of the half answer reaches the attendee
    assert whole.status_code == 200, whole.text
    assert whole.content == ANSWER
    ids = [answer.headers["x-request-id"] for answer in (*cut, whole)]
    log = await eventually(
        lambda: request_log(tables, created.event.id), lambda rows: len(rows) >= 3, what="the three requests logged"
    )
    assert sorted((row["request_id"], row["status"]) for row in log) == sorted(zip(ids, (502, 502, 200), strict=True))
    day = datetime.now(UTC).strftime("%Y-%m-%d")
    entity = await tables.usage.get_entity(created.event.id, f"{day}|amy")
    assert entity["reserved"] == 1  # the delivered answer only: upstream's failures give their slots back
