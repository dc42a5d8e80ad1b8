"""2,000 requests in flight at once for one event with an event budget, over two app processes.

    python -m bench.inflight [--attendees 500] [--per-attendee 4] [--hold-ms 90000] [--ramp-seconds 20]

Starts Azurite, the simulator (each answer held ``--hold-ms`` before it is
sent, so requests stay in flight) and the app twice under the real Python
worker behind the host emulator, creates an event with ``event_requests`` and
``event_tokens`` (and a daily cap per attendee), then sends every request,
spread over ``--ramp-seconds`` (well within the hold, so that all are in
flight together, but a two-core machine's Azurite is not handed every storage
call of 2,000 new requests in the same instant), half to each app,
``--per-attendee`` per attendee. While they are in
flight it reads the event budget's shards: the peak of requests they hold in
flight together and on one shard. It prints one JSON object: the answers by
status (every one must be 200: no 503), how long until upstream had them all
(all admitted), the peaks, and what the usage report recorded afterwards.

A string property of Table Storage holds 64 KiB: before ``proxy.admission.inflight``
cut the in-flight map into pieces, about 510 requests in flight on one shard
(or one attendee's day) failed every further admission with a 503.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import sys
import tempfile
import time
from collections import Counter
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp

from bench.procs import ROOT, Proc, http_ok, spawn
from bench.run import SIMULATOR_KEY, app_env
from devtools.local.azurite import command as azurite_command
from devtools.local.azurite import connection_string as azurite_connection_string
from proxy.admission import budget
from proxy.config.hashing import SecretHasher
from proxy.config.settings import Settings
from proxy.ledger.reports import report
from proxy.policy.events import Event, EventStore, new_event_id
from proxy.storage.tables import Tables
from tests.support import CODE_HASH_KEY, free_port

BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hold on."}], "max_tokens": 16}


async def run(urls: list[str], simulator: str, tables: Tables, args: argparse.Namespace) -> dict[str, Any]:
    total = args.attendees * args.per_attendee
    code, now = f"Inflight{secrets.token_hex(6)}", datetime.now(UTC)
    event = Event(
        id="", name="In flight", code_hash="", starts_at=now - timedelta(hours=1), ends_at=now + timedelta(hours=8),
        daily_requests=args.per_attendee, event_requests=total, event_tokens=10**9,
    )  # fmt: skip
    store = EventStore(tables, SecretHasher(CODE_HASH_KEY), 0)  # the apps' key (bench.run.app_env)
    event = replace(event, id=new_event_id("inflight"), code_hash=store.hash_code(code))
    await store.create(event)
    peaks = {"in_flight": 0, "one_shard": 0}
    started = time.monotonic()
    admitted_after: list[float] = []

    async def watch(session: aiohttp.ClientSession) -> None:
        while True:
            shards = await budget.read_shards(tables, event.id)
            held = [len(shard["inflight"]) for shard in shards.values()]
            peaks["in_flight"], peaks["one_shard"] = max(peaks["in_flight"], sum(held)), max(peaks["one_shard"], *held)
            async with session.get(f"{simulator}/_sim/stats") as stats:
                if not admitted_after and (await stats.json())["requests"] >= total:
                    admitted_after.append(time.monotonic() - started)
            await asyncio.sleep(0.2)

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as session:

        async def one(index: int) -> int | str:
            await asyncio.sleep(args.ramp_seconds * index / total)
            user = f"{code}/attendee{index % args.attendees}@example.org"
            url = f"{urls[index % 2]}/api/v1/chat/completions"
            try:
                async with session.post(url, json=BODY, headers={"api-key": user}) as response:
                    await response.read()
                    return response.status
            except aiohttp.ClientError as error:
                return type(error).__name__

        watcher = asyncio.create_task(watch(session))
        statuses = await asyncio.gather(*(one(index) for index in range(total)))
        answered_after = time.monotonic() - started
        watcher.cancel()
    await asyncio.sleep(2)  # deferred shard settlements (50 ms) and the last batches
    recorded = (await report(tables, event.id, "user"))["totals"]["requests"]
    return {
        "requests": total,
        "attendees": args.attendees,
        "hold_ms": args.hold_ms,
        "ramp_s": args.ramp_seconds,
        "statuses": dict(Counter(str(status) for status in statuses)),
        "all_admitted_after_s": round(admitted_after[0], 1) if admitted_after else None,
        "all_answered_after_s": round(answered_after, 1),
        "peak_in_flight_on_the_shards": peaks["in_flight"],
        "peak_in_flight_on_one_shard": peaks["one_shard"],
        "recorded_requests": recorded,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attendees", type=int, default=500)
    parser.add_argument("--per-attendee", type=int, default=4)
    parser.add_argument("--hold-ms", type=int, default=90_000, help="how long the simulator holds each answer")
    parser.add_argument("--ramp-seconds", type=float, default=20.0, help="the sends spread over this long")
    args = parser.parse_args(argv)
    log_dir = Path(tempfile.mkdtemp(prefix="bench-inflight-"))
    procs: list[Proc] = []
    try:
        port = free_port()
        azurite = spawn("azurite", [*azurite_command(port), "--disableProductStyleUrl", "--silent"], log_dir)
        procs.append(azurite)
        connection_string = azurite_connection_string(port)
        azurite.wait_ready(http_ok(f"http://127.0.0.1:{port}/devstoreaccount1/Tables"), 60)
        port = free_port()
        simulator = f"http://127.0.0.1:{port}"
        args_sim = ["--port", str(port), "--api-key", SIMULATOR_KEY, "--latency-ms", str(args.hold_ms)]
        procs.append(spawn("simulator", [sys.executable, "-m", "devtools.simulator", *args_sim], log_dir))
        procs[-1].wait_ready(http_ok(f"{simulator}/_sim/stats"))
        urls = []
        for index in range(2):
            port = free_port()
            command = [sys.executable, "-m", "devtools.funchost", "--port", str(port), "--app-dir", str(ROOT)]
            procs.append(spawn(f"app{index}", command, log_dir, app_env(connection_string, simulator)))
            urls.append(f"http://127.0.0.1:{port}")
            procs[-1].wait_ready(http_ok(f"{urls[-1]}/api/health"))

        async def measured() -> dict[str, Any]:
            settings = Settings.from_env({"STORAGE_CONNECTION_STRING": connection_string}, need_upstream=False)
            tables = Tables.create(settings, None)
            try:
                await tables.ensure()
                return await run(urls, simulator, tables, args)
            finally:
                await tables.aclose()

        result = asyncio.run(measured())
        result["setup"] = "2 app processes (real worker behind the host emulator), one event budget, aiohttp client"
        print(json.dumps(result, indent=2))
        ok = result["statuses"] == {"200": result["requests"]} and result["recorded_requests"] == result["requests"]
        return 0 if ok else 1
    finally:
        for proc in reversed(procs):
            proc.stop()
        print(f"logs: {log_dir}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
