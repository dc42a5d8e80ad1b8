"""The request log's rows (``proxy.admission.requestlog``), stored by a settlement against Azurite and read back."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from proxy.admission.days import Admission, Finished, Settlement
from proxy.admission.limits import Ledger
from proxy.admission.requestlog import PACK_BYTES, entries, row_key
from proxy.ledger.reports import report
from proxy.storage.tables import Tables
from tests.conftest import MakeEvent


async def test_a_settlement_packs_its_entries_and_keeps_apart_those_read_by_id(
    tables: Tables, make_event: MakeEvent
) -> None:
    """One settlement of 43 requests: the 40 chat requests of one day go in packs, each under Table
    Storage's 64 KiB for a string (their entries, ~1,000 characters each, fill more than one; as one pack
    Azurite refuses them). A request alone on its day, a Responses API request and one settled on an event
    budget's shard each have a row of their own, found by its request id. Read back, each entry is the one
    settled, and each day counts its requests."""
    created = await make_event(daily_requests=None, event_requests=100)
    event_id = created.event.id
    ledger, now = Ledger(tables), datetime.now(UTC)
    today, tomorrow = now.date().isoformat(), (now + timedelta(days=1)).date().isoformat()
    shard = await ledger.admit_budget(created.event, now, 10, "budgeted")

    def finished(request_id: str, user: str, day: str, kind: str = "chat", on: str | None = None) -> Finished:
        admission = Admission(request_id, day, 0, 10, None, None, reserved=False, shard=on)
        log = {"PartitionKey": event_id, "RowKey": row_key(day, request_id), "request_id": request_id,
               "time": now.isoformat(), "user": user, "kind": kind, "status": 200, "total_tokens": 3,
               "cost": 0.25, "stream": False, "note": "é" * 900}  # fmt: skip
        return Finished(user, admission, Settlement("gpt-4o-mini", 1, 2, 3, True, True), log)

    chats = [finished(f"chat{i:02}", f"user{i % 20}", today) for i in range(40)]
    apart = [
        finished("late", "user0", tomorrow),
        finished("asked", "user1", today, kind="responses"),
        finished("budgeted", "user2", today, on=shard),
    ]
    await ledger.settle(event_id, chats + apart)
    await ledger.drain()  # the shard's settlement, written a moment later
    assert all(item.stored and not item.refused for item in chats + apart)

    rows = [row async for row in tables.usage.query_entities(
        "PartitionKey eq @pk and RowKey ge 'log|' and RowKey lt 'log}'", parameters={"pk": event_id}
    )]  # fmt: skip
    packs = [row for row in rows if "entries" in row]
    assert sorted(row["RowKey"] for row in rows if "entries" not in row) == sorted(
        row_key(item.admission.day, item.admission.request_id) for item in apart
    )
    assert len(packs) >= 2 and all(len(pack["entries"].encode()) <= PACK_BYTES for pack in packs), packs
    assert sum(len(orjson.loads(pack["entries"])) for pack in packs) == len(chats)
    for item in apart:  # found by its id, as the reconciler and the Responses API read it
        found = await tables.usage.get_entity(event_id, row_key(item.admission.day, item.admission.request_id))
        assert entries(dict(found)) == [item.log]

    logged: dict[str, Any] = {entry["request_id"]: entry for row in rows for entry in entries(dict(row))}
    assert logged == {item.admission.request_id: item.log for item in chats + apart}
    by_user = await report(tables, event_id, "user")
    assert by_user["totals"]["requests"] == 43
    assert {row["key"]: row["requests"] for row in by_user["rows"]}["user0"] == 3  # two chats and "late"
