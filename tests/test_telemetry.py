"""Telemetry to Application Insights: spans and metrics reach a local stand-in for its ingestion endpoint.

The app runs with a connection string whose ``IngestionEndpoint`` is an HTTPS
server here (a self-signed certificate the app trusts through
``REQUESTS_CA_BUNDLE``) and gets its token from the local managed identity
endpoint (App Service's ``IDENTITY_ENDPOINT`` protocol, as in
``tests/test_identity.py``), as ``APPLICATIONINSIGHTS_AUTHENTICATION_STRING``
asks. What the exporter posts is kept, unzipped, as Application Insights
would store it; ``tests/test_workbook.py`` runs the workbook's queries on it.
"""

from __future__ import annotations

import gzip
import json
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import LENIENT, MakeEvent
from tests.support import ORGANIZER_KEY, ROOT, app_env, serving, start_app, start_simulator, wait_for
from tests.test_identity import IDENTITY_HEADER, TOKEN, IdentityEndpoint

IKEY = "00000000-1111-2222-3333-444444444444"
CLIENT_ID = "telemetry-identity-client-id"
PROMPT = "a prompt that must stay private"
SIMULATOR_KEY = "simulator-key"


class Ingestion(ThreadingHTTPServer):
    """Answers like Application Insights' ``/v2.1/track``, keeping every envelope and its request's headers."""

    def __init__(self, cert: Path, key: Path) -> None:
        super().__init__(("127.0.0.1", 0), _IngestionHandler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        self.socket = context.wrap_socket(self.socket, server_side=True)
        self.envelopes: list[dict[str, Any]] = []
        self.authorizations: set[str] = set()
        self.bodies: list[bytes] = []

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.server_address[1]}/"

    def of_type(self, base_type: str) -> list[dict[str, Any]]:
        return [e["data"]["baseData"] for e in list(self.envelopes) if e["data"]["baseType"] == base_type]


class _IngestionHandler(BaseHTTPRequestHandler):
    server: Ingestion

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        if self.headers.get("content-encoding") == "gzip":
            body = gzip.decompress(body)
        self.server.bodies.append(body)
        self.server.authorizations.add(self.headers.get("authorization", ""))
        envelopes = json.loads(body)
        self.server.envelopes.extend(envelopes)
        answer = json.dumps({"itemsReceived": len(envelopes), "itemsAccepted": len(envelopes), "errors": []}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("ingestion-tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1"),
            *("-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


@pytest.fixture(scope="module")
def ingestion(tls: tuple[Path, Path]) -> Iterator[Ingestion]:
    server = Ingestion(*tls)
    yield from serving(server)


@pytest.fixture(scope="module")
def identity() -> Iterator[IdentityEndpoint]:
    yield from serving(IdentityEndpoint())


def telemetry_env(
    azurite: str, upstream: str, ingestion: Ingestion, identity: IdentityEndpoint, cert: Path
) -> dict[str, str]:
    return app_env(
        azurite,
        upstream,
        APPLICATIONINSIGHTS_CONNECTION_STRING=f"InstrumentationKey={IKEY};IngestionEndpoint={ingestion.url}",
        APPLICATIONINSIGHTS_AUTHENTICATION_STRING=f"Authorization=AAD;ClientId={CLIENT_ID}",
        IDENTITY_ENDPOINT=f"http://127.0.0.1:{identity.server_address[1]}/msi/token",
        IDENTITY_HEADER=IDENTITY_HEADER,
        REQUESTS_CA_BUNDLE=str(cert),
        # Export at once instead of every 60 s (metrics) and 5 s (spans); no calls to Microsoft's own endpoints.
        OTEL_METRIC_EXPORT_INTERVAL="500",
        OTEL_BSP_SCHEDULE_DELAY="100",
        APPLICATIONINSIGHTS_STATSBEAT_DISABLED_ALL="true",
        APPLICATIONINSIGHTS_CONTROLPLANE_DISABLED="true",
        **LENIENT,
    )


@pytest.fixture(scope="module")
async def traffic(
    azurite: str, tls: tuple[Path, Path], ingestion: Ingestion, identity: IdentityEndpoint, make_event: MakeEvent
) -> AsyncIterator[dict[str, Any]]:
    """One app with telemetry on, and the requests it answered, by kind: their ids."""
    events = {"open": await make_event(max_tokens=100), "capped": await make_event(daily_requests=1)}
    # Upstream allows 4 requests a minute: the 5th is its own 429, passed through.
    simulator, sim_url = start_simulator("--rpm-limit", "4")
    app, url = start_app(telemetry_env(azurite, sim_url, ingestion, identity, tls[0]))
    try:
        yield {"app": app, "url": url, "events": events, "ids": send_traffic(url, events)}
    finally:
        app.stop()
        simulator.stop()


def send_traffic(url: str, events: dict[str, Any]) -> dict[str, str]:
    chat = f"{url}/api/v1/chat/completions"
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": PROMPT}]}
    key, capped = {"api-key": events["open"].key()}, {"api-key": events["capped"].key("bob")}
    ids = {}
    with httpx.Client(timeout=30) as http:

        def sent(name: str, response: httpx.Response, status: int) -> None:
            assert response.status_code == status, response.text
            ids[name] = response.headers["x-request-id"]

        sent("chat", http.post(chat, json=body, headers=key), 200)
        with http.stream("POST", chat, json={**body, "stream": True}, headers=key) as streamed:
            assert b"[DONE]" in streamed.read()
        sent("stream", streamed, 200)
        sent("capped_ok", http.post(chat, json=body, headers=capped), 200)
        sent("capped", http.post(chat, json=body, headers=capped), 429)
        sent("too_many_tokens", http.post(chat, json={**body, "max_tokens": 1000}, headers=key), 400)
        sent("unknown_code", http.post(chat, json=body, headers={"api-key": "NOPE-NOPE-NOPE/eve"}), 401)
        sent(
            "organizer", http.get(f"{url}/api/manage/events", headers={"authorization": f"Bearer {ORGANIZER_KEY}"}), 200
        )
        sent("chat_2", http.post(chat, json=body, headers=key), 200)
        sent("throttled", http.post(chat, json=body, headers=key), 429)  # upstream's 5th in a minute
    return ids


def test_spans_and_metrics_arrive_with_the_token_and_no_secret(
    traffic: dict[str, Any], ingestion: Ingestion, identity: IdentityEndpoint
) -> None:
    ids, events = traffic["ids"], traffic["events"]
    event = events["open"].event.id

    def requests() -> dict[str, dict[str, Any]]:
        return {r["properties"].get("proxy.request_id"): r for r in ingestion.of_type("RequestData")}

    def metric_names() -> set[str]:
        return {m["metrics"][0]["name"] for m in ingestion.of_type("MetricData")}

    wanted_metrics = {
        "proxy.requests",
        "proxy.tokens",
        "proxy.cap_refusals",
        "proxy.upstream.throttled",
        "proxy.stream.first_chunk",
    }
    wait_for(lambda: set(ids.values()) <= set(requests()), timeout=30, what="a request span per request")
    wait_for(lambda: wanted_metrics <= metric_names(), timeout=30, what="the metrics")

    # Every post carried the managed identity's token, got once from the identity endpoint.
    assert ingestion.authorizations == {f"Bearer {TOKEN}"}
    monitor = [q for q in identity.requests if q.get("resource", [""])[0].startswith("https://monitor.azure.com")]
    assert len(monitor) == 1 and monitor[0]["client_id"] == [CLIENT_ID], identity.requests

    spans = requests()
    chat = spans[ids["chat"]]
    assert chat["name"] == "POST /api/v1/chat/completions" and chat["responseCode"] == "200"
    props = chat["properties"]
    assert (
        props["proxy.event"] == event and props["proxy.model"] == "gpt-4o-mini" and props["proxy.attendee"] == "alice"
    )
    assert props["proxy.route"] == "/api/v1/chat/completions" and int(props["proxy.prompt_tokens"]) > 0
    assert spans[ids["capped"]]["properties"]["proxy.error"] == "daily_request_cap_exceeded"
    assert spans[ids["throttled"]]["properties"]["proxy.upstream_status"] == "429"
    assert spans[ids["stream"]]["properties"]["proxy.stream"] == "True"
    assert float(spans[ids["stream"]]["properties"]["proxy.first_chunk_ms"]) > 0

    # The steps are the request's children: same operation, parent the request's span.
    by_id = {e["data"]["baseData"]["id"]: e for e in ingestion.envelopes if e["data"]["baseType"] == "RequestData"}
    chat_envelope = next(
        e for e in by_id.values() if e["data"]["baseData"]["properties"].get("proxy.request_id") == ids["chat"]
    )
    operation = chat_envelope["tags"]["ai.operation.id"]
    steps = {
        e["data"]["baseData"]["name"]: e["tags"].get("ai.operation.parentId")
        for e in ingestion.envelopes
        if e["data"]["baseType"] == "RemoteDependencyData" and e["tags"]["ai.operation.id"] == operation
    }
    request_span = chat_envelope["data"]["baseData"]["id"]
    assert steps == dict.fromkeys(["event lookup", "cap reservation", "upstream call", "usage commit"], request_span)
    stream_envelope = next(
        e for e in by_id.values() if e["data"]["baseData"]["properties"].get("proxy.request_id") == ids["stream"]
    )
    stream_steps = {
        e["data"]["baseData"]["name"]
        for e in ingestion.envelopes
        if e["data"]["baseType"] == "RemoteDependencyData"
        and e["tags"]["ai.operation.id"] == stream_envelope["tags"]["ai.operation.id"]
    }
    assert "usage commit" in stream_steps  # committed at the stream's end, still inside its request

    metrics: dict[str, list[dict[str, Any]]] = {}
    for data in ingestion.of_type("MetricData"):
        metrics.setdefault(data["metrics"][0]["name"], []).append(data)
    dims = [m["properties"] for m in metrics["proxy.requests"]]
    assert {"event": event, "model": "gpt-4o-mini", "status": "200", "error": ""} in dims
    refusals = [m["properties"] for m in metrics["proxy.cap_refusals"]]
    assert {"event": events["capped"].event.id, "error": "daily_request_cap_exceeded"} in refusals
    assert {"event": event, "error": "max_tokens_exceeds_cap"} in refusals
    tokens = {(m["properties"]["event"], m["properties"]["type"]) for m in metrics["proxy.tokens"]}
    assert {(event, "prompt"), (event, "completion")} <= tokens
    assert metrics["proxy.upstream.throttled"][0]["properties"]["model"] == "gpt-4o-mini"

    # Logs are the host's to send (the access lines among them): none of the worker's go a second time.
    assert not ingestion.of_type("MessageData")

    # No secret anywhere in what was sent: codes, keys, tokens, the organizer key, content.
    everything = b"\n".join(ingestion.bodies).decode()
    secrets = [events["open"].code, events["capped"].code, "NOPE-NOPE-NOPE", ORGANIZER_KEY, SIMULATOR_KEY]
    for secret in [*secrets, TOKEN, IDENTITY_HEADER, PROMPT]:
        assert secret not in everything, secret


def test_without_the_setting_the_exporter_is_not_even_imported(azurite: str, simulator: str) -> None:
    """The cold start pays nothing for telemetry when it is off; with the setting, the SDK and distro load.

    (``opentelemetry`` itself, the API, is imported by FastAPI in any case.)
    """
    heavy = ("azure.monitor", "opentelemetry.sdk")
    probe = f"import sys, function_app; print(sorted({{m for m in sys.modules if m.startswith({heavy!r})}}))"

    def loaded(**extra: str) -> list[str]:
        env = app_env(azurite, simulator, **extra, APPLICATIONINSIGHTS_STATSBEAT_DISABLED_ALL="true")
        done = subprocess.run([sys.executable, "-c", probe], env=env, cwd=ROOT, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        return list(json.loads(done.stdout.strip().splitlines()[-1].replace("'", '"')))

    assert loaded() == []
    on = f"InstrumentationKey={IKEY};IngestionEndpoint=https://127.0.0.1:9/"
    modules = loaded(APPLICATIONINSIGHTS_CONNECTION_STRING=on, APPLICATIONINSIGHTS_CONTROLPLANE_DISABLED="true")
    assert "azure.monitor.opentelemetry" in modules and "opentelemetry.sdk.trace" in modules


# The workbook's queries (infra/workbook.json), run with duckdb-kql on what the exporter sent, stored in tables
# shaped like Application Insights' own: requests, dependencies, customMetrics.
WORKBOOK = ROOT / "infra" / "workbook.json"


def workbook_queries() -> dict[str, str]:
    """Each query of the workbook by item name (the Event parameter's as ``event-parameter``)."""
    items = json.loads(WORKBOOK.read_text())["items"]
    queries = {item["name"]: item["content"]["query"] for item in items if item["type"] == 3}
    [parameters] = [item["content"]["parameters"] for item in items if item["type"] == 9]
    queries["event-parameter"] = next(p["query"] for p in parameters if p["name"] == "Event")
    return queries


def _milliseconds(duration: str) -> float:
    """Application Insights' ``d.hh:mm:ss.ffffff`` as milliseconds."""
    days, clock = duration.split(".", 1)
    hours, minutes, seconds = clock.split(":")
    return ((int(days) * 24 + int(hours)) * 60 + int(minutes)) * 60_000 + float(seconds) * 1000


def telemetry_tables(envelopes: list[dict[str, Any]]) -> Any:
    import duckdb_kql

    con = duckdb_kql.connect()
    spans = "timestamp TIMESTAMP, id VARCHAR, name VARCHAR, duration DOUBLE, resultCode VARCHAR, success BOOLEAN"
    spans += ", operation_Id VARCHAR, operation_ParentId VARCHAR, itemCount INTEGER, customDimensions JSON"
    con.sql(f"CREATE TABLE requests ({spans})")
    con.sql(f"CREATE TABLE dependencies ({spans})")
    con.sql(
        "CREATE TABLE customMetrics (timestamp TIMESTAMP, name VARCHAR, value DOUBLE, valueSum DOUBLE,"
        " valueCount INTEGER, valueMin DOUBLE, valueMax DOUBLE, itemCount INTEGER, customDimensions JSON)"
    )
    for envelope in envelopes:
        data, tags = envelope["data"]["baseData"], envelope["tags"]
        timestamp = envelope["time"].replace("T", " ").rstrip("Z")[:26]
        dimensions = json.dumps(data.get("properties", {}))
        kind = envelope["data"]["baseType"]
        if kind in ("RequestData", "RemoteDependencyData"):
            table = "requests" if kind == "RequestData" else "dependencies"
            row = (timestamp, data["id"], data["name"], _milliseconds(data["duration"]), data.get("responseCode", ""))
            row += (data["success"], tags.get("ai.operation.id"), tags.get("ai.operation.parentId"), 1, dimensions)
            con.execute(f"INSERT INTO {table} VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", row)
        elif kind == "MetricData":
            point = data["metrics"][0]
            count = point.get("count") or 1
            minimum, maximum = point.get("min", point["value"]), point.get("max", point["value"])
            row = (timestamp, point["name"], point["value"], point["value"], count, minimum, maximum, 1, dimensions)
            con.execute("INSERT INTO customMetrics VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", row)
    return con


def test_the_workbook_queries_run_on_the_telemetry_sent(traffic: dict[str, Any], ingestion: Ingestion) -> None:
    import duckdb_kql

    ids, events = traffic["ids"], traffic["events"]
    wait_for(
        lambda: (
            set(ids.values()) <= {r["properties"].get("proxy.request_id") for r in ingestion.of_type("RequestData")}
        ),
        timeout=30,
    )
    wait_for(lambda: "proxy.tokens" in {m["metrics"][0]["name"] for m in ingestion.of_type("MetricData")}, timeout=30)
    con = telemetry_tables(list(ingestion.envelopes))
    queries = workbook_queries()

    def run(name: str, event: str) -> list[dict[str, Any]]:
        kql = queries[name].replace("{TimeRange}", "> ago(1d)").replace("{Event}", event)
        result = duckdb_kql.query(con, kql)
        columns = [c[0] for c in result.description]
        return [dict(zip(columns, row, strict=True)) for row in result.fetchall()]

    open_event, capped = events["open"].event.id, events["capped"].event.id
    assert {row["event"] for row in run("event-parameter", "")} >= {open_event, capped}
    by_model = run("requests-by-model", open_event)
    # chat, stream, too_many_tokens, chat_2, throttled (the unknown code and the organizer's have no event)
    assert sum(row["requests"] for row in by_model) == 5 and {row["model"] for row in by_model} == {"gpt-4o-mini"}
    tokens = run("tokens-by-model", open_event)
    assert {row["type"] for row in tokens} == {"prompt", "completion"} and all(row["tokens"] > 0 for row in tokens)
    attendees = run("attendees", open_event)
    assert [(row["attendee"], row["requests"], row["refused"]) for row in attendees] == [("alice", 5, 2)]
    assert attendees[0]["prompt_tokens"] > 0 and attendees[0]["completion_tokens"] > 0
    refusals = {(row["error"], row["status"]): row["requests"] for row in run("refusals", capped)}
    assert refusals == {("daily_request_cap_exceeded", "429"): 1}
    assert {row["error"] for row in run("refusals", open_event)} == {"max_tokens_exceeds_cap"}
    throttled = run("upstream-throttling", open_event)
    assert sum(row["throttled"] for row in throttled) == 1 and throttled[0]["backend"].startswith("127.0.0.1:")
    latencies = run("latency", open_event)  # one row per 5 minutes: the requests may straddle two
    assert all(0 < row["p50"] <= row["p95"] <= row["p99"] for row in latencies)
    assert any(row["upstream_p50"] > 0 for row in latencies) and any(row["first_chunk_p50"] for row in latencies)
