"""Real processes for the tests: Azurite, the simulator and the app, on free loopback ports."""

from __future__ import annotations

import asyncio
import os
import queue
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from http.server import HTTPServer
from pathlib import Path
from typing import TypeVar

import httpx

from devtools.local import azurite

T = TypeVar("T")
S = TypeVar("S", bound=HTTPServer)
ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT = 30.0
# How long a wait for a condition gives up after, unless told: generous, as a wait on a busy machine (2 cores
# shared with other test runs) may take many times what it takes on a quiet one. It bounds nothing a test asserts.
WAIT_SECONDS = 30.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


azurite_connection_string = azurite.connection_string
# EVENT_CACHE_SECONDS of the shared apps (tests/conftest.py): how long a worker may answer from what it read.
CACHE_SECONDS = 1.0


def wait_for(condition: Callable[[], bool], timeout: float = WAIT_SECONDS, what: str = "condition") -> None:
    """Poll ``condition`` until true, failing after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def seen_within(seconds: float, call: Callable[[], T], done: Callable[[T], bool], what: str) -> T:
    """Call until ``done`` holds for the answer; start right after a change was answered.

    A worker may answer from what it read for ``seconds`` (its cache), so every call *sent* later than that after
    the change must see it: fails on the first that does not. Measured by the send times, not by a timeout, so a
    slow machine (slow calls) can neither fail it nor make it pass.
    """
    changed = time.monotonic()
    while True:
        sent = time.monotonic() - changed
        answer = call()
        if done(answer):
            return answer
        assert sent <= seconds, f"{what}: not seen by a call sent {sent:.2f} s after the change: {answer!r}"
        time.sleep(0.02)


class Service:
    """A child process that prints a ready line; its output is kept for assertions."""

    def __init__(self, args: list[str], ready: str, env: Mapping[str, str] | None = None) -> None:
        self.output: list[str] = []
        self.left_children = False
        self._lines: queue.Queue[str | None] = queue.Queue()  # None: the output ended
        self.process = subprocess.Popen(
            args,
            cwd=ROOT,
            env=dict(env) if env is not None else None,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self._pump_thread = threading.Thread(target=self._pump, daemon=True)
        self._pump_thread.start()
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self.stop()
                raise RuntimeError(f"{args[:3]} did not start:\n{self.text}") from None
            if line is None:  # it exited (or closed its output) without the ready line: no point waiting
                code = self.stop()
                raise RuntimeError(f"{args[:3]} exited with code {code} before it was ready:\n{self.text}")
            if ready in line:
                self.ready_line = line.strip()
                return

    def _pump(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.output.append(line)
            self._lines.put(line)
        self._lines.put(None)

    @property
    def text(self) -> str:
        return "".join(self.output)

    def wait_for_output(self, needle: str, timeout: float = WAIT_SECONDS) -> None:
        """Wait until the process has printed ``needle``."""
        wait_for(lambda: needle in self.text, timeout, f"{needle!r} in the output")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self._pump_thread.join(5)
        # Still reading: a process it started outlived it and holds the pipe. Closing the pipe
        # now would wait forever on the reader's lock, so leave it (and say so).
        self.left_children = self._pump_thread.is_alive()
        if self.process.stdout is not None and not self.left_children:
            self.process.stdout.close()
        return self.process.returncode


def serving(server: S) -> Iterator[S]:
    """Serve ``server`` (an ``http.server`` one, on loopback) in a thread until the generator is closed: for a
    fixture, ``yield from serving(...)``."""
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def start_azurite(*extra: str, scheme: str = "http") -> tuple[Service, str]:
    """Azurite's table service in memory; ``extra`` for HTTPS and OAuth options."""
    port = free_port()
    args = [*azurite.command(port), "--disableProductStyleUrl", *extra]
    return Service(args, "successfully started"), azurite.connection_string(port, scheme)


def start_simulator(*extra: str, env: Mapping[str, str] | None = None) -> tuple[Service, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("SIM_")}
    service = Service(
        [sys.executable, "-m", "devtools.simulator", "--port", "0", *extra],
        "simulator listening on ",
        {**base, **(env or {})},
    )
    return service, service.ready_line.split("listening on ", 1)[1]


def app_env(connection_string: str, upstream: str, **extra: str) -> dict[str, str]:
    """The environment of an app process: this one's, minus Azure settings, plus ours."""
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("AZURE_", "STORAGE_", "IDENTITY_", "SIM_"))}
    keep.pop("ORGANIZER_KEY", None)
    return {
        **keep,
        "STORAGE_CONNECTION_STRING": connection_string,
        "AZURE_OPENAI_ENDPOINT": upstream,
        "AZURE_OPENAI_API_KEY": "simulator-key",
        "ORGANIZER_KEY": ORGANIZER_KEY,
        "CODE_HASH_KEY": CODE_HASH_KEY,
        **extra,
    }


ORGANIZER_KEY = "test-organizer-" + secrets.token_hex(8)
# The key of the stored hashes of codes, shared by every app process, CLI run and in-process store of a test run.
CODE_HASH_KEY = "test-code-hash-" + secrets.token_urlsafe(32)


def start_app(env: Mapping[str, str], *extra: str, app_dir: Path = ROOT) -> tuple[Service, str]:
    """The function app under the real Python worker behind the host emulator.

    Returns the service (the emulator; its output includes the worker's) and ``http://host:port``.
    """
    args = [sys.executable, "-m", "devtools.funchost", "--port", "0", "--app-dir", str(app_dir), *extra]
    service = Service(args, "proxy listening on ", env)
    url = service.ready_line.split("listening on ", 1)[1].removesuffix("/api")
    return service, url


def worker_pids(service: Service) -> list[int]:
    """The pids of the workers the emulator has started, in order (from its ``worker started`` lines)."""
    return [int(line.split("pid=", 1)[1].split()[0]) for line in service.output if line.startswith("worker started")]


def sim_stats(simulator: str) -> dict[str, object]:
    return dict(httpx.get(f"{simulator}/_sim/stats").json())


async def eventually(
    probe: Callable[[], Awaitable[T]], done: Callable[[T], bool], timeout: float = WAIT_SECONDS, what: str = "condition"
) -> T:
    """Await ``probe`` until ``done`` holds for its result, failing after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        result = await probe()
        if done(result):
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}; last: {result!r}")
        await asyncio.sleep(0.02)
