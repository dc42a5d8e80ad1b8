"""The request log's rows: one per request, or one per settling transaction that carries several requests.

Every request that reached upstream has an entry in the request log, in its
event's partition of ``proxyusage``, stored in the same entity group
transaction as its attendee's day (``proxy.admission.settling``). An entry
is the request's own row (``RowKey="log|<day>|<request id>"``) when it is the
only one of its day in its transaction, or when something reads it back by
its request id: a Responses API request (a request that continues it counts
its tokens, ``proxy.conversations.responses``) and a request settled on an
event budget's shard (the reconciler settles it from its entry when its
worker died first, ``Settling._settled_from_log``). The others of one
transaction and day go together in one row (a pack): ``RowKey`` the first
one's, ``entries`` their entries as a JSON array. Table Storage's emulator
spends as much on each operation of a transaction as on the row it writes,
so at concurrency a settling transaction of 14 requests writes 14 days and
1 pack instead of 14 days and 14 entries (``bench/README.md``).

A pack lands or not with its transaction, like the entries it holds, so a
transaction sent again after its answer was lost is refused on the pack
(409) as on an entry: those requests are stored, once. ``entries`` reads
either kind of row back as one entry per request, the same dicts as a
request's own row.
"""

from __future__ import annotations

from typing import Any

import orjson

from proxy.admission.days import Finished

PREFIX = "log|"  # request-log rows sort after the days ("YYYY-MM-DD|user") in each partition
# A pack's JSON, in bytes. Table Storage takes a string property of up to 64 KiB in UTF-16 (32,768 code units;
# learn.microsoft.com/rest/api/storageservices/understanding-the-table-service-data-model), and a UTF-16 code
# unit is at least one byte of UTF-8.
PACK_BYTES = 30_000
_KEYS = ("PartitionKey", "RowKey")


def row_key(day: str, request_id: str) -> str:
    """The row of a request's own entry."""
    return f"{PREFIX}{day}|{request_id}"


def rows(logged: list[Finished]) -> list[tuple[dict[str, Any], list[Finished]]]:
    """The log rows that store these requests' entries, each with the requests it stores, in order."""
    out: list[tuple[dict[str, Any], list[Finished]]] = []
    filling: dict[str, tuple[list[tuple[Finished, bytes]], int]] = {}  # per day, the pack being filled, its bytes
    for item in logged:
        assert item.log is not None
        if _alone(item):
            out.append((item.log, [item]))
            continue
        day, entry = item.admission.day, orjson.dumps({k: v for k, v in item.log.items() if k not in _KEYS})
        pack, size = filling.get(day, ([], 1))  # 1: "[" and "]", less the comma of the first entry
        if pack and size + len(entry) + 1 > PACK_BYTES:
            out.append(_pack(pack))
            pack, size = [], 1
        pack.append((item, entry))
        filling[day] = (pack, size + len(entry) + 1)
    out.extend(_pack(pack) for pack, _ in filling.values())
    return out


def entries(row: dict[str, Any]) -> list[dict[str, Any]]:
    """The entries a log row holds: itself, or each request of a pack as its own row would be."""
    packed = row.get("entries")
    if not isinstance(packed, str):
        return [row]
    day = str(row["RowKey"]).split("|", 2)[1]
    found = orjson.loads(packed)
    return [
        {"PartitionKey": row["PartitionKey"], "RowKey": row_key(day, str(entry["request_id"])), **entry}
        for entry in found
    ]


def _alone(item: Finished) -> bool:
    """Whether a request's entry is read back by its id, so needs a row of its own (the module docstring)."""
    assert item.log is not None
    return item.admission.shard is not None or item.log.get("kind") == "responses"


def _pack(pack: list[tuple[Finished, bytes]]) -> tuple[dict[str, Any], list[Finished]]:
    """A pack's row (the request's own row when it holds one), and the requests it stores."""
    items = [item for item, _ in pack]
    first = items[0].log
    assert first is not None
    if len(items) == 1:
        return first, items
    packed = b"[" + b",".join(entry for _, entry in pack) + b"]"
    return {"PartitionKey": first["PartitionKey"], "RowKey": first["RowKey"], "entries": packed.decode()}, items
