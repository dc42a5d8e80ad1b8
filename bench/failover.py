"""What failover buys when the first backend runs out of quota: success rate and added latency.

    python -m bench.failover [--seconds 4] [--rounds 3] [--concurrency 8]

Starts Azurite and, for each configuration, its simulators and the app under
the real Python worker behind the host emulator; then, round by round, drives
each in turn with ``wrk`` (non-streamed chat, 256 attendees). The backends
stand for two regions:

- ``primary``: 20 ms of latency; in the throttled configurations it answers
  every second request 429 (``--throttle-fraction 0.5``), asking for
  ``retry-after-ms`` of 10 ms (a quota that frees at once) or 1000 ms;
- ``secondary``: 40 ms of latency (a farther region), never throttled.

Configurations: ``single_healthy`` (the primary alone, never throttled: the
reference), then for each wait, ``single_throttled`` (the throttled primary
alone, ``AZURE_OPENAI_ENDPOINT`` as today) next to ``failover`` (both, in
``AZURE_OPENAI_BACKENDS``, the primary at priority 1). ``success_pct`` counts
2xx answers over all rounds; latency is the median over the rounds of each
round's percentile, every answer counted, 429s included; ``added_ms`` is the
row's latency minus the reference's. The simulators' own counters say where
the requests went. Writes ``bench/results/failover.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.load import Target, run_wrk
from bench.procs import BENCH, ROOT, Proc, http_ok, quiesce, spawn
from bench.run import BODIES, SIMULATOR_KEY, USERS, app_env, create_events
from devtools.local.azurite import command as azurite_command
from devtools.local.azurite import connection_string as azurite_connection_string
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


def configuration(
    name: str, wait_ms: int | None, label: str, log_dir: Path
) -> tuple[list[Proc], dict[str, str], dict[str, str]]:
    """The simulators for one configuration, their URLs, and the app settings naming them."""
    throttle = [] if wait_ms is None else ["--throttle-fraction", "0.5", "--throttle-retry-ms", str(wait_ms)]
    primary, primary_url = simulator(f"{label}-primary", log_dir, "--latency-ms", str(PRIMARY_MS), *throttle)
    if name != "failover":
        return [primary], {"primary": primary_url}, {"AZURE_OPENAI_ENDPOINT": primary_url}
    secondary, secondary_url = simulator(f"{label}-secondary", log_dir, "--latency-ms", str(SECONDARY_MS))
    backends = [
        {"name": "primary", "endpoint": primary_url, "priority": 1, "api_key_setting": "AZURE_OPENAI_API_KEY"},
        {"name": "secondary", "endpoint": secondary_url, "priority": 2, "api_key_setting": "AZURE_OPENAI_API_KEY"},
    ]
    urls = {"primary": primary_url, "secondary": secondary_url}
    return [primary, secondary], urls, {"AZURE_OPENAI_BACKENDS": json.dumps(backends)}


@dataclass
class Stack:
    """One configuration's simulators and app, kept up for every round."""

    name: str
    wait_ms: int | None
    procs: list[Proc]
    urls: dict[str, str]
    target: Target
    rounds: list[dict[str, Any]] = field(default_factory=list)


def start(name: str, wait_ms: int | None, storage: str, code: str, log_dir: Path) -> Stack:
    label = name if wait_ms is None else f"{name}-{wait_ms}"
    sims, urls, settings = configuration(name, wait_ms, label, log_dir)
    env = app_env(storage, urls["primary"])
    env.pop("AZURE_OPENAI_ENDPOINT")
    env.update(settings)
    port = free_port()
    host = [sys.executable, "-m", "devtools.funchost", "--port", str(port), "--app-dir", str(ROOT)]
    app = spawn(f"{label}-app", host, log_dir, env)
    stack = Stack(name, wait_ms, [*sims, app], urls, Target("", "", "", (), {}))
    base = f"http://127.0.0.1:{port}"
    try:
        app.wait_ready(http_ok(f"{base}/api/health"))
    except BaseException:
        stop(stack)
        raise
    users = tuple(f"{code}/attendee{i}@example.org" for i in range(USERS))
    stack.target = Target(base, "/api/v1/chat/completions", "api-key", users, BODIES["chat"])
    return stack


def stop(stack: Stack) -> None:
    for proc in reversed(stack.procs):
        proc.stop()


def run_round(stack: Stack, seconds: float, concurrency: int) -> None:
    run_wrk(stack.target, concurrency, 0.5)  # warm-up, not counted
    quiesce(stack.procs)
    before = {backend: _stats(url) for backend, url in stack.urls.items()}
    measured = run_wrk(stack.target, concurrency, seconds)
    after = {backend: _stats(url) for backend, url in stack.urls.items()}
    percentiles = dict(measured.percentiles_ms)
    stack.rounds.append(
        {
            "requests": measured.requests,
            "failed": measured.errors,
            "seconds": measured.duration_s,
            "p50": percentiles[50],
            "p99": percentiles[99],
            "calls": {
                backend: {name: after[backend][name] - before[backend][name] for name in ("requests", "throttled")}
                for backend in stack.urls
            },
        }
    )


def summary(stack: Stack) -> dict[str, Any]:
    """Totals over the rounds; latency as the median of the rounds' percentiles."""
    requests = sum(r["requests"] for r in stack.rounds)
    failed = sum(r["failed"] for r in stack.rounds)
    calls = {
        backend: {
            "answered": sum(r["calls"][backend]["requests"] - r["calls"][backend]["throttled"] for r in stack.rounds),
            "throttled": sum(r["calls"][backend]["throttled"] for r in stack.rounds),
        }
        for backend in stack.urls
    }
    return {
        "configuration": stack.name,
        "retry_after_ms": stack.wait_ms,
        "requests": requests,
        "rps": round(requests / sum(r["seconds"] for r in stack.rounds), 1),
        "success_pct": round(100 * (requests - failed) / max(1, requests), 2),
        "latency_ms": {
            "p50": round(statistics.median(r["p50"] for r in stack.rounds), 2),
            "p99": round(statistics.median(r["p99"] for r in stack.rounds), 2),
        },
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
    parser.add_argument("--seconds", type=float, default=4.0, help="measured seconds per configuration and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--out", type=Path, default=BENCH / "results" / "failover.json")
    args = parser.parse_args(argv)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-failover-") as tmp:
        log_dir = Path(tmp)
        port = free_port()
        azurite = spawn("azurite", [*azurite_command(port), "--disableProductStyleUrl", "--silent"], log_dir)
        stacks: list[Stack] = []
        try:
            storage = azurite_connection_string(port)
            azurite.wait_ready(http_ok(f"http://127.0.0.1:{port}/devstoreaccount1/Tables"), 60)
            code = asyncio.run(create_events(storage))["proxy_nocaps"]
            plan: list[tuple[str, int | None]] = [("single_healthy", None)]
            plan += [(name, wait) for wait in WAITS_MS for name in ("single_throttled", "failover")]
            for name, wait in plan:
                stacks.append(start(name, wait, storage, code, log_dir))
            # Round by round, every configuration in turn: a busy machine weighs on all of them alike.
            for round_ in range(args.rounds):
                for stack in stacks:
                    run_round(stack, args.seconds, args.concurrency)
                    print(f"round {round_ + 1} {stack.name} {stack.wait_ms}: {stack.rounds[-1]}", flush=True)
        finally:
            for stack in stacks:
                stop(stack)
            azurite.stop()
    rows = [summary(stack) for stack in stacks]
    reference = rows[0]["latency_ms"]
    for row in rows[1:]:
        row["added_ms"] = {p: round(row["latency_ms"][p] - reference[p], 2) for p in ("p50", "p99")}
    result = {
        "config": {
            "seconds": args.seconds,
            "rounds": args.rounds,
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
