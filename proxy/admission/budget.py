"""Event-wide budgets (``event_requests``, ``event_tokens``, ``event_cost``): the shards that hold them.

``event_cost`` is a third dimension like the tokens: each shard records the cost
of what it settled (``cost``, nano-dollars) and counts each request in flight at
its token estimate times the dearest price per token of the event's models
(``rate``), so the budget is never passed; spare cost moves as tokens do
(``delta_cost``).

An event's budget is split over ``SHARDS`` entities in its ``proxyusage``
partition, ``RowKey="shard|<n>"``, so that no single entity is written by every
request of every attendee. Shard ``n`` may admit up to its *limit*: an even
share of the budget (``base``) plus ``delta_requests`` / ``delta_tokens``,
the spare it received from other shards minus what it gave away. Spare moves
only in entity group transactions that lower one shard's delta by what they
raise another's, conditional on every ETag, so the limits always add up to the
budget, whatever the organizer sets it to later and however many instances
race.

Each worker admits on one *home* shard, picked at random when it starts (with
two instances, seven times in eight their homes differ and they never
conflict). A shard holds:

- ``requests``: requests admitted against ``event_requests`` (a failed request
  gives its slot back, as for the daily cap);
- ``tokens``: tokens recorded, and ``inflight`` (``proxy.admission.inflight``): the
  estimates of the requests admitted and not settled;
- ``delta_requests``, ``delta_tokens``.

A request fits its home shard when one more request stays within the shard's
request limit, and its estimate (prompt bytes / 4 + max_tokens) plus the
shard's recorded and in-flight tokens stays within its token limit. When it
does not, the worker reads every shard of the event (one range query) and
moves spare into its home in one transaction (planned with its own
settlements that its home does not hold yet), then tries again; a request is
refused (429 ``event_budget_exhausted``) only when all the shards together
lack the room. So ``event_requests`` is exact, and ``event_tokens`` is never
passed as long as estimates are not below what upstream then reports (the
completion is bounded by max_tokens; the prompt estimate counts a UTF-8 byte
as a quarter token, above the real figure for text, but an image counts
nearly nothing); its last tokens, fewer than one request may use, are refused
with a message that says how many remain.

Cost: one conditional write per group of requests on the home shard, beside
the attendee's (they run concurrently). A request is settled on its shard
after its log entry and attendee's day are stored, carried by the next
admission write there (or a write of its own 50 ms later when none comes):
meanwhile the shard holds its estimate, which only errs on the safe side, and
if its worker dies first the reconciler settles it from its log entry. Spare
moves once per quarter of the remaining budget at most, more often only near
its end.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from azure.core.exceptions import ResourceNotFoundError

from proxy.admission import inflight as flights
from proxy.errors import CapExceeded
from proxy.policy.events import Event
from proxy.storage.tables import Tables, gathered

SHARDS = 8
SHARD_PREFIX = "shard|"
SHARD_END = "shard}"  # just above every "shard|..." row key
BUDGET_RETRY_SECONDS = 60


def shard_row(index: int) -> str:
    return f"{SHARD_PREFIX}{index}"


def shard_index(row_key: str) -> int:
    return int(row_key.removeprefix(SHARD_PREFIX))


def has_budget(event: Event) -> bool:
    return event.event_requests is not None or event.event_tokens is not None or event.event_cost is not None


def cost_nanos(usd: float | None) -> int | None:
    """A cost cap in USD as whole nano-dollars (proxy.config.prices)."""
    return None if usd is None else round(usd * 1_000_000_000)


def base_share(total: int, index: int) -> int:
    """Shard ``index``'s even share of ``total``."""
    return total // SHARDS + (1 if index < total % SHARDS else 0)


@dataclass(slots=True)
class Room:
    """What a shard may still admit (None: that budget is not set)."""

    requests: int | None
    tokens: int | None
    cost: int | None = None  # nano-dollars


def empty_shard(event_id: str, index: int) -> dict[str, Any]:
    return {
        "PartitionKey": event_id,
        "RowKey": shard_row(index),
        "requests": 0,
        "tokens": 0,
        "delta_requests": 0,
        "delta_tokens": 0,
        # Nano-dollars, stored as doubles (exact to 2**53, 9 million dollars): an int past 2**31 would need
        # an Int64 annotation in Table Storage's JSON.
        "cost": 0.0,
        "delta_cost": 0.0,
        "inflight": {},
    }


def normalised(entity: dict[str, Any]) -> dict[str, Any]:
    """A shard entity with only its own properties (no metadata), every one present."""
    index = shard_index(str(entity["RowKey"]))
    shard = empty_shard(str(entity["PartitionKey"]), index)
    for name in ("requests", "tokens", "delta_requests", "delta_tokens"):
        shard[name] = int(entity.get(name, 0))
    for name in ("cost", "delta_cost"):
        shard[name] = float(round(float(entity.get(name, 0) or 0)))
    shard["inflight"] = flights.decode(entity)  # shared: copied by whoever changes it
    return shard


def booked(shard: dict[str, Any]) -> int:
    """Recorded tokens plus the estimates of requests in flight."""
    return int(shard.get("tokens", 0)) + flights.booked(flights.decode(shard))


def booked_cost(shard: dict[str, Any], rate: float) -> int:
    """Recorded cost plus the requests in flight at ``rate`` (the dearest price per token of the event's models)."""
    return round(float(shard.get("cost", 0) or 0) + flights.booked(flights.decode(shard)) * rate)


def room(event: Event, shard: dict[str, Any], rate: float = 0.0) -> Room:
    index = shard_index(str(shard["RowKey"]))
    requests = tokens = cost = None
    if event.event_requests is not None:
        limit = base_share(event.event_requests, index) + int(shard.get("delta_requests", 0))
        requests = limit - int(shard.get("requests", 0))
    if event.event_tokens is not None:
        limit = base_share(event.event_tokens, index) + int(shard.get("delta_tokens", 0))
        tokens = limit - booked(shard)
    budget_nanos = cost_nanos(event.event_cost)
    if budget_nanos is not None:
        limit = base_share(budget_nanos, index) + round(float(shard.get("delta_cost", 0) or 0))
        cost = limit - booked_cost(shard, rate)
    return Room(requests, tokens, cost)


def fits(event: Event, shard: dict[str, Any], estimate: int, rate: float = 0.0) -> bool:
    """Whether one more request fits: a slot, its estimate in tokens, and that estimate at ``rate`` in cost (so,
    like ``event_tokens``, ``event_cost`` is never passed while estimates are not below what requests use)."""
    space = room(event, shard, rate)
    return (
        (space.requests is None or space.requests >= 1)
        and (space.tokens is None or space.tokens >= estimate)
        and (space.cost is None or space.cost >= math.ceil(estimate * rate))
    )


def admitted(shard: dict[str, Any], request_id: str, estimate: int, now_epoch: int) -> dict[str, Any]:
    updated = normalised(shard)
    updated["requests"] += 1
    inflight = dict(updated["inflight"])
    inflight[request_id] = [estimate, now_epoch]
    updated["inflight"] = inflight
    return updated


def settled(
    shard: dict[str, Any], request_id: str, total_tokens: int, reached: bool, succeeded: bool, cost: int = 0
) -> dict[str, Any]:
    """The shard once a request ends: its estimate replaced by its tokens, its slot kept or given back."""
    updated = normalised(shard)
    inflight = dict(updated["inflight"])
    entry = inflight.pop(request_id, None)
    if entry is None:
        return shard  # settled already
    updated["inflight"] = inflight
    was_released = _released(entry)
    if succeeded and was_released:
        updated["requests"] += 1  # it outlived its lease after all
    elif not succeeded and not was_released:
        updated["requests"] = max(0, updated["requests"] - 1)
    if reached:
        updated["tokens"] += total_tokens
        updated["cost"] = float(round(updated["cost"]) + cost)
    return updated


def released(shard: dict[str, Any], stale: list[str], forgotten: list[str]) -> dict[str, Any]:
    """The shard with the slots of dead workers' requests given back (see ``proxy.ledger.reconcile``)."""
    updated = normalised(shard)
    inflight = dict(updated["inflight"])
    for request_id in stale:
        inflight[request_id] = [*inflight[request_id][:2], 1]
        updated["requests"] = max(0, updated["requests"] - 1)
    for request_id in forgotten:
        del inflight[request_id]
    updated["inflight"] = inflight
    return updated


def moves(
    event: Event,
    shards: dict[int, dict[str, Any]],
    home: int,
    want: tuple[int, ...],
    least: tuple[int, ...],
    rate: float = 0.0,
) -> dict[int, tuple[int, int, int]] | None:
    """How much spare to move into ``home`` (per shard: requests and tokens it gives; home's are negative).

    ``shards`` holds every shard's current entity; ``want`` is what the waiting
    requests need (requests, tokens), ``least`` what admitting one more than
    those home has room for needs. None when all the shards together lack even
    ``least``; an empty dict when home has what is wanted already.
    """
    spaces = {index: room(event, shards[index], rate) for index in range(SHARDS)}
    want, least = (*want, *(0,) * (3 - len(want))), (*least, *(0,) * (3 - len(least)))
    amounts: list[int] = []
    for dimension in (0, 1, 2):
        have = _get(spaces[home], dimension)
        if have is None:
            amounts.append(0)
            continue
        others = sum(max(0, _get(spaces[i], dimension) or 0) for i in range(SHARDS) if i != home)
        if have + others < least[dimension]:
            return None
        lack = max(0, want[dimension] - have)
        # Besides what is lacking, a quarter of the others' spare, so that moves stay rare.
        amounts.append(min(others, lack + others // 4) if lack else 0)
    if not any(amounts):
        return {}
    given: dict[int, list[int]] = {}
    for dimension, amount in enumerate(amounts):
        # Idle shards first (nothing in flight: no worker's home), whose writes race with nobody's admissions.
        donors = sorted(
            (i for i in range(SHARDS) if i != home),
            key=lambda i: (bool(shards[i].get("inflight")), -(_get(spaces[i], dimension) or 0)),
        )
        for index in donors:
            take = min(amount, max(0, _get(spaces[index], dimension) or 0))
            if take > 0:
                given.setdefault(index, [0, 0, 0])[dimension] += take
                given.setdefault(home, [0, 0, 0])[dimension] -= take
                amount -= take
    return {index: (gives[0], gives[1], gives[2]) for index, gives in given.items()}


def moved(shard: dict[str, Any], gives: tuple[int, ...]) -> dict[str, Any]:
    updated = normalised(shard)
    updated["delta_requests"] -= gives[0]
    updated["delta_tokens"] -= gives[1]
    if len(gives) > 2:
        updated["delta_cost"] = float(round(updated["delta_cost"]) - gives[2])
    return updated


def totals(event: Event, shards: list[dict[str, Any]], rate: float = 0.0) -> dict[str, Any]:
    """The event's budgets and what is used of them (``requests``: admitted; ``tokens``: recorded + in flight;
    ``cost``: USD recorded, plus the requests in flight at ``rate``)."""
    used_requests = sum(int(s.get("requests", 0)) for s in shards)
    used_tokens = sum(booked(s) for s in shards)
    used_cost = sum(booked_cost(s, rate) for s in shards)
    budget_nanos = cost_nanos(event.event_cost)
    exhausted = (
        (event.event_requests is not None and used_requests >= event.event_requests)
        or (event.event_tokens is not None and used_tokens >= event.event_tokens)
        or (budget_nanos is not None and used_cost >= budget_nanos)
    )
    figures: dict[str, Any] = {
        "requests": {"limit": event.event_requests, "used": used_requests},
        "tokens": {"limit": event.event_tokens, "used": used_tokens},
        "exhausted": exhausted,
    }
    if event.event_cost is not None:
        figures["cost"] = {"limit": event.event_cost, "used": round(used_cost / 1_000_000_000, 9)}
    return figures


async def read_shards(tables: Tables, event_id: str) -> dict[int, dict[str, Any]]:
    """Every shard of an event's budget (absent ones as empty), each with its ETag under ``etag``."""
    query = tables.usage.query_entities(
        "PartitionKey eq @pk and RowKey ge @first and RowKey lt @after",
        parameters={"pk": event_id, "first": SHARD_PREFIX, "after": SHARD_END},
    )
    try:
        found = await gathered(query)
    except ResourceNotFoundError:
        found = []
    shards = {index: {**empty_shard(event_id, index), "etag": ""} for index in range(SHARDS)}
    for entity in found:
        shard = normalised(dict(entity))
        shards[shard_index(shard["RowKey"])] = {**shard, "etag": entity.metadata["etag"]}
    return shards


def exhausted(event: Event, shards: dict[int, dict[str, Any]], estimate: int, rate: float = 0.0) -> CapExceeded:
    """The refusal when all the shards together lack the room for a request."""
    figures = totals(event, list(shards.values()), rate)
    contact = "Ask the organizer of the event if it should be raised."
    if event.event_cost is not None:
        left = event.event_cost - figures["cost"]["used"]
        request_cost = math.ceil(estimate * rate) / 1_000_000_000
        requests_left = event.event_requests is None or figures["requests"]["used"] < event.event_requests
        tokens_left = event.event_tokens is None or event.event_tokens - figures["tokens"]["used"] >= estimate
        if left < request_cost or (requests_left and tokens_left):
            message = (f"The event '{event.name}' has used up its budget of ${event.event_cost:,.2f}: "
                       f"${max(0.0, left):,.6f} remain, less than this request may cost (about ${request_cost:,.6f}"
                       f" at the dearest price of the event's models). {contact}")  # fmt: skip
            return CapExceeded(message, code="event_budget_exhausted", retry_after=BUDGET_RETRY_SECONDS)
    requests_used_up = figures["requests"]["used"] >= (event.event_requests or 0)
    if event.event_requests is not None and (requests_used_up or event.event_tokens is None):
        message = f"The event '{event.name}' has used up its budget of {event.event_requests} requests. {contact}"
    else:
        left = max(0, (event.event_tokens or 0) - figures["tokens"]["used"])
        message = f"The event '{event.name}' has used up its budget of {event.event_tokens} tokens. {contact}"
        if left > 0:
            message = (
                f"Only about {left} tokens remain of the event '{event.name}''s budget of {event.event_tokens}, "
                f"fewer than this request may use (about {estimate}: its prompt estimate plus max_tokens). "
                f"Ask for fewer max_tokens, or ask the organizer to raise the budget."
            )
    return CapExceeded(message, code="event_budget_exhausted", retry_after=BUDGET_RETRY_SECONDS)


def _get(space: Room, dimension: int) -> int | None:
    return (space.requests, space.tokens, space.cost)[dimension]


def _released(entry: list[int]) -> bool:
    return flights.released(entry)
