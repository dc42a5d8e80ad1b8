"""``make bench``: one run, one machine, the same load generators for every target.

    python -m bench.run [--seconds 6] [--warmup 1.5] [--no-litellm] [--only chat_c1,...]

Starts Azurite, the simulator (no added latency), this proxy twice: in the
plain ASGI dev host (``proxy`` targets) and under the real Python worker
behind the host emulator, as ``make run`` hosts it without Core Tools
(``worker`` targets: Azure's request path, host and worker, short of the
platform), and LiteLLM's proxy (its own venv, no database, a master key, the
simulator as an Azure OpenAI deployment). Then, scenario by scenario, drives each target with the same
generator: ``wrk`` for plain requests, ``bench.stream_client`` for streams.
Writes ``bench/results/latest.json`` and ``bench/results/latency.png`` and
prints the table; ``bench/README.md`` explains every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import secrets
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psutil

from bench import report
from bench.imports import import_times
from bench.load import Measured, Target, run_stream, run_wrk, wrk_path
from bench.procs import BENCH, ROOT, Proc, Sampler, ensure_litellm, http_ok, litellm_version, quiesce, spawn
from devtools.local.azurite import command as azurite_command
from devtools.local.azurite import connection_string as azurite_connection_string
from tests.support import CODE_HASH_KEY, free_port

API_VERSION = "2024-10-21"
SIMULATOR_KEY = "bench-simulator-key"
MASTER_KEY = "sk-bench-" + secrets.token_hex(8)
USERS = 256
CAP = 1_000_000_000
CHAT_MODEL, EMBEDDING_MODEL = "gpt-4o-mini", "text-embedding-3-small"
MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Write a haiku about latency."},
]
BODIES: dict[str, dict[str, Any]] = {
    "chat": {"model": CHAT_MODEL, "messages": MESSAGES, "max_tokens": 64},
    "stream": {"model": CHAT_MODEL, "messages": MESSAGES, "max_tokens": 64, "stream": True},
    "embeddings": {"model": EMBEDDING_MODEL, "input": "The quick brown fox jumps over the lazy dog"},
}


@dataclass(frozen=True)
class Scenario:
    name: str
    kind: str  # chat, stream or embeddings
    concurrency: int
    targets: frozenset[str]  # of those the stack has, the ones this scenario drives
    default: bool = True  # run without --only


_ALL = frozenset({"direct", "proxy", "proxy_first", "proxy_nocaps", "worker", "worker_nocaps", "litellm"})
_STEADY = _ALL - {"proxy_first", "worker_nocaps"}
SCENARIOS = (
    Scenario("chat_c1", "chat", 1, _ALL - {"worker_nocaps"}),
    Scenario("chat_c16", "chat", 16, _ALL, default=False),
    Scenario("chat_c64", "chat", 64, _ALL),
    Scenario("stream_c1", "stream", 1, _STEADY),
    Scenario("stream_c64", "stream", 64, _STEADY - {"proxy_nocaps"}),
    Scenario("embeddings_c16", "embeddings", 16, frozenset({"direct", "proxy", "litellm"})),
)
# Targets whose attendees are each warmed by one request before anything is measured (steady state);
# ``proxy_first`` is the same caps as ``proxy`` on an event of its own, every request a new attendee's first.
STEADY_TARGETS = ("proxy", "proxy_nocaps", "worker", "worker_nocaps")


@dataclass
class Stack:
    azurite: Proc
    simulator: Proc
    proxy: Proc
    worker: Proc | None
    litellm: Proc | None
    urls: dict[str, str]
    codes: dict[str, str]
    # Targets whose attendees call with personal keys (--keys), by target name.
    keys: dict[str, tuple[str, ...]]

    def procs(self) -> list[Proc]:
        return [p for p in (self.azurite, self.simulator, self.proxy, self.worker, self.litellm) if p is not None]

    def stop(self) -> None:
        for proc in reversed(self.procs()):
            proc.stop()


async def create_events(connection_string: str) -> dict[str, str]:
    """An open event per proxy target: with (never reached) caps, or with none (``_nocaps``). Returns their
    codes by target. Each target has its own, so that no two processes write one attendee's day: each
    worker's cached ETags stay its own, as in steady state, instead of being spoilt by the other's writes."""
    from proxy.config.settings import Settings
    from proxy.policy.events import Event, EventStore, new_event_id
    from proxy.storage.tables import opened

    settings = Settings.from_env(
        {"STORAGE_CONNECTION_STRING": connection_string, "CODE_HASH_KEY": CODE_HASH_KEY}, need_upstream=False
    )
    now = datetime.now(UTC)
    codes: dict[str, str] = {}
    async with opened(settings, None) as tables:
        await tables.ensure()
        store = EventStore(tables, settings.hasher(), 0)
        for name in ("proxy", "proxy_first", "proxy_nocaps", "worker", "worker_nocaps"):
            codes[name] = f"BENCH-{name.replace('_', '-').upper()}-{secrets.token_hex(4)}"
            caps = None if name.endswith("_nocaps") else CAP
            event = Event(
                id=new_event_id(f"bench-{name.replace('_', '-')}"),
                name=f"Benchmark ({name})",
                code_hash=store.hash_code(codes[name]),
                starts_at=now - timedelta(hours=1),
                ends_at=now + timedelta(hours=8),
                max_tokens=4096,
                daily_requests=caps,
                daily_tokens=caps,
                tpm=caps,
            )
            await store.create(event)
    return codes


def litellm_config(simulator: str, path: Path) -> None:
    models = "".join(
        f"""  - model_name: {name}
    litellm_params:
      model: azure/{name}
      api_base: {simulator}
      api_key: {SIMULATOR_KEY}
      api_version: "{API_VERSION}"
"""
        for name in (CHAT_MODEL, EMBEDDING_MODEL)
    )
    path.write_text(f"model_list:\n{models}general_settings:\n  master_key: {MASTER_KEY}\n")


def base_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("AZURE_", "STORAGE_", "SIM_", "LITELLM_"))}


def app_env(connection_string: str, simulator: str) -> dict[str, str]:
    return {
        **base_env(),
        "STORAGE_CONNECTION_STRING": connection_string,
        "AZURE_OPENAI_ENDPOINT": simulator,
        "AZURE_OPENAI_API_KEY": SIMULATOR_KEY,
        "CODE_HASH_KEY": CODE_HASH_KEY,
        "PYTHON_ENABLE_INIT_INDEXING": "1",
        "FUNCTIONS_WORKER_RUNTIME": "python",
    }


def litellm_env() -> dict[str, str]:
    return {
        **base_env(),
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # loopback only: no download of the cost map
        "LITELLM_LOG": "ERROR",
        "LITELLM_TELEMETRY": "False",
    }


def start(log_dir: Path, litellm_python: Path | None) -> Stack:
    port = free_port()
    azurite = spawn("azurite", [*azurite_command(port), "--disableProductStyleUrl", "--silent"], log_dir)
    stack = Stack(azurite, azurite, azurite, None, None, {}, {}, {})  # filled in below; stop() works at every step
    try:
        connection_string = azurite_connection_string(port)
        azurite.wait_ready(http_ok(f"http://127.0.0.1:{port}/devstoreaccount1/Tables"), 60)
        stack.codes = asyncio.run(create_events(connection_string))

        port = free_port()
        simulator_url = f"http://127.0.0.1:{port}"
        stack.simulator = spawn(
            "simulator",
            [sys.executable, "-m", "devtools.simulator", "--port", str(port), "--api-key", SIMULATOR_KEY],
            log_dir,
            base_env(),
        )
        stack.simulator.wait_ready(http_ok(f"{simulator_url}/_sim/stats"))

        port = free_port()
        stack.proxy = spawn(
            "proxy",
            [sys.executable, "-m", "devtools.local.devhost", "--port", str(port)],
            log_dir,
            app_env(connection_string, simulator_url),
        )
        proxy_url = f"http://127.0.0.1:{port}"
        stack.proxy.wait_ready(http_ok(f"{proxy_url}/api/health"))
        stack.urls = {"direct": simulator_url, "proxy": proxy_url, "proxy_first": proxy_url, "proxy_nocaps": proxy_url}

        # The same app under the real worker behind the host emulator (its process tree: host and worker).
        port = free_port()
        stack.worker = spawn(
            "worker",
            [sys.executable, "-m", "devtools.funchost", "--port", str(port), "--app-dir", str(ROOT)],
            log_dir,
            app_env(connection_string, simulator_url),
        )
        worker_url = f"http://127.0.0.1:{port}"
        stack.worker.wait_ready(http_ok(f"{worker_url}/api/health"))
        stack.urls.update(worker=worker_url, worker_nocaps=worker_url)

        if litellm_python is not None:
            config = log_dir / "litellm.yaml"
            litellm_config(simulator_url, config)
            port = free_port()
            stack.litellm = spawn(
                "litellm",
                [
                    str(litellm_python.parent / "litellm"),
                    "--config",
                    str(config),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--num_workers",
                    "1",
                ],
                log_dir,
                litellm_env(),
                cwd=log_dir,
            )
            litellm_url = f"http://127.0.0.1:{port}"
            stack.litellm.wait_ready(http_ok(f"{litellm_url}/health/liveliness"))
            stack.urls["litellm"] = litellm_url
    except BaseException:
        stack.stop()
        raise
    return stack


def target(stack: Stack, name: str, kind: str) -> Target:
    body = BODIES[kind]
    operation = "embeddings" if kind == "embeddings" else "chat/completions"
    base = stack.urls[name]
    if name == "direct":
        path = f"/openai/deployments/{body['model']}/{operation}?api-version={API_VERSION}"
        return Target(base, path, "api-key", (SIMULATOR_KEY,), body)
    if name == "litellm":
        return Target(base, f"/v1/{operation}", "Authorization", (f"Bearer {MASTER_KEY}",), body)
    if name in stack.keys:
        return Target(base, f"/api/v1/{operation}", "api-key", stack.keys[name], body)
    code = stack.codes[name]
    if name.endswith("_first"):
        return Target(base, f"/api/v1/{operation}", "api-key", (), body, fresh=f"{code}/")
    return Target(base, f"/api/v1/{operation}", "api-key", attendees(code), body)


def attendees(code: str) -> tuple[str, ...]:
    return tuple(f"{code}/attendee{i}@example.org" for i in range(USERS))


def warm(stack: Stack) -> None:
    """One request from each attendee of the steady targets (and of the personal keys' with ``--keys``), 16 at a
    time: after it, each attendee is registered and its day row exists, and each process has its event, its name
    and its day's ETag cached."""
    import httpx

    async def each(client: httpx.AsyncClient, url: str, credential: str, gate: asyncio.Semaphore) -> None:
        async with gate:
            answer = await client.post(url, json=BODIES["chat"], headers={"api-key": credential})
            answer.raise_for_status()

    async def all_of() -> None:
        gate = asyncio.Semaphore(16)
        async with httpx.AsyncClient(timeout=60) as client:
            steady = {name: attendees(stack.codes[name]) for name in STEADY_TARGETS if name in stack.urls}
            await asyncio.gather(
                *(
                    each(client, f"{stack.urls[name]}/api/v1/chat/completions", credential, gate)
                    for name, credentials in {**steady, **stack.keys}.items()
                    for credential in credentials
                )
            )

    asyncio.run(all_of())


def register_keys(stack: Stack) -> None:
    """Targets ``proxy_keys`` and ``worker_keys``: each on its process's event with caps, each attendee calling
    with a personal key (``POST /api/v1/keys``, once per name) instead of ``CODE/name``."""
    import httpx

    with httpx.Client(timeout=30) as client:
        for name in ("proxy", "worker"):
            if name not in stack.urls:
                continue
            keys = []
            for i in range(USERS):
                body = {"code": stack.codes[name], "name": f"keyed{i}"}
                answer = client.post(f"{stack.urls[name]}/api/v1/keys", json=body)
                answer.raise_for_status()
                keys.append(str(answer.json()["key"]))
            stack.urls[f"{name}_keys"] = stack.urls[name]
            stack.keys[f"{name}_keys"] = tuple(keys)


def measure(stack: Stack, scenario: Scenario, name: str, seconds: float, warmup: float) -> dict[str, Any]:
    """One scenario against one target: warm up, settle, run, settle; CPU from the settled points."""
    job = target(stack, name, scenario.kind)
    drive = run_stream if scenario.kind == "stream" else run_wrk
    drive(job, scenario.concurrency, warmup)
    watched = stack.procs()
    quiesce(watched)
    roles = {"target": _target_proc(stack, name), "upstream": stack.simulator, "storage": stack.azurite}
    before = {role: proc.cpu_seconds() for role, proc in roles.items()}
    host = name.startswith("worker") and stack.worker is not None
    host_before = stack.worker.own_cpu_seconds() if host and stack.worker else 0.0
    ours_before, busy_before = sum(p.cpu_seconds() for p in watched), _busy_cpu()
    measured: Measured = drive(job, scenario.concurrency, seconds)
    ours = sum(p.cpu_seconds() for p in watched) - ours_before + measured.generator_cpu_s
    background = max(0.0, _busy_cpu() - busy_before - ours) / measured.duration_s * 100
    quiesce(watched)  # usage written after the answers counts too
    after = {role: proc.cpu_seconds() for role, proc in roles.items()}
    done = max(1, measured.requests)
    cpu = {role: round((after[role] - before[role]) / done * 1000, 4) for role in roles}
    if host and stack.worker is not None:  # the emulator's own share (its process, not the worker's)
        cpu["host"] = round((stack.worker.own_cpu_seconds() - host_before) / done * 1000, 4)
    if name == "direct":
        cpu["upstream"] = cpu["target"]
    if name in ("direct", "litellm"):
        cpu.pop("storage")
    row: dict[str, Any] = {
        "scenario": scenario.name,
        "kind": scenario.kind,
        "concurrency": scenario.concurrency,
        "target": name,
        "requests": measured.requests,
        "errors": measured.errors,
        "seconds": round(measured.duration_s, 3),
        "rps": round(measured.rps, 1),
        "cpu_s_per_1k": cpu,
        "generator_cpu_pct": round(measured.generator_cpu_s / measured.duration_s * 100, 1),
        "background_cpu_pct": round(background, 1),
    }
    if measured.latency_ms:  # streams: raw samples
        row["latency_ms"] = _summary(lambda p: report.percentile(measured.latency_ms, p))
        row["ttfc_ms"] = _summary(lambda p: report.percentile(measured.ttfc_ms, p))
        after_first = [t - f for t, f in zip(measured.latency_ms, measured.ttfc_ms, strict=True)]
        row["after_first_ms"] = _summary(lambda p: report.percentile(after_first, p))
        row["events_per_stream"] = round(measured.events / done, 2)
        row["distribution_ms"] = _curve(measured.latency_ms)
        row["ttfc_distribution_ms"] = _curve(measured.ttfc_ms)
    else:
        points = [[p, ms] for p, ms in measured.percentiles_ms]
        row["latency_ms"] = _summary(lambda p: report.from_histogram(points, p))
        row["distribution_ms"] = [[p, round(ms, 4)] for p, ms in points]
    return row


def _busy_cpu() -> float:
    """CPU seconds the whole machine has been busy (all processes, all cores)."""
    times = psutil.cpu_times()
    return sum(times) - times.idle - getattr(times, "iowait", 0.0)


def _target_proc(stack: Stack, name: str) -> Proc:
    if name == "direct":
        return stack.simulator
    if name == "litellm":
        assert stack.litellm is not None
        return stack.litellm
    if name.startswith("worker"):
        assert stack.worker is not None
        return stack.worker
    return stack.proxy


def _summary(at: Any) -> dict[str, float]:
    return {f"p{p:g}": round(at(p), 4) for p in (50, 90, 99, 99.9)}


def _curve(samples: list[float]) -> list[list[float]]:
    from bench.load import PERCENTILES

    return [[p, round(report.percentile(samples, p), 4)] for p in PERCENTILES]


def add_comparisons(rows: list[dict[str, Any]]) -> None:
    """Added latency: a target's percentile minus direct's, same scenario."""
    direct = {r["scenario"]: r for r in rows if r["target"] == "direct"}
    for row in rows:
        base = direct.get(row["scenario"])
        if base is None or row["target"] == "direct":
            continue
        for field, key in (
            ("latency_ms", "added_ms"),
            ("ttfc_ms", "added_ttfc_ms"),
            ("after_first_ms", "added_after_first_ms"),
        ):
            if field in row:
                row[key] = {p: round(row[field][p] - base[field][p], 4) for p in ("p50", "p99")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=6.0, help="measured seconds per scenario and target")
    parser.add_argument("--warmup", type=float, default=1.0, help="discarded warm-up seconds before each")
    parser.add_argument("--no-litellm", action="store_true", help="skip LiteLLM (no venv needed)")
    parser.add_argument("--only", default="", help="comma-separated scenario names (chat_c16 runs only so)")
    parser.add_argument("--targets", default="", help="comma-separated targets (direct, proxy, proxy_first, ...)")
    parser.add_argument("--out", type=Path, default=BENCH / "results")
    parser.add_argument("--import-runs", type=int, default=5)
    parser.add_argument("--keys", action="store_true", help="also proxy_keys and worker_keys: personal keys")
    args = parser.parse_args(argv)
    scenarios = [s for s in SCENARIOS if (s.name in args.only.split(",") if args.only else s.default)]
    chosen = set(args.targets.split(",")) if args.targets else None
    wrk_path()
    started = time.monotonic()
    litellm_python = None if args.no_litellm else ensure_litellm()

    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        log_dir = Path(tmp)
        stack = start(log_dir, litellm_python)
        if args.keys:
            register_keys(stack)
        warm(stack)
        pids = {p.name: p.popen.pid for p in stack.procs()}
        print(f"stack ready in {time.monotonic() - started:.1f} s: {stack.urls}, pids {pids}", flush=True)
        rows: list[dict[str, Any]] = []
        try:
            with Sampler(stack.procs()):
                for scenario in scenarios:
                    for name in stack.urls:
                        if name not in scenario.targets | set(stack.keys) or (chosen and name not in chosen):
                            continue
                        row = measure(stack, scenario, name, args.seconds, args.warmup)
                        rows.append(row)
                        print(
                            f"{scenario.name:>15} {name:>13}: {row['rps']:8.0f} req/s  p50 "
                            f"{row['latency_ms']['p50']:7.2f} ms  p99 {row['latency_ms']['p99']:7.2f} ms  "
                            f"errors {row['errors']}",
                            flush=True,
                        )
        except BaseException:
            for proc in stack.procs():
                state = "running" if proc.popen.poll() is None else f"exited {proc.popen.returncode}"
                print(f"--- {proc.name} ({state}):\n{proc.tail()}", file=sys.stderr)
            raise
        finally:
            stack.stop()
        processes = {
            "simulator": stack.simulator,
            "proxy": stack.proxy,
            "worker": stack.worker,
            "azurite": stack.azurite,
            "litellm": stack.litellm,
        }

    print("measuring cold imports", flush=True)
    imports = {
        "proxy": import_times(
            Path(sys.executable),
            "function_app",
            ("function_app", "proxy"),
            app_env(azurite_connection_string(1), "http://127.0.0.1:1"),
            args.import_runs,
        )
    }
    if litellm_python is not None:
        imports["litellm"] = import_times(
            litellm_python, "litellm.proxy.proxy_server", ("litellm",), litellm_env(), args.import_runs
        )

    add_comparisons(rows)
    result: dict[str, Any] = {
        "schema": 1,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "wrk": _wrk_version(),
            "litellm": None if litellm_python is None else litellm_version(litellm_python),
        },
        "config": {
            "seconds": args.seconds,
            "warmup_seconds": args.warmup,
            "attendees": USERS,
            "daily_cap": CAP,
            "simulator_latency_ms": 0,
            "bodies": BODIES,
        },
        "processes": {
            name: {
                "idle_rss_mb": round(proc.idle_rss / 2**20, 1),
                "peak_rss_mb": round(proc.peak_rss / 2**20, 1),
                **({"import": imports[name]} if name in imports else {}),
            }
            for name, proc in processes.items()
            if proc is not None
        },
        "results": rows,
        "elapsed_seconds": 0.0,
    }
    result["goals"] = report.goals(result)
    result["elapsed_seconds"] = round(time.monotonic() - started, 1)
    report.write_json(result, args.out / "latest.json")
    report.chart(result, args.out / "latency.png")
    print(report.table(result))
    print(f"\nwrote {args.out / 'latest.json'} and {args.out / 'latency.png'} in {result['elapsed_seconds']:.0f} s")
    return 0


def _wrk_version() -> str:
    import subprocess

    done = subprocess.run([wrk_path(), "--version"], capture_output=True, text=True, check=False)
    return (done.stdout or done.stderr).split("Copyright")[0].strip()


if __name__ == "__main__":
    sys.exit(main())
