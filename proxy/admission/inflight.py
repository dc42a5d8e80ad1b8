"""The requests admitted on one entity and not yet settled: the ``inflight`` map, and how it is stored.

An attendee's day (``proxy.admission.days``) and a shard of an event's budget
(``proxy.admission.budget``) each hold the requests they admitted and that have not
settled, as ``{request id: entry}``, where an entry is ``[estimate, admitted
at (epoch seconds)]``, or ``[estimate, admitted at, 1]`` once the reconciler
has released it (``proxy.ledger.reconcile``). The minute a request was admitted in,
which the tokens-per-minute window needs, is its admitted-at // 60.

In memory the map is a dict, decoded once when an entity is read and encoded
once when it is written. In storage it is JSON, cut into pieces: Table Storage
caps a string property at 64 KiB (32,768 UTF-16 characters), which one
property filled at about 510 requests in flight. The pieces go to
``inflight``, ``inflight1``, ``inflight2``... (``PIECE_CHARS`` characters each,
joined again when read); while the map is small, ``inflight`` holds all of it,
so ``inflight ne '{}'`` still finds every entity that holds a request. An
entry takes at most about 60 characters, so ``MAX_ENTRIES`` (6,000 requests in
flight per entity) fits in 12 pieces, 720 KB of an entity's 1 MiB; a request
past it is refused (429 ``rate_limited``) rather than failing the write.

The cost of a write grows with the requests in flight on its entity (about
50 bytes each): 2,000 in flight on one shard make each of its writes about
100 KB, with no more round trips.
"""

from __future__ import annotations

from typing import Any

import orjson

from proxy.errors import CapExceeded

PIECE_CHARS = 32_000  # below 32,768 UTF-16 units; the text is ASCII (hex ids and digits)
MAX_PIECES = 12
MAX_ENTRIES = 6_000
NAMES = ("inflight", *(f"inflight{n}" for n in range(1, MAX_PIECES)))

InFlight = dict[str, list[int]]


def decode(entity: dict[str, Any]) -> InFlight:
    """The map stored in an entity's pieces (or already decoded there)."""
    value = entity.get("inflight")
    if isinstance(value, dict):
        return value
    text = "".join(str(entity.get(name) or "") for name in NAMES) or "{}"
    entries: InFlight = orjson.loads(text)
    for request_id, entry in entries.items():
        if len(entry) == 4:  # written before the compact layout: [estimate, minute, admitted at, released]
            entries[request_id] = [entry[0], entry[2], 1] if entry[3] == 1 else [entry[0], entry[2]]
    return entries


def encode(entries: InFlight) -> dict[str, str]:
    """The properties that store a map: ``inflight`` and as many more pieces as it needs."""
    text = orjson.dumps(entries).decode()
    pieces = max(1, -(-len(text) // PIECE_CHARS))
    return {NAMES[n]: text[n * PIECE_CHARS : (n + 1) * PIECE_CHARS] for n in range(pieces)}


def stored(entity: dict[str, Any]) -> dict[str, Any]:
    """An entity as it is written: its map (decoded in memory) as pieces."""
    wire = {name: value for name, value in entity.items() if name != "inflight"}
    wire.update(encode(decode(entity)))
    return wire


def read(entity: dict[str, Any]) -> dict[str, Any]:
    """An entity as it was read, with its pieces decoded into one map under ``inflight``."""
    entries = decode(entity)
    kept = {name: value for name, value in entity.items() if name not in NAMES}
    kept["inflight"] = entries
    return kept


def released(entry: list[int]) -> bool:
    return len(entry) > 2 and entry[2] == 1


def admitted_at(entry: list[int]) -> int:
    return entry[1]


def booked(entries: InFlight) -> int:
    """The estimates of the requests in flight that still hold their slot."""
    return sum(entry[0] for entry in entries.values() if not released(entry))


def full(entries: InFlight, adding: int = 1) -> CapExceeded | None:
    """The refusal when an entity cannot store ``adding`` more requests in flight."""
    if len(entries) + adding <= MAX_ENTRIES:
        return None
    return CapExceeded(
        f"{MAX_ENTRIES} requests are in flight already on this attendee or event budget; retry in a moment.",
        code="rate_limited",
        retry_after=1,
    )
