"""The host emulator (devtools/funchost/host.py) with the real Python worker, on a tiny app (tests/apps).

Routing, the body limit, streaming, a failing function, functionTimeout, a killed worker,
a stop signal, indexing failures and timers: each as the Functions host does it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from devtools.funchost.routing import compile_template
from devtools.funchost.timers import Schedule
from tests.support import ROOT, Service, start_app, wait_for, worker_pids

APPS = Path(__file__).parent / "apps"
LIMIT = 4096
TIMEOUT_SECONDS = 3


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AzureFunctionsJobHost__", "FUNCTIONS_"))}
    return {**env, **extra}


@pytest.fixture(scope="module")
def host() -> Iterator[tuple[Service, str]]:
    env = base_env(
        FUNCTIONS_REQUEST_BODY_SIZE_LIMIT=str(LIMIT),
        AzureFunctionsJobHost__functionTimeout=f"00:00:{TIMEOUT_SECONDS:02d}",
    )
    service, url = start_app(env, "--timer-interval", "0", app_dir=APPS / "routes")
    yield service, url
    service.stop()


@pytest.fixture(scope="module")
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=30) as http:
        yield http


def function(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return str(response.json()["function"])


def test_routes_like_the_host(host: tuple[Service, str], client: httpx.Client) -> None:
    _, url = host
    assert function(client.get(f"{url}/api/items/special")) == "literal"
    assert function(client.get(f"{url}/api/ITEMS/Special")) == "literal", "literals match whatever their case"
    other = client.get(f"{url}/api/Items/Other/")
    assert function(other) == "parameter" and other.json()["params"] == {"id": "Other"}, "values keep their case"
    nested = client.get(f"{url}/api/items/7/parts/a/b")
    assert function(nested) == "nested" and nested.json()["params"] == {"id": "7", "rest": "a/b"}
    deep = client.get(f"{url}/api/some/deep/path")
    assert function(deep) == "catch_all" and deep.json()["params"] == {"path": "some/deep/path"}
    bare_prefix = client.get(f"{url}/api")
    assert function(bare_prefix) == "catch_all" and bare_prefix.json()["params"] == {}, "an empty catch-all is left out"


def test_a_method_no_route_takes_falls_through(host: tuple[Service, str], client: httpx.Client) -> None:
    _, url = host
    posted = client.post(f"{url}/api/items/special")
    assert function(posted) == "catch_all" and posted.json()["method"] == "POST"
    for method in ("OPTIONS", "HEAD", "PUT"):
        refused = client.request(method, f"{url}/api/items/special")
        assert refused.status_code == 404 and refused.content == b"", method
    outside = client.get(f"{url}/items/special")
    assert outside.status_code == 404 and outside.content == b"", "only paths under the route prefix are routed"


def test_forwards_like_yarp(host: tuple[Service, str], client: httpx.Client) -> None:
    _, url = host
    headers = client.get(f"{url}/api/items/special", headers={"x-custom": "kept"}).json()["headers"]
    assert headers["x-custom"] == "kept"
    assert headers["x-ms-invocation-id"]
    assert headers["x-forwarded-for"] == "127.0.0.1" and headers["x-forwarded-host"] == url.split("//", 1)[1]
    assert headers["host"] != url.split("//", 1)[1], "the Host header is the worker's, not the client's"


def test_request_body_limit(host: tuple[Service, str], client: httpx.Client) -> None:
    _, url = host
    assert client.post(f"{url}/api/upload", content=b"x" * LIMIT).json() == {"length": LIMIT}
    over = client.post(f"{url}/api/upload", content=b"x" * (LIMIT + 1))
    assert over.status_code == 413 and over.content == b""

    def chunked() -> Iterator[bytes]:
        for _ in range(5):
            yield b"y" * 1000

    streamed = client.post(f"{url}/api/upload", content=chunked())
    assert streamed.status_code == 413 and streamed.content == b"", "a chunked body is counted as it arrives"


def test_responses_stream_chunk_by_chunk(host: tuple[Service, str], client: httpx.Client) -> None:
    _, url = host
    with client.stream("GET", f"{url}/api/stream/5") as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        arrivals = list(response.iter_raw())
    assert b"".join(arrivals) == b"".join(f"data: {i}\n\n".encode() for i in range(5))
    # Written 0.2 s apart: buffered, they would arrive together. What came first holds no more than the chunks
    # written by then (not timed: a reader slow to start may get the first few at once, never the last 0.8 s early).
    assert b"data: 4" not in arrivals[0], f"the first read has the last chunk too: {arrivals}"


def test_an_escaping_exception_is_a_bare_500(host: tuple[Service, str], client: httpx.Client) -> None:
    service, url = host
    response = client.get(f"{url}/api/boom")
    assert response.status_code == 500 and response.text == "Internal Server Error"
    assert response.headers["content-type"].startswith("text/plain")
    wait_for(lambda: "Executed 'Functions.boom' (Failed" in service.text, what="the host's failure line")
    assert "boom on purpose" in service.text


def test_function_timeout_kills_and_restarts_the_worker(host: tuple[Service, str], client: httpx.Client) -> None:
    service, url = host
    before = worker_pids(service)
    started = time.monotonic()
    response = client.get(f"{url}/api/sleep/30")
    assert response.status_code == 500 and response.content == b""
    assert TIMEOUT_SECONDS <= time.monotonic() - started < TIMEOUT_SECONDS + 5
    assert "functionTimeout (3 s) expired for sleep" in service.text
    wait_for(lambda: len(worker_pids(service)) > len(before), timeout=30, what="a new worker")
    assert client.get(f"{url}/api/items/special").json()["pid"] == worker_pids(service)[-1]


def test_a_killed_worker_is_restarted(host: tuple[Service, str], client: httpx.Client) -> None:
    service, url = host
    old = client.get(f"{url}/api/items/special").json()["pid"]
    assert old == worker_pids(service)[-1]
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: worker_pids(service)[-1] != old, timeout=30, what="a new worker")
    assert f"worker pid={old} exited with code -9; restarting it" in service.text
    assert client.get(f"{url}/api/items/special").json()["pid"] == worker_pids(service)[-1]


def test_a_stop_signal_kills_the_worker_mid_stream() -> None:
    service, url = start_app(base_env(), "--timer-interval", "0", app_dir=APPS / "routes")
    worker = worker_pids(service)[-1]
    with httpx.Client(timeout=30) as http, http.stream("GET", f"{url}/api/stream/50") as response:
        chunks = response.iter_raw()
        next(chunks)
        started = time.monotonic()
        assert service.stop(signal.SIGTERM) == 0
        assert time.monotonic() - started < 5, "no drain: the worker is killed at once"
        with pytest.raises(httpx.HTTPError):
            for _ in chunks:
                pass
    wait_for(lambda: not alive(worker), timeout=5, what="the worker to be gone")


def test_a_worker_does_not_outlive_its_host() -> None:
    service, _ = start_app(base_env(), "--timer-interval", "0", app_dir=APPS / "routes")
    worker = worker_pids(service)[-1]
    service.stop(signal.SIGKILL)
    wait_for(lambda: not alive(worker), timeout=10, what="the orphaned worker to exit")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        status = Path(f"/proc/{pid}/status").read_text()
    except (ProcessLookupError, FileNotFoundError):
        return False
    return "zombie" not in status.lower()  # exited, not yet reaped


def test_indexing_failure_stops_the_host_with_the_error() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "devtools.funchost", "--port", "0", "--app-dir", str(APPS / "broken")],
        cwd=ROOT,
        env=base_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert "indexing the function app failed" in done.stderr
    assert "broken on purpose: a setting is missing" in done.stderr
    assert "proxy listening" not in done.stdout


def test_timers_fire_with_a_timer_request(tmp_path: Path) -> None:
    ticks = tmp_path / "ticks.jsonl"
    service, _ = start_app(base_env(TICK_FILE=str(ticks)), "--timer-interval", "0.3", app_dir=APPS / "routes")
    try:
        wait_for(lambda: ticks.is_file() and len(ticks.read_text().splitlines()) >= 2, what="two ticks")
    finally:
        service.stop()
    assert json.loads(ticks.read_text().splitlines()[0]) == {"past_due": False}


def test_ncrontab_schedules() -> None:
    moment = datetime(2026, 11, 22, 9, 59, 58, 500_000, tzinfo=UTC)  # a Sunday
    assert Schedule.parse("*/5 * * * * *").next_after(moment) == moment.replace(
        hour=10, minute=0, second=0, microsecond=0
    )
    assert Schedule.parse("0 30 9 * * 1-5").next_after(moment) == datetime(2026, 11, 23, 9, 30, tzinfo=UTC)
    assert Schedule.parse("15 * * * * 0").next_after(moment) == datetime(2026, 11, 22, 10, 0, 15, tzinfo=UTC)
    with pytest.raises(ValueError, match="six fields"):
        Schedule.parse("*/5 * * * *")


def test_route_precedence_is_aspnet_inbound_order() -> None:
    digits = {t: compile_template("api", t)[1] for t in ("v1/models", "v1/{x}", "v1/{x:int}", "{*path}")}
    assert digits == {"v1/models": (1, 1, 1), "v1/{x}": (1, 1, 3), "v1/{x:int}": (1, 1, 2), "{*path}": (1, 4)}


def test_an_app_that_cannot_start_fails_its_test_at_once() -> None:
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="exited with code 1 before it was ready") as failure:
        start_app(base_env(), app_dir=APPS / "broken")
    assert "broken on purpose" in str(failure.value)
    assert time.monotonic() - started < 20, "no waiting for a ready line that cannot come"


@pytest.mark.parametrize(
    ("requirements", "parser"),
    [
        (None, "H11Protocol"),
        ("uvicorn==0.54.0\n", "H11Protocol"),
        ("uvicorn==0.54.0\nhttptools==0.9.0\n", "HttpToolsProtocol"),
        ("uvicorn[standard]==0.54.0\n", "HttpToolsProtocol"),
    ],
)
def test_the_worker_parses_with_httptools_only_when_the_app_ships_it(
    tmp_path: Path, requirements: str | None, parser: str
) -> None:
    """uvicorn picks its parser from what it can import: in Azure the app's packages, so the emulator hides the rest."""
    if requirements is not None:
        (tmp_path / "requirements.txt").write_text(requirements)
    script = (
        "import sys; from pathlib import Path; from devtools.funchost.language_worker import hide_unshipped_parser; "
        "hide_unshipped_parser(Path(sys.argv[1])); from uvicorn.protocols.http.auto import AutoHTTPProtocol; "
        "print(AutoHTTPProtocol.__name__)"
    )
    found = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert found.stdout.strip() == parser
