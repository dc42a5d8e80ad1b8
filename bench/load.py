"""The load generators: ``wrk`` (C) for plain requests, ``bench.stream_client`` for streams.

Both run as child processes, so their own CPU time is measured (``os.wait4``)
and reported next to their results: a generator that nears one full core is
the bottleneck, one well below it is not.

The wrk Lua script pre-builds one request per credential and cycles through
them, so requests at high concurrency come from many attendees; or, for a
target with ``fresh`` set, builds each request with a name never used before
(``<fresh><run>-<counter>@example.org``): every request is its attendee's
first. Its ``done`` hook prints the latency histogram's percentiles as one
JSON line.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.procs import ROOT

PERCENTILES: tuple[float, ...] = (*range(1, 100), 99.5, 99.9, 99.99)
_MARK = "BENCHJSON "

_LUA = """
local path = [==[%(path)s]==]
local body = [==[%(body)s]==]
local auth_name = [==[%(auth_name)s]==]
local auth_values = { %(auth_values)s }
local fresh = [==[%(fresh)s]==]
local percentiles = { %(percentiles)s }
local requests_ = {}
local counter = 0

function init(args)
  for i, value in ipairs(auth_values) do
    local headers = { ["Content-Type"] = "application/json" }
    headers[auth_name] = value
    requests_[i] = wrk.format("POST", path, headers, body)
  end
end

function request()
  counter = counter + 1
  if fresh ~= "" then
    local headers = { ["Content-Type"] = "application/json" }
    headers[auth_name] = fresh .. counter .. "@example.org"
    return wrk.format("POST", path, headers, body)
  end
  return requests_[(counter %% #requests_) + 1]
end

function done(summary, latency, requests)
  local out = {}
  for _, p in ipairs(percentiles) do
    out[#out + 1] = string.format("[%%g, %%d]", p, latency:percentile(p))
  end
  local e = summary.errors
  io.write(string.format(
    '%(mark)s{"requests": %%d, "duration_us": %%d, "errors": {"connect": %%d, "read": %%d, "write": %%d, ' ..
    '"status": %%d, "timeout": %%d}, "min_us": %%d, "max_us": %%d, "mean_us": %%f, "percentiles_us": [%%s]}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency.min, latency.max, latency.mean, table.concat(out, ", ")))
end
"""


@dataclass(frozen=True)
class Target:
    """Where and how to send one kind of request (chat, stream or embeddings)."""

    base: str
    path: str
    auth_name: str
    auth_values: tuple[str, ...]
    body: dict[str, Any]
    # ``CODE/``: each request a new attendee's first (wrk only); empty: cycle through ``auth_values``.
    fresh: str = ""


@dataclass
class Measured:
    """What one load run measured."""

    requests: int
    errors: int
    duration_s: float
    generator_cpu_s: float
    latency_ms: list[float] = field(default_factory=list)  # per request (streams) or empty
    percentiles_ms: list[tuple[float, float]] = field(default_factory=list)
    ttfc_ms: list[float] = field(default_factory=list)
    events: int = 0

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s else 0.0


def _lua_string(value: str) -> str:
    if "]==]" in value:
        raise ValueError("value cannot be quoted for Lua")
    return f"[==[{value}]==]"


def wrk_path() -> str:
    found = shutil.which("wrk")
    if found is None:
        raise SystemExit("wrk is not installed: apt-get install -y wrk (or brew install wrk)")
    return found


def _run_child(args: list[str], timeout: float) -> tuple[str, float]:
    """Run a child to its end; its stdout and the CPU seconds it used."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        popen = subprocess.Popen(args, cwd=ROOT, stdout=out, stderr=err)
        deadline = time.monotonic() + timeout
        while True:
            pid, status, usage = os.wait4(popen.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                popen.kill()
                pid, status, usage = os.wait4(popen.pid, 0)
                break
            time.sleep(0.02)
        popen.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        text = out.read().decode(errors="replace")
        if popen.returncode != 0:
            raise RuntimeError(f"{args[0]} failed ({popen.returncode}): {err.read().decode(errors='replace')}{text}")
        return text, usage.ru_utime + usage.ru_stime


def run_wrk(target: Target, concurrency: int, seconds: float) -> Measured:
    script = _LUA % {
        "path": target.path,
        "body": json.dumps(target.body, separators=(",", ":")),
        "auth_name": target.auth_name,
        "auth_values": ", ".join(_lua_string(v) for v in target.auth_values),
        # A prefix of its own per run, so that neither the warm-up nor an earlier run used these names.
        "fresh": target.fresh and f"{target.fresh}first-{secrets.token_hex(4)}-",
        "percentiles": ", ".join(f"{p:g}" for p in PERCENTILES),
        "mark": _MARK,
    }
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as handle:
        handle.write(script)
    try:
        args = [
            wrk_path(),
            "-t1",
            f"-c{concurrency}",
            f"-d{max(1, round(seconds))}s",
            "--timeout",
            "10s",
            "-s",
            handle.name,
            target.base,
        ]
        text, cpu = _run_child(args, seconds + 30)
    finally:
        Path(handle.name).unlink()
    line = next(x for x in text.splitlines() if x.startswith(_MARK))
    data = json.loads(line.removeprefix(_MARK))
    errors = sum(data["errors"].values())
    return Measured(
        requests=data["requests"],
        errors=errors,
        duration_s=data["duration_us"] / 1e6,
        generator_cpu_s=cpu,
        percentiles_ms=[(p, us / 1000) for p, us in data["percentiles_us"]],
    )


def run_stream(target: Target, concurrency: int, seconds: float) -> Measured:
    args = [
        sys.executable,
        "-m",
        "bench.stream_client",
        "--url",
        target.base + target.path,
        "--concurrency",
        str(concurrency),
        "--seconds",
        f"{seconds:g}",
        "--header",
        f"{target.auth_name}: {','.join(target.auth_values)}",
        "--body",
        json.dumps(target.body),
    ]
    text, cpu = _run_child(args, seconds + 60)
    data = json.loads(text)
    return Measured(
        requests=data["requests"],
        errors=data["errors"],
        duration_s=data["duration_s"],
        generator_cpu_s=cpu,
        latency_ms=data["total_ms"],
        ttfc_ms=data["ttfc_ms"],
        events=data["events"],
    )
