"""The processes under test: started, awaited, measured (CPU time, RSS) and stopped.

Every process listens on a free loopback port and writes its output to a log
file in a temporary directory, so a failed start can show why. CPU time and
RSS are read with psutil over the process and its children (LiteLLM's
``litellm`` command may fork a server process).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
LITELLM_VENV = BENCH / ".venv-litellm"
START_TIMEOUT = 180.0


@dataclass
class Proc:
    """A child process and its psutil handle."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    peak_rss: int = 0
    idle_rss: int = 0
    _handle: psutil.Process = field(init=False)

    def __post_init__(self) -> None:
        self._handle = psutil.Process(self.popen.pid)

    def tree(self) -> list[psutil.Process]:
        """The process and its children."""
        try:
            return [self._handle, *self._handle.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def cpu_seconds(self) -> float:
        total = 0.0
        for process in self.tree():
            try:
                times = process.cpu_times()
            except psutil.NoSuchProcess:
                continue
            total += times.user + times.system
        return total

    def own_cpu_seconds(self) -> float:
        """CPU seconds of the process itself, without its children (the host emulator without its worker)."""
        try:
            times = self._handle.cpu_times()
        except psutil.NoSuchProcess:
            return 0.0
        return float(times.user + times.system)

    def rss(self, tree: list[psutil.Process] | None = None) -> int:
        """Resident memory of the process and its children (``tree``: those, when the caller has them)."""
        total = 0
        for process in self.tree() if tree is None else tree:
            try:
                total += process.memory_info().rss
            except psutil.NoSuchProcess:
                continue
        return total

    def wait_ready(self, probe: Callable[[], bool], timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while not probe():
            if self.popen.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.popen.returncode}:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} not ready after {timeout:.0f} s:\n{self.tail()}")
            time.sleep(0.1)
        self.idle_rss = self.rss()

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(5)


def spawn(name: str, args: list[str], log_dir: Path, env: Mapping[str, str] | None = None, cwd: Path = ROOT) -> Proc:
    log = log_dir / f"{name}.log"
    with log.open("wb") as out:
        popen = subprocess.Popen(
            args,
            cwd=cwd,
            env=dict(env) if env is not None else None,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return Proc(name, popen, log)


def http_ok(url: str, headers: Mapping[str, str] | None = None) -> Callable[[], bool]:
    def probe() -> bool:
        try:
            return httpx.get(url, headers=dict(headers or {}), timeout=2).status_code < 500
        except httpx.HTTPError:
            return False

    return probe


class Sampler:
    """Samples the RSS of every process every ``interval`` s and keeps the peak.

    Each process's children are looked up again every ``TREE_SECONDS`` only: psutil finds them by reading the
    parent of every process on the machine, which at every sample cost this thread 20 % of a core, taken from
    the processes it measures on this two-core machine (a run's "other CPU"). Their RSS is read at every sample.
    """

    TREE_SECONDS = 1.0

    def __init__(self, procs: list[Proc], interval: float = 0.05) -> None:
        self.procs = procs
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        trees: list[list[psutil.Process]] = []
        found = float("-inf")  # looked up at the first sample
        while not self._stop.wait(self.interval):
            if time.monotonic() - found >= self.TREE_SECONDS:
                trees, found = [proc.tree() for proc in self.procs], time.monotonic()
            for proc, tree in zip(self.procs, trees, strict=True):
                proc.peak_rss = max(proc.peak_rss, proc.rss(tree))


def quiesce(procs: list[Proc], threshold: float = 0.05, timeout: float = 15.0) -> float:
    """Wait until every process is nearly idle (pending usage written); returns the wait."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        before = [p.cpu_seconds() for p in procs]
        time.sleep(0.3)
        busy = [(p.cpu_seconds() - b) / 0.3 for p, b in zip(procs, before, strict=True)]
        if max(busy) < threshold:
            break
    return time.monotonic() - start


def ensure_litellm() -> Path:
    """LiteLLM's own venv (its dependencies clash with ours); created when missing."""
    python = LITELLM_VENV / "bin" / "python"
    marker = LITELLM_VENV / ".installed"
    requirements = BENCH / "requirements-litellm.txt"
    if marker.is_file() and marker.read_text() == requirements.read_text():
        return python
    print(f"installing LiteLLM into {LITELLM_VENV.relative_to(ROOT)} (once)", flush=True)
    if not python.exists():
        base = getattr(sys, "_base_executable", None) or shutil.which("python3") or sys.executable
        subprocess.run([base, "-m", "venv", str(LITELLM_VENV)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--upgrade", "pip"], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "-r", str(requirements)], check=True)
    marker.write_text(requirements.read_text())
    return python


def litellm_version(python: Path) -> str:
    out = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m; print(m.version('litellm'))"],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()
