"""What one answer from upstream sets never rides on another attendee's request.

The proxy calls Azure OpenAI for every attendee over one pooled client. A
cookie that an upstream answer sets (a load balancer's affinity cookie, say)
must not be kept and sent along with the next attendee's request. The
upstream here is a small HTTP server on ``localhost`` (a host name, so that a
cookie jar would accept its cookies: aiohttp's refuses those of bare IP
addresses) that sets a cookie on every answer and records the Cookie header
of every request it gets.
"""

from __future__ import annotations

from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import orjson
import pytest

from tests.conftest import MakeEvent
from tests.support import app_env, serving, start_app

ANSWER = orjson.dumps(
    {
        "id": "chatcmpl-cookies",
        "object": "chat.completion",
        "created": 1764720000,
        "model": "gpt-4o-mini",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
    }
)


class CookieSetter(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    cookies_seen: list[str | None] = []

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.cookies_seen.append(self.headers.get("Cookie"))
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(ANSWER)))
        self.send_header("Set-Cookie", f"affinity=caller-{len(self.cookies_seen)}; Path=/")
        self.end_headers()
        self.wfile.write(ANSWER)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def upstream() -> Iterator[ThreadingHTTPServer]:
    yield from serving(ThreadingHTTPServer(("127.0.0.1", 0), CookieSetter))


async def test_a_cookie_upstream_set_for_one_attendee_is_not_sent_for_another(
    azurite: str, upstream: ThreadingHTTPServer, make_event: MakeEvent
) -> None:
    new = await make_event(models=("gpt-4o-mini",))
    port = upstream.server_address[1]
    app, url = start_app(app_env(azurite, f"http://localhost:{port}"))
    try:
        with httpx.Client(timeout=30) as client:
            for user in ("alice", "bob", "carol"):
                answer = client.post(
                    f"{url}/api/v1/chat/completions",
                    json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
                    headers={"api-key": new.key(user)},
                )
                assert answer.status_code == 200, answer.text
                assert "set-cookie" not in answer.headers  # nor is it handed to the attendee
    finally:
        app.stop()
    assert CookieSetter.cookies_seen == [None, None, None]
