"""Azurite, the local Table Storage: its well-known account, and how to start it.

One place for what ``make run``, the tests and the benchmark share: the
emulator's account key, the connection string for a port, and the command line
(keep-alive longer than aiohttp's 15 s pool expiry, so that no client reuses a
connection Azurite has already closed; telemetry off: by default Azurite reports
every request to Application Insights, which nothing here may reach, and that
middleware cost a third of its CPU per request, measured: a conditional replace
1.61 ms of Azurite's CPU with it off against 2.43 with it on, a ``$batch`` of a
day and a log entry 1.73 against 2.36).
"""

from __future__ import annotations

import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ACCOUNT = "devstoreaccount1"
KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
KEEP_ALIVE_SECONDS = 60


def connection_string(port: int, scheme: str = "http") -> str:
    return (
        f"DefaultEndpointsProtocol={scheme};AccountName={ACCOUNT};"
        f"AccountKey={KEY};TableEndpoint={scheme}://127.0.0.1:{port}/{ACCOUNT};"
    )


def command(port: int, *, data_dir: Path | None = None, with_blobs_and_queues: bool = False) -> list[str]:
    """Azurite's command line: tables on ``port`` (in memory unless ``data_dir``), blobs and queues if asked."""
    name = "azurite" if with_blobs_and_queues else "azurite-table"
    binary = ROOT / "node_modules" / ".bin" / name
    if not binary.exists():
        found = shutil.which(name)
        if found is None:
            raise RuntimeError("Azurite is not installed: run 'npm ci' (make run and make test do)")
        binary = Path(found)
    args = [
        str(binary),
        "--tableHost",
        "127.0.0.1",
        "--tablePort",
        str(port),
        "--skipApiVersionCheck",
        "--disableTelemetry",
    ]
    args += ["--location", str(data_dir)] if data_dir is not None else ["--inMemoryPersistence"]
    kinds = ["blob", "queue", "table"] if with_blobs_and_queues else ["table"]
    if with_blobs_and_queues:
        args += ["--blobHost", "127.0.0.1", "--queueHost", "127.0.0.1"]
    for kind in kinds:
        args += [f"--{kind}KeepAliveTimeout", str(KEEP_ALIVE_SECONDS)]
    return args
