"""What failover buys when the first backend runs out of quota: success rate and added latency.

    python -m bench.failover [--seconds 5] [--concurrency 16]

Starts Azurite, then, configuration by configuration, fresh simulators and the
app under the real Python worker behind the host emulator, and drives it with
``wrk`` (non-streamed chat, 256 attendees). The backends stand for two regions:

- ``primary``: 20 ms of latency; in the throttled configurations it answers
  every second request 429 (``--throttle-fraction 0.5``), asking for
  ``retry-after-ms`` of 10 ms (a quota that frees at once) or 1000 ms;
- ``secondary``: 40 ms of latency (a farther region), never throttled.

Configurations: ``single_healthy`` (the primary alone, never throttled: the
reference), then for each wait, ``single_throttled`` (the throttled primary
alone, ``AZURE_OPENAI_ENDPOINT`` as today) next to ``failover`` (both, in
``AZURE_OPENAI_BACKENDS``, the primary at priority 1). ``success_pct`` counts
2xx answers; latency counts every answer, 429s included; ``added_ms`` is the
row's latency minus the reference's. The simulators' own counters say where
the requests went. Writes ``bench/results/failover.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.load import Target, run_wrk
from bench.procs import BENCH, ROOT, Proc, http_ok, quiesce, spawn
from bench.run import BODIES, SIMULATOR_KEY, USERS, app_env, create_events
from devtools.azurite import command as azurite_command
from devtools.azurite import connection_string as azurite_connection_string
from tests.support import free_port

PRIMARY_MS, SECONDARY_MS = 20, 40
WAITS_MS = (10, 1000)


def simulator(name: str, log_dir: Path, *options: str) -> tuple[Proc, str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = [sys.executable, "-m", "devtools.simulator", "--port", str(port), "--api-key", SIMULATOR_KEY, *options]
    proc = spawn(name, args, log_dir)
    proc.wait_ready(http_ok(f"{url}/_sim/stats"))
    return proc, url


def configuration(name: str, wait_ms: int | None, log_dir: Path) -> tuple[list[Proc], dict[str, str], dict[str, str]]:
    """The simulators for one configuration, their URLs, and the app settings naming them."""
    throttle = [] if wait_ms is None else ["--throttle-fraction", "0.5", "--throttle-retry-ms", str(wait_ms)]
    primary, primary_url = simulator(f"{name}-primary", log_dir, "--latency-ms", str(PRIMARY_MS), *throttle)
    if name != "failover":
        return [primary], {"primary": primary_url}, {"AZURE_OPENAI_ENDPOINT": primary_url}
    secondary, secondary_url = simulator(f"{name}-secondary", log_dir, "--latency-ms", str(SECONDARY_MS))
    backends = [
        {"name": "primary", "endpoint": primary_url, "priority": 1, "api_key_setting": "AZURE_OPENAI_API_KEY"},
        {"name": "secondary", "endpoint": secondary_url, "priority": 2, "api_key_setting": "AZURE_OPENAI_API_KEY"},
    ]
    urls = {"primary": primary_url, "secondary": secondary_url}
    return [primary, secondary], urls, {"AZURE_OPENAI_BACKENDS": json.dumps(backends)}


def measure(
    name: str, wait_ms: int | None, storage: str, code: str, log_dir: Path, seconds: float, concurrency: int
) -> dict[str, Any]:
    sims, urls, settings = configuration(name, wait_ms, log_dir)
    env = app_env(storage, urls["primary"])
    env.pop("AZURE_OPENAI_ENDPOINT")
    env.update(settings)
    port = free_port()
    app = spawn(f"{name}-app", [sys.executable, "-m", "devtools.funchost", "--port", str(port), "--app-dir", str(ROOT)],
                log_dir, env)  # fmt: skip
    procs = [*sims, app]
    try:
        base = f"http://127.0.0.1:{port}"
        app.wait_ready(http_ok(f"{base}/api/health"))
        users = tuple(f"{code}/attendee{i}@example.org" for i in range(USERS))
        target = Target(base, "/api/v1/chat/completions", "api-key", users, BODIES["chat"])
        run_wrk(target, concurrency, 1.0)  # warm-up, not counted
        quiesce(procs)
        before = {backend: _stats(url) for backend, url in urls.items()}
        measured = run_wrk(target, concurrency, seconds)
        after = {backend: _stats(url) for backend, url in urls.items()}
    finally:
        for proc in reversed(procs):
            proc.stop()
    percentiles = dict(measured.percentiles_ms)
    failed = measured.errors
    calls = {
        backend: {
            "answered": (after[backend]["requests"] - after[backend]["throttled"])
            - (before[backend]["requests"] - before[backend]["throttled"]),
            "throttled": after[backend]["throttled"] - before[backend]["throttled"],
        }
        for backend in urls
    }
    return {
        "configuration": name,
        "retry_after_ms": wait_ms,
        "requests": measured.requests,
        "rps": round(measured.rps, 1),
        "success_pct": round(100 * (measured.requests - failed) / max(1, measured.requests), 2),
        "latency_ms": {"p50": round(percentiles[50], 2), "p99": round(percentiles[99], 2)},
        "backend_calls": calls,
    }


def _stats(url: str) -> dict[str, int]:
    data = httpx.get(f"{url}/_sim/stats").json()
    return {"requests": int(data["requests"]), "throttled": int(data["throttled"])}


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| configuration | retry-after | req/s | success | p50 ms | p99 ms | added p50 | added p99 | "
        "primary answered / throttled | secondary answered |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        calls = row["backend_calls"]
        secondary = calls.get("secondary", {}).get("answered", "")
        wait = "" if row["retry_after_ms"] is None else f"{row['retry_after_ms']} ms"
        added = row.get("added_ms", {"p50": 0.0, "p99": 0.0})
        lines.append(
            f"| {row['configuration']} | {wait} | {row['rps']:.0f} | {row['success_pct']:.1f} % | "
            f"{row['latency_ms']['p50']:.1f} | {row['latency_ms']['p99']:.1f} | {added['p50']:+.1f} | "
            f"{added['p99']:+.1f} | {calls['primary']['answered']} / {calls['primary']['throttled']} | {secondary} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--out", type=Path, default=BENCH / "results" / "failover.json")
    args = parser.parse_args(argv)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-failover-") as tmp:
        log_dir = Path(tmp)
        port = free_port()
        azurite = spawn("azurite", [*azurite_command(port), "--disableProductStyleUrl", "--silent"], log_dir)
        try:
            storage = azurite_connection_string(port)
            azurite.wait_ready(http_ok(f"http://127.0.0.1:{port}/devstoreaccount1/Tables"), 60)
            code = asyncio.run(create_events(storage))["proxy_nocaps"]
            plan: list[tuple[str, int | None]] = [("single_healthy", None)]
            plan += [(name, wait) for wait in WAITS_MS for name in ("single_throttled", "failover")]
            rows = []
            for name, wait in plan:
                row = measure(name, wait, storage, code, log_dir, args.seconds, args.concurrency)
                print(json.dumps(row), flush=True)
                rows.append(row)
        finally:
            azurite.stop()
    reference = rows[0]["latency_ms"]
    for row in rows[1:]:
        row["added_ms"] = {p: round(row["latency_ms"][p] - reference[p], 2) for p in ("p50", "p99")}
    result = {
        "config": {
            "seconds": args.seconds,
            "concurrency": args.concurrency,
            "attendees": USERS,
            "primary_latency_ms": PRIMARY_MS,
            "secondary_latency_ms": SECONDARY_MS,
            "primary_throttle_fraction": 0.5,
        },
        "results": rows,
        "elapsed_seconds": round(time.monotonic() - started, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(rows))
    print(f"\nwrote {args.out} in {result['elapsed_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
