"""Azurite's cost per operation as its table grows: what the request log's rows do to the emulator.

    python -m bench.storage_rows [--sizes 0,20000,60000,120000] [--transactions 200]

Starts Azurite (in memory) and, at each size, fills the usage table with
request-log rows up to that many (transactions of 100), then sends
``--transactions`` transactions one after another, each shaped as the
settlement sent them at concurrency before the request log packed a
transaction's entries in one row (10 days replaced under their ETags, 10 log
entries inserted; ``proxy.admission.requestlog``). Prints, per size, Azurite's CPU per operation and the
wall time per transaction.

Why: Azurite keeps a table in LokiJS, which on every removal renumbers the
positions in each of its indexes (PartitionKey, RowKey), a loop over every
row of the table, and Azurite replaces an entity by removing and inserting
it. Every request replaces a day and adds a log row (or its share of one), so the emulator's cost
per operation grows with the rows that earlier requests left, whichever
event they belong to. Table Storage has no such loop. ``bench.run`` runs its
scenarios one after another on one Azurite, so a later scenario pays for the
rows of the earlier ones.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from bench.procs import Proc, http_ok, spawn
from devtools.local.azurite import command as azurite_command
from devtools.local.azurite import connection_string as azurite_connection_string
from proxy.config.settings import Settings
from proxy.storage.tables import Tables
from tests.support import free_port

PARTITION = "bench-rows"
DAYS = 10  # replaced per transaction, as many log entries inserted


def log_row(partition: str) -> dict[str, Any]:
    return {"PartitionKey": partition, "RowKey": f"log|2026-12-04|{uuid.uuid4().hex}", "user": "a@example.org",
            "model": "gpt-4o-mini", "kind": "chat", "status": 200, "prompt_tokens": 12, "completion_tokens": 20,
            "total_tokens": 32}  # fmt: skip


async def measure(tables: Tables, azurite: Proc, sizes: list[int], transactions: int) -> list[dict[str, Any]]:
    entities = tables.usage_entities
    days: list[tuple[str, dict[str, Any]]] = []
    for index in range(DAYS):
        day = {"PartitionKey": PARTITION, "RowKey": f"2026-12-04|attendee{index}", "reserved": 0, "inflight": "{}"}
        days.append((await entities.insert(day), day))
    rows, results = DAYS, []
    for size in sizes:
        while rows < size:  # half of them in another event's partition: the indexes span the whole table
            await entities.transact([("create", log_row(f"other{rows % 2}"), {}) for _ in range(100)])
            rows += 100
        cpu, start = azurite.cpu_seconds(), time.perf_counter()
        for _ in range(transactions):
            updated = [{**day, "reserved": day["reserved"] + 1} for _, day in days]
            operations = [("update", day, {"etag": etag}) for (etag, _), day in zip(days, updated, strict=True)]
            operations += [("create", log_row(PARTITION), {}) for _ in range(DAYS)]
            answers = await entities.transact(operations)
            days = [(str(answer["etag"]), day) for answer, day in zip(answers, updated, strict=False)]
        cpu, wall = azurite.cpu_seconds() - cpu, time.perf_counter() - start
        results.append({"rows": rows, "azurite_cpu_ms_per_operation": round(cpu / transactions / (2 * DAYS) * 1000, 3),
                        "wall_ms_per_transaction": round(wall / transactions * 1000, 2)})  # fmt: skip
        rows += transactions * DAYS
        print(json.dumps(results[-1]), flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="0,20000,60000,120000", help="rows in the table before each measure")
    parser.add_argument("--transactions", type=int, default=200, help="transactions measured at each size")
    args = parser.parse_args(argv)
    log_dir = Path(tempfile.mkdtemp(prefix="bench-rows-"))
    port = free_port()
    azurite = spawn("azurite", [*azurite_command(port), "--disableProductStyleUrl", "--silent"], log_dir)
    try:
        azurite.wait_ready(http_ok(f"http://127.0.0.1:{port}/devstoreaccount1/Tables"), 60)
        connection = azurite_connection_string(port)
        settings = Settings.from_env({"STORAGE_CONNECTION_STRING": connection}, need_upstream=False)

        async def run() -> None:
            tables = Tables.create(settings, None)
            try:
                await tables.ensure()
                await measure(tables, azurite, [int(size) for size in args.sizes.split(",")], args.transactions)
            finally:
                await tables.aclose()

        asyncio.run(run())
        return 0
    finally:
        azurite.stop()
        print(f"logs: {log_dir}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
