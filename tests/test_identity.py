"""Managed identity upstream: App Service's IDENTITY_ENDPOINT protocol, served locally."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import pytest
from openai import OpenAI

from tests.conftest import MakeEvent
from tests.support import app_env, sim_stats, start_app, start_simulator

TOKEN = "managed-identity-token-1234"
IDENTITY_HEADER = "identity-header-secret"


class IdentityEndpoint(ThreadingHTTPServer):
    """Answers like App Service's managed identity endpoint, counting token requests."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _IdentityHandler)
        self.requests: list[dict[str, list[str]]] = []


class _IdentityHandler(BaseHTTPRequestHandler):
    server: IdentityEndpoint

    def do_GET(self) -> None:
        query = parse_qs(urlparse(self.path).query)
        if self.headers.get("X-IDENTITY-HEADER") != IDENTITY_HEADER:
            self.send_response(401)
            self.end_headers()
            return
        self.server.requests.append(query)
        body = json.dumps(
            {
                "access_token": TOKEN,
                "expires_on": str(int(time.time()) + 3600),
                "resource": query.get("resource", [""])[0],
                "token_type": "Bearer",
            }
        ).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def identity() -> Iterator[IdentityEndpoint]:
    server = IdentityEndpoint()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


async def test_bearer_token_from_managed_identity_reaches_upstream_once(
    azurite: str, identity: IdentityEndpoint, make_event: MakeEvent
) -> None:
    simulator, sim_url = start_simulator("--bearer-token", TOKEN)
    env = app_env(
        azurite,
        sim_url,
        IDENTITY_ENDPOINT=f"http://127.0.0.1:{identity.server_address[1]}/msi/token",
        IDENTITY_HEADER=IDENTITY_HEADER,
    )
    del env["AZURE_OPENAI_API_KEY"]
    app, url = start_app(env)
    try:
        created = await make_event()
        client = OpenAI(base_url=f"{url}/api/v1", api_key=created.key(), max_retries=0)
        for _ in range(10):
            client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
        list(
            client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True
            )
        )
        client.embeddings.create(model="text-embedding-3-small", input="x")
        stats = sim_stats(sim_url)
        assert stats["requests"] == 12
        assert stats["authorizations"] == [f"Bearer {TOKEN}"]
        assert len(identity.requests) == 1
        assert identity.requests[0]["resource"] == ["https://cognitiveservices.azure.com"]
        assert TOKEN not in app.text and IDENTITY_HEADER not in app.text
    finally:
        app.stop()
        simulator.stop()
