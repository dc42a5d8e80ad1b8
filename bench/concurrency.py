"""How many streams one Python worker carries: the figure behind ``perInstanceConcurrency``.

    .venv/bin/python -m bench.concurrency [--levels 1,8,16,32,64,128] [--seconds 15]
        [--tokens 60 --tokens-per-second 20 --ttft-ms 400] [--output bench/results/concurrency.json]

Flex Consumption runs one Python worker per instance and sends it at most
``perInstanceConcurrency`` HTTP requests at once (1 unless set). Event traffic is
streamed chat answers lasting seconds, during which the worker mostly waits on
Azure OpenAI. This starts the real stack on loopback (Azurite, the simulator
pacing its answers like a model, the app under the real Python worker behind the
host emulator), then keeps C streams in flight for each level C, each request from
a different attendee of an event with caps (so every request takes the full policy
path: event lookup, cap reservation, usage written after the answer). For each
level it reports streams/s, time to first chunk, stream duration against the
simulator's own pacing, errors, and the CPU of the worker process (% of one core),
read from ``/proc`` between the start and the end of the measured window, next to
the CPU of the host emulator (in Azure the Functions host is a separate .NET process
on the instance) and how busy the whole machine was: on a small machine the load
generator, the simulator and Azurite compete with the app for the same cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from tests.support import CODE_HASH_KEY, app_env, start_app, start_azurite, start_simulator, worker_pids

ROOT = Path(__file__).resolve().parents[1]
ATTENDEES = 512
CAP = 10**9
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU of one process, from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def machine_busy() -> tuple[float, float]:
    """Busy and total CPU seconds of the whole machine, from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields) - idle) / TICKS, sum(fields) / TICKS


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def create_event(connection_string: str) -> str:
    from proxy.config.settings import Settings
    from proxy.policy.events import Event, EventStore, new_event_id
    from proxy.storage.tables import opened

    settings = Settings.from_env(
        {"STORAGE_CONNECTION_STRING": connection_string, "CODE_HASH_KEY": CODE_HASH_KEY}, need_upstream=False
    )
    code = "CONC-" + secrets.token_hex(6)
    now = datetime.now(UTC)
    async with opened(settings, None) as tables:
        await tables.ensure()
        store = EventStore(tables, settings.hasher(), 0)
        event = Event(
            id=new_event_id("concurrency"),
            name="Concurrency",
            code_hash=store.hash_code(code),
            starts_at=now - timedelta(hours=1),
            ends_at=now + timedelta(hours=8),
            max_tokens=4096,
            daily_requests=CAP,
            daily_tokens=CAP,
            tpm=CAP,
        )
        await store.create(event)
    return code


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(share * len(ordered)) - 1))]


def run_level(url: str, code: str, level: int, seconds: float, worker: int, host: int) -> dict[str, Any]:
    keys = ",".join(f"{code}/attendee{i}@example.org" for i in range(ATTENDEES))
    body = json.dumps(
        {"model": "gpt-4o-mini", "stream": True, "messages": [{"role": "user", "content": "Tell me a story."}]}
    )
    command = [sys.executable, "-m", "bench.stream_client", "--url", f"{url}/api/v1/chat/completions"]
    command += ["--concurrency", str(level), "--seconds", str(seconds), "--header", f"api-key: {keys}"]
    command += ["--body", body]
    before, host_before, (busy_before, all_before) = cpu_seconds(worker), cpu_seconds(host), machine_busy()
    started = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True)
    elapsed = time.perf_counter() - started
    used, host_used = cpu_seconds(worker) - before, cpu_seconds(host) - host_before
    busy_after, all_after = machine_busy()
    out = json.loads(result.stdout)
    total, ttfc = out["total_ms"], out["ttfc_ms"]
    return {
        "in_flight": level,
        "streams": out["requests"],
        "errors": out["errors"],
        "streams_per_s": round(out["requests"] / out["duration_s"], 1),
        "ttfc_p50_ms": round(percentile(ttfc, 0.5), 1) if ttfc else None,
        "ttfc_p99_ms": round(percentile(ttfc, 0.99), 1) if ttfc else None,
        "stream_p50_ms": round(statistics.median(total), 1) if total else None,
        "stream_p99_ms": round(percentile(total, 0.99), 1) if total else None,
        "worker_cpu_pct": round(100 * used / elapsed, 1),
        "worker_cpu_ms_per_stream": round(1000 * used / max(1, out["requests"]), 2),
        "worker_rss_mb": round(rss_mb(worker), 1),
        "host_emulator_cpu_pct": round(100 * host_used / elapsed, 1),
        "machine_busy_pct": round(100 * (busy_after - busy_before) / (all_after - all_before), 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", default="1,8,16,32,64,128")
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--tokens", type=int, default=60, help="completion tokens per answer")
    parser.add_argument("--tokens-per-second", type=float, default=20.0)
    parser.add_argument("--ttft-ms", type=float, default=400.0)
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "concurrency.json")
    args = parser.parse_args(argv)
    levels = [int(v) for v in args.levels.split(",")]
    pacing = ["--tokens-per-second", str(args.tokens_per_second), "--ttft-ms", str(args.ttft_ms)]
    azurite, connection_string = start_azurite()
    simulator, sim_url = start_simulator(*pacing, "--completion-tokens", str(args.tokens))
    app, url = start_app(app_env(connection_string, sim_url))
    try:
        code = asyncio.run(create_event(connection_string))
        (worker,) = worker_pids(app)
        ideal = args.ttft_ms + 1000 * args.tokens / args.tokens_per_second
        host = app.process.pid
        run_level(url, code, 4, 3.0, worker, host)  # warm-up: imports, pools, token caches
        rows = []
        for level in levels:
            row = run_level(url, code, level, args.seconds, worker, host)
            row["stream_p50_over_pacing_ms"] = round(row["stream_p50_ms"] - ideal, 1) if row["stream_p50_ms"] else None
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        app.stop()
        simulator.stop()
        azurite.stop()
    report = {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0], "platform": sys.platform},
        "answer": {
            "tokens": args.tokens,
            "tokens_per_second": args.tokens_per_second,
            "ttft_ms": args.ttft_ms,
            "paced_ms": ideal,
        },
        "seconds_per_level": args.seconds,
        "rows": rows,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
