"""Managed identity, for upstream and for Table Storage: App Service's IDENTITY_ENDPOINT protocol, served locally."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import httpx
import pytest
from openai import OpenAI

from tests.conftest import MakeEvent
from tests.support import ROOT, app_env, serving, sim_stats, start_app, start_azurite, start_simulator

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
        resource = query.get("resource", [""])[0]
        body = json.dumps(
            {
                "access_token": storage_jwt() if resource == "https://storage.azure.com" else TOKEN,
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


def storage_jwt() -> str:
    """A token shaped like Entra ID's for storage: Azurite's basic OAuth checks its claims, not a signature."""
    now = int(time.time())
    claims = {"aud": "https://storage.azure.com", "iss": "https://sts.windows.net/tenant-id/", "iat": now}
    claims |= {"nbf": now - 60, "exp": now + 3600, "oid": "proxy-identity"}

    def part(value: dict[str, object]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")

    return f"{part({'alg': 'RS256', 'typ': 'JWT'})}.{part(claims)}.c2lnbmF0dXJl"


@pytest.fixture(scope="module")
def identity() -> Iterator[IdentityEndpoint]:
    yield from serving(IdentityEndpoint())


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


@pytest.fixture(scope="module")
def oauth_azurite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, Path]]:
    """Azurite over HTTPS with basic OAuth, as Table Storage is reached in Azure: (endpoint, key string, cert)."""
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    service, connection_string = start_azurite(
        "--oauth", "basic", "--cert", str(cert), "--key", str(key), scheme="https"
    )
    endpoint = connection_string.split("TableEndpoint=")[1].rstrip(";")
    yield endpoint, connection_string, cert
    service.stop()


def test_table_storage_through_managed_identity(
    oauth_azurite: tuple[str, str, Path], identity: IdentityEndpoint, simulator: str, tmp_path: Path
) -> None:
    """The app and the organizer CLI reach Table Storage with a token, as in Azure (no key anywhere)."""
    endpoint, connection_string, cert = oauth_azurite
    env = app_env(
        connection_string,
        simulator,
        STORAGE_TABLE_ENDPOINT=endpoint,
        IDENTITY_ENDPOINT=f"http://127.0.0.1:{identity.server_address[1]}/msi/token",
        IDENTITY_HEADER=IDENTITY_HEADER,
        SSL_CERT_FILE=str(cert),
        PYTHONPATH=str(ROOT),
    )
    del env["STORAGE_CONNECTION_STRING"]

    def manage(*args: str) -> dict[str, Any]:
        command = [sys.executable, "-m", "proxy.manage", *args, "--json"]
        done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return dict(json.loads(done.stdout))

    now = datetime.now(UTC)
    window = ["--start", (now - timedelta(hours=1)).isoformat(), "--end", (now + timedelta(hours=1)).isoformat()]
    created = manage(
        "events", "create", "--name", "Identity", "--code", "MI-Kettle-37", "--daily-requests", "3", *window
    )
    before = len(identity.requests)
    app, url = start_app(env)
    try:
        with httpx.Client() as http:
            statuses = [
                http.post(
                    f"{url}/api/v1/chat/completions",
                    json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
                    headers={"api-key": "MI-Kettle-37/alice"},
                ).status_code
                for _ in range(4)
            ]
        # The cap was reserved, and refused, through the token: storage was really used.
        assert statuses == [200, 200, 200, 429]
        app.stop()  # drains the usage writes
        usage = manage("usage", created["id"])
        assert usage["totals"]["requests"] == 3 and usage["rows"][0]["key"] == "alice"
        storage_tokens = [q for q in identity.requests[before:] if q["resource"] == ["https://storage.azure.com"]]
        assert len(storage_tokens) == 2  # one per process: the app, then the CLI
    finally:
        app.stop()
