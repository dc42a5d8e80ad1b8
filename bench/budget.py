"""What an event-wide budget costs: two app processes, 256 attendees, concurrency 64.

    python -m bench.budget [--seconds 8] [--rounds 3] [--exhaust 3000]

Starts Azurite, the simulator (no added latency) and the app twice under the
real Python worker behind the host emulator (two instances, as two Flex
instances would be), then drives both with ``wrk`` at concurrency 32 each
(64 in all), 256 attendees, non-streamed chat, against three events in turn:

- ``caps``: per-attendee caps (never reached), no event budget;
- ``budget``: the same, plus ``event_requests`` and ``event_tokens`` too large to be reached;
- ``exhaust``: the same with ``event_requests=--exhaust``, driven until it is used up:
  the simulator must have been called exactly that many times.

Rounds alternate the first two so that drift on a shared machine hits both.
Prints one JSON object; ``bench/README.md`` keeps the figures. ``other_cpu_pct``
is what the rest of the machine used meanwhile (100 = one core).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import statistics
import sys
import tempfile
import threading
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psutil

from bench.load import Measured, Target, run_wrk
from bench.procs import ROOT, Proc, http_ok, quiesce, spawn
from bench.run import SIMULATOR_KEY, app_env
from devtools.local.azurite import command as azurite_command
from devtools.local.azurite import connection_string as azurite_connection_string
from tests.support import CODE_HASH_KEY, free_port

USERS = 256
PER_APP = 32
BIG = 1_000_000_000
BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Write a haiku about latency."}],
        "max_tokens": 64}  # fmt: skip


async def create_events(connection_string: str, exhaust: int) -> dict[str, str]:
    from proxy.config.settings import Settings
    from proxy.policy.events import Event, EventStore, new_event_id
    from proxy.storage.tables import opened

    settings = Settings.from_env(
        {"STORAGE_CONNECTION_STRING": connection_string, "CODE_HASH_KEY": CODE_HASH_KEY}, need_upstream=False
    )
    now = datetime.now(UTC)
    codes = {name: f"Bench{name}{secrets.token_hex(6)}" for name in ("caps", "budget", "exhaust")}
    base = Event(
        id="", name="Benchmark", code_hash="", starts_at=now - timedelta(hours=1), ends_at=now + timedelta(hours=8),
        daily_requests=BIG, daily_tokens=BIG, tpm=BIG,
    )  # fmt: skip
    budgets: dict[str, dict[str, Any]] = {
        "caps": {},
        "budget": {"event_requests": BIG, "event_tokens": BIG},
        "exhaust": {"event_requests": exhaust, "event_tokens": BIG},
    }
    async with opened(settings, None) as tables:
        await tables.ensure()
        store = EventStore(tables, settings.hasher(), 0)
        for name, code in codes.items():
            event = replace(base, id=new_event_id(name), code_hash=store.hash_code(code), **budgets[name])
            await store.create(event)
    return codes


async def recorded(connection_string: str, code: str) -> int:
    """Requests recorded for the event with this code (its usage report's total)."""
    from proxy.config.settings import Settings
    from proxy.ledger.reports import report
    from proxy.policy.events import EventStore
    from proxy.storage.tables import opened

    settings = Settings.from_env(
        {"STORAGE_CONNECTION_STRING": connection_string, "CODE_HASH_KEY": CODE_HASH_KEY}, need_upstream=False
    )
    async with opened(settings, None) as tables:
        event = await EventStore(tables, settings.hasher(), 0).by_code(code)
        assert event is not None
        return int((await report(tables, event.id, "user"))["totals"]["requests"])


def drive(urls: list[str], code: str, seconds: float) -> list[Measured]:
    """Both apps at once, PER_APP connections each, all 256 attendees on each."""
    users = tuple(f"{code}/attendee{i}@example.org" for i in range(USERS))
    results: list[Measured] = []

    def one(url: str) -> None:
        results.append(run_wrk(Target(url, "/api/v1/chat/completions", "api-key", users, BODY), PER_APP, seconds))

    threads = [threading.Thread(target=one, args=(url,)) for url in urls]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def busy_cpu() -> float:
    times = psutil.cpu_times()
    return float(sum(times) - times.idle - getattr(times, "iowait", 0.0))


def measure(procs: list[Proc], urls: list[str], code: str, seconds: float) -> dict[str, Any]:
    quiesce(procs)
    ours_before, busy_before = sum(p.cpu_seconds() for p in procs), busy_cpu()
    runs = drive(urls, code, seconds)
    generators = sum(r.generator_cpu_s for r in runs)
    duration = max(r.duration_s for r in runs)
    ours = sum(p.cpu_seconds() for p in procs) - ours_before + generators
    other = max(0.0, busy_cpu() - busy_before - ours) / duration * 100
    p50 = statistics.fmean(next(ms for p, ms in r.percentiles_ms if p == 50) for r in runs)
    p99 = statistics.fmean(next(ms for p, ms in r.percentiles_ms if p == 99) for r in runs)
    return {
        "requests": sum(r.requests for r in runs),
        "errors": sum(r.errors for r in runs),
        "rps": round(sum(r.rps for r in runs), 1),
        "p50_ms": round(p50, 2),
        "p99_ms": round(p99, 2),
        "other_cpu_pct": round(other, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--exhaust", type=int, default=3000, help="event_requests of the event driven to its end")
    args = parser.parse_args(argv)
    log_dir = Path(tempfile.mkdtemp(prefix="bench-budget-"))
    procs: list[Proc] = []
    try:
        port = free_port()
        azurite = spawn("azurite", [*azurite_command(port), "--disableProductStyleUrl", "--silent"], log_dir)
        procs.append(azurite)
        connection_string = azurite_connection_string(port)
        azurite.wait_ready(http_ok(f"http://127.0.0.1:{port}/devstoreaccount1/Tables"), 60)
        codes = asyncio.run(create_events(connection_string, args.exhaust))
        port = free_port()
        simulator_url = f"http://127.0.0.1:{port}"
        simulator = spawn(
            "simulator",
            [sys.executable, "-m", "devtools.simulator", "--port", str(port), "--api-key", SIMULATOR_KEY],
            log_dir,
        )
        procs.append(simulator)
        simulator.wait_ready(http_ok(f"{simulator_url}/_sim/stats"))
        env = app_env(connection_string, simulator_url)
        urls = []
        for index in range(2):
            port = free_port()
            app = spawn(
                f"app{index}",
                [sys.executable, "-m", "devtools.funchost", "--port", str(port), "--app-dir", str(ROOT)],
                log_dir,
                env,
            )
            procs.append(app)
            urls.append(f"http://127.0.0.1:{port}")
            app.wait_ready(http_ok(f"{urls[-1]}/api/health"))
        for name in ("caps", "budget"):
            drive(urls, codes[name], 2)  # warm up: workers, pools, caches, shards
        rows: dict[str, list[dict[str, Any]]] = {"caps": [], "budget": []}
        for round_ in range(args.rounds):
            for name in ("caps", "budget") if round_ % 2 == 0 else ("budget", "caps"):
                rows[name].append(measure(procs, urls, codes[name], args.seconds))
        quiesce(procs)  # the last round's requests in flight reach upstream before this count
        before = httpx.get(f"{simulator_url}/_sim/stats").json()["requests"]
        exhaust = measure(procs, urls, codes["exhaust"], max(args.seconds, 4))
        called = -1
        for _ in range(30):  # on until the budget is used up: upstream sees no more calls
            quiesce(procs)
            now_called = httpx.get(f"{simulator_url}/_sim/stats").json()["requests"] - before
            if now_called == called:
                break
            called = now_called
            drive(urls, codes["exhaust"], 2)
        result = {
            "machine": {"cpus": psutil.cpu_count(), "python": sys.version.split()[0]},
            "setup": f"2 app processes (real worker behind the host emulator), wrk {PER_APP}+{PER_APP} connections, "
            f"{USERS} attendees, non-streamed chat, simulator without latency",
            "caps": rows["caps"],
            "budget": rows["budget"],
            "median_rps": {name: statistics.median(r["rps"] for r in rows[name]) for name in rows},
            "exhaust": {
                **exhaust,
                "event_requests": args.exhaust,
                "upstream_calls": called,
                "recorded_requests": asyncio.run(recorded(connection_string, codes["exhaust"])),
            },
        }
        print(json.dumps(result, indent=2))
        return 0 if called == args.exhaust == result["exhaust"]["recorded_requests"] else 1
    finally:
        for proc in reversed(procs):
            proc.stop()


if __name__ == "__main__":
    raise SystemExit(main())
