"""``make run``: the whole local stack in one command, stopped by Ctrl-C or by closing its terminal.

Starts Azurite (tables persisted in ``.azurite/``), the Azure OpenAI simulator
(unless ``AZURE_OPENAI_ENDPOINT`` names a real resource), and the function app
on ``http://localhost:$PROXY_PORT`` (7071): with ``func start`` when Azure
Functions Core Tools are installed, else under the real Python worker behind the
host emulator (``devtools/funchost/host.py``). It writes the settings it uses into
``local.settings.json`` (so ``func start`` and the organizer CLI reach the same
storage with the same ``CODE_HASH_KEY``, generated on the first run), opens the
demo event ``DEMO-EVENT`` for the next seven days and prints a ready-to-paste
credential, curl and Python.

The children run in sessions of their own, so it is this process that stops
them all: on Ctrl-C (SIGINT), SIGTERM, or SIGHUP when its terminal closes. If
one of them dies (Azurite, the simulator or the app), it says which and how,
and stops the rest.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import FrameType

import httpx

from devtools.local import azurite
from proxy.config.settings import Settings
from proxy.policy.events import Event, EventStore
from proxy.storage.tables import opened

ROOT = Path(__file__).resolve().parents[2]
DEMO_CODE = "DEMO-EVENT"
DEMO_ID = "demo-event"
SIMULATOR_KEY = "simulator-key"
PLACEHOLDER_KEY = "change-me-organizer-key"
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
STOP_SECONDS = 10.0  # then SIGKILL
WHAT_IT_MEANS = {
    "Azurite": "the proxy cannot reach Table Storage and would answer 503 storage_unavailable",
    "the simulator": "the proxy has no upstream and would answer 502 upstream_error",
}


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def wait_until(what: str, check: Callable[[], bool], timeout: float, process: subprocess.Popen[bytes] | None) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if process is not None and process.poll() is not None:
            raise SystemExit(f"{what} exited with code {process.returncode} before it was ready")
        if time.monotonic() > deadline:
            raise SystemExit(f"{what} was not ready after {timeout:.0f} s")
        time.sleep(0.1)


class Stack:
    """The child processes, stopped in reverse order."""

    def __init__(self) -> None:
        self.children: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(args, cwd=ROOT, env=env, start_new_session=True)
        self.children.append((name, process))
        return process

    def died(self) -> tuple[str, subprocess.Popen[bytes]] | None:
        """The first child that has exited, if any."""
        return next(((name, p) for name, p in self.children if p.poll() is not None), None)

    def stop(self) -> None:
        # A second Ctrl-C or a hang-up while stopping must not leave children behind.
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        # All at once, then one deadline for all: on a busy machine, waiting for each in turn
        # could outlast the patience of whoever sent the signal, and leave the rest running.
        running = [(name, process) for name, process in reversed(self.children) if process.poll() is None]
        for name, process in running:
            print(f"stopping {name}", flush=True)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_SECONDS
        for _, process in running:
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(5)


def load_values(path: Path) -> dict[str, str]:
    if path.is_file():
        return dict(json.loads(path.read_text()).get("Values", {}))
    example = ROOT / "local.settings.example.json"
    return dict(json.loads(example.read_text())["Values"])


def write_values(path: Path, values: dict[str, str]) -> None:
    data = json.loads(path.read_text()) if path.is_file() else {"IsEncrypted": False}
    data["Values"] = values
    path.write_text(json.dumps(data, indent=2) + "\n")


async def open_demo_event(settings: Settings) -> Event:
    """Create the demo event, or reopen it for the next seven days."""
    now = datetime.now(UTC)
    async with opened(settings, None) as tables:
        await tables.ensure()
        store = EventStore(tables, settings.hasher(), 0)
        starts_at, ends_at = now - timedelta(minutes=5), now + timedelta(days=7)
        existing = await store.by_code(DEMO_CODE)
        if existing is not None:
            return await store.save(replace(existing, starts_at=starts_at, ends_at=ends_at, active=True))
        event = Event(
            id=DEMO_ID,
            name="Demo event",
            code_hash=store.hash_code(DEMO_CODE),
            starts_at=starts_at,
            ends_at=ends_at,
            description="Created by make run",
            max_tokens=1024,
            daily_requests=1000,
        )
        return await store.create(event)


def banner(base: str, organizer_key: str, generated: bool, upstream: str) -> str:
    """What to paste; the organizer key only when this run generated it, never one it was given (a secret)."""
    key = f"{DEMO_CODE}/alice"
    if generated:
        shown = f"(generated; set ORGANIZER_KEY to choose it): {organizer_key}"
    else:
        shown = "the one you set (ORGANIZER_KEY, or Values of local.settings.json), not shown"
    return f"""
================================================================================
Event proxy running at {base}/api   (upstream: {upstream})
Demo event credential:  {key}
Attendee page:          {base}/api/portal
Organizer page:         {base}/api/manage/portal

  curl {base}/api/v1/chat/completions \\
    -H "openai-event-code: {key}" -H "content-type: application/json" \\
    -d '{{"model": "gpt-4o-mini", "messages": [{{"role": "user", "content": "Hello"}}]}}'

  from openai import OpenAI
  client = OpenAI(base_url="{base}/api/v1", api_key="{key}")
  print(client.chat.completions.create(model="gpt-4o-mini",
        messages=[{{"role": "user", "content": "Hello"}}]).choices[0].message.content)

Organizer key {shown}
Each request prints one access line (LOG_FORMAT=json for JSON lines).
  .venv/bin/python -m proxy.manage events list
  .venv/bin/python -m proxy.manage usage {DEMO_ID} --by user
Ctrl-C stops everything, and so does closing this terminal.
================================================================================
""".strip("\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the local stack (make run).")
    parser.add_argument("--settings-file", type=Path, default=ROOT / "local.settings.json")
    parser.add_argument("--data-dir", type=Path, default=ROOT / ".azurite")
    parser.add_argument("--no-func", action="store_true", help="use the host emulator even if func is installed")
    args = parser.parse_args(argv)

    port = int(os.environ.get("PROXY_PORT", "7071"))
    table_port = int(os.environ.get("AZURITE_TABLE_PORT", "10002"))
    simulator_port = int(os.environ.get("SIMULATOR_PORT", "8080"))
    values = load_values(args.settings_file)
    organizer_key = os.environ.get("ORGANIZER_KEY") or values.get("ORGANIZER_KEY", "")
    generated = not organizer_key or organizer_key == PLACEHOLDER_KEY
    if generated:
        organizer_key = secrets.token_urlsafe(24)
    # The key of the stored hashes of codes: generated once and kept in local.settings.json, since codes stored
    # under one key are unknown under another (proxy.config.hashing).
    code_hash_key = os.environ.get("CODE_HASH_KEY") or values.get("CODE_HASH_KEY") or secrets.token_urlsafe(32)
    real_upstream = os.environ.get("AZURE_OPENAI_ENDPOINT")

    stack = Stack()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    # SIGINT too: a process started in the background by a non-interactive shell inherits
    # SIGINT ignored, and Python then leaves it ignored (Ctrl-C would do nothing).
    for sig in STOP_SIGNALS:
        signal.signal(sig, on_signal)
    try:
        if port_open(port):
            raise SystemExit(f"port {port} is busy: stop what runs there or set PROXY_PORT")
        func = None if args.no_func else shutil.which("func")
        if port_open(table_port):
            print(f"Azurite (or another table service) already listens on {table_port}; using it", flush=True)
        else:
            args.data_dir.mkdir(exist_ok=True)
            # The Functions host also wants blobs and queues (AzureWebJobsStorage); the emulator only tables.
            command = azurite.command(table_port, data_dir=args.data_dir, with_blobs_and_queues=bool(func))
            process = stack.start("Azurite", [*command, "--silent"])
            wait_until("Azurite", lambda: port_open(table_port), 30, process)
        connection_string = azurite.connection_string(table_port)
        values.update(
            STORAGE_CONNECTION_STRING=connection_string,
            ORGANIZER_KEY=organizer_key,
            CODE_HASH_KEY=code_hash_key,
            PYTHON_ENABLE_INIT_INDEXING="1",
            FUNCTIONS_WORKER_RUNTIME="python",
        )
        if real_upstream:
            values["AZURE_OPENAI_ENDPOINT"] = real_upstream
            if os.environ.get("AZURE_OPENAI_API_KEY"):
                values["AZURE_OPENAI_API_KEY"] = os.environ["AZURE_OPENAI_API_KEY"]
            else:
                values.pop("AZURE_OPENAI_API_KEY", None)
        else:
            if port_open(simulator_port):
                raise SystemExit(f"port {simulator_port} is busy: set SIMULATOR_PORT to another port")
            process = stack.start(
                "the simulator",
                [sys.executable, "-m", "devtools.simulator", "--port", str(simulator_port), "--api-key", SIMULATOR_KEY],
            )
            wait_until("the simulator", lambda: port_open(simulator_port), 30, process)
            values.update(
                AZURE_OPENAI_ENDPOINT=f"http://127.0.0.1:{simulator_port}", AZURE_OPENAI_API_KEY=SIMULATOR_KEY
            )
        write_values(args.settings_file, values)

        env = {**os.environ, **values}
        if func:
            process = stack.start("the function app (func start)", [func, "start", "--port", str(port)], env)
        else:
            process = stack.start(
                "the function app (host emulator)",
                [sys.executable, "-m", "devtools.funchost", "--port", str(port), "--app-dir", str(ROOT)],
                env,
            )
        base = f"http://localhost:{port}"

        def healthy() -> bool:
            try:
                return httpx.get(f"{base}/api/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until("the function app", healthy, 120, process)
        settings = Settings.from_env(env, need_upstream=False)
        asyncio.run(open_demo_event(settings))
        print(banner(base, organizer_key, generated, values["AZURE_OPENAI_ENDPOINT"]), flush=True)
        print(f"settings written to {args.settings_file}", flush=True)
        while (died := stack.died()) is None:
            time.sleep(0.5)
        name, child = died
        what = WHAT_IT_MEANS.get(name, "the proxy is not serving")
        print(
            f"\n{name} (pid {child.pid}) exited with code {child.returncode}: {what}. Stopping everything;"
            " run make run again (its output above says why it stopped).",
            file=sys.stderr,
            flush=True,
        )
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        stack.stop()


if __name__ == "__main__":
    sys.exit(main())
