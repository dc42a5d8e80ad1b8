"""An attendee's day: the entity behind the caps per attendee and day (the event's local day), and its arithmetic.

One entity per (event, attendee, day) in the ``proxyusage`` table, the day being the event's
local date (its ``time_zone``; UTC when it has none), so daily caps reset at its midnight;
``PartitionKey=<event id>``, ``RowKey="<YYYY-MM-DD>|<user>"``, holds:

- ``reserved``: requests admitted against the daily request cap. A request is
  admitted by a conditional write (``If-Match`` on the entity's ETag, or an
  insert for the first request of the day) that raises ``reserved`` by one
  while it is below the cap. Two instances can never both win the same ETag,
  so with a cap of N exactly N writes succeed, however many instances race.
  A request that fails (upstream error, timeout, broken stream) gives its
  slot back when its usage is settled; one whose client left after upstream
  had it keeps it (``proxy.ledger.ending``).
- ``requests``, ``failed``, ``prompt_tokens``, ``completion_tokens``,
  ``total_tokens``, ``models`` and ``backends`` (JSON, the same figures per
  model and per upstream backend): the day's recorded usage, which is also
  what the usage reports read.
- ``inflight``: the requests admitted and not yet settled, as ``{request id:
  [estimate, admitted at (epoch seconds)]}`` (``[..., 1]`` once released),
  written by the same conditional writes; stored as JSON cut into pieces
  (``inflight``, ``inflight1``...), so that thousands fit
  (``proxy.admission.inflight``). An admission's write that is sent again
  (its connection dropped after it landed) fails on the ETag, and the fresh
  read finds the request's entry: it is admitted, once. Settling removes a
  request's entry, which makes settlement idempotent (a retried write whose
  first attempt did land finds the entry gone and adds nothing twice). An
  entry older than the reservation lease belongs to a worker that was killed
  before it could settle: ``proxy.ledger.reconcile`` gives its slot back and
  marks it released (a request that outlived its lease after all takes its
  slot again when it settles), and forgets it one lease later.
- ``tpm_minute`` and ``tpm_tokens``: a fixed one-minute window for the tokens
  per minute limit. Before the call the request books an estimate (body size
  / 4 for the prompt, plus the max tokens it may produce); settling replaces
  the estimate by the tokens upstream reported. Because the window lives in
  the same entity and is written under the same ETag, it is exact across
  instances too; the only slack is that an estimate can be above or below the
  real figure until the request settles.
- The daily token cap counts ``total_tokens`` plus the estimates of the
  ``inflight`` entries not released (``booked_tokens``), and admits a request
  while that sum is below the cap. Settlement happens before an answer's end
  reaches its client, so the next request sees the answer's tokens. The day's
  total therefore passes the cap by at most the tokens of the last request
  admitted, as long as estimates are not below upstream's figures (docs/organizers.md,
  *Budgets: how exact*).
- The event's budgets live in shards of their own (``proxy.admission.budget``), admitted
  by ``admit_budget`` concurrently with the attendee's day (``admit_all``).

Everything here is pure: what a day entity becomes when a request is
admitted (``admitted``), settled (``settled``) or given back by the
reconciler (``released``), what the caps allow (``refusal``,
``remaining``, ``booked_tokens``, ``booked_cost``), and the records a
request leaves (``Admission``, ``Settlement``, ``Finished``). The reads and
conditional writes are ``proxy.admission.counters``'s; admitting is
``proxy.admission.limits``'s, settling ``proxy.admission.settling``'s.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import orjson

from proxy.admission import inflight as flights
from proxy.errors import CapExceeded
from proxy.policy.events import Event

_COUNTERS = ("reserved", "requests", "failed", "prompt_tokens", "completion_tokens", "total_tokens")
CLIENT_GONE = 499  # the client left after upstream had the request (nginx's "client closed request")


def keeps_slot(status: int) -> bool:
    """Whether a request that reached upstream keeps its slot: an answer delivered, or one its client left
    (``proxy.ledger.ending``); upstream's own failures and answers storage refused give it back."""
    return 200 <= status < 300 or status == CLIENT_GONE


def day_of(moment: datetime, zone: str = "UTC") -> str:
    """The date of ``moment`` in the time zone ``zone``: an event's days are its local days."""
    return moment.astimezone(_zone(zone)).date().isoformat()


def next_midnight(moment: datetime, zone: str = "UTC") -> datetime:
    """The next midnight after ``moment`` in ``zone``, when an event's daily caps reset."""
    local = _zone(zone)
    return datetime.combine(moment.astimezone(local).date() + timedelta(days=1), time(0), tzinfo=local)


def seconds_to_midnight(moment: datetime, zone: str = "UTC") -> int:
    return max(1, int((next_midnight(moment, zone) - moment).total_seconds() + 0.999))


@functools.lru_cache(maxsize=512)
def _zone(name: str) -> ZoneInfo:
    return ZoneInfo(name)


def has_caps(event: Event) -> bool:
    caps = (event.daily_requests, event.daily_tokens, event.tpm, event.daily_cost)
    return any(cap is not None for cap in caps)


@dataclass(slots=True)
class Admission:
    """What a request was admitted with: shown in headers and settled later."""

    request_id: str
    day: str
    minute: int
    estimate: int
    remaining_requests: int | None
    remaining_tokens: int | None
    reserved: bool
    shard: str | None = None  # the event budget's shard it was admitted on (proxy.admission.budget)
    # Its day is known not to be stored: its name was registered by this very request in an event without caps
    # (``Ledger.admit``), so settling inserts the day without reading it first.
    new_day: bool = False


@dataclass(slots=True)
class Finished:
    """A finished request as the ledger stores it: its day's figures and its log entry."""

    user: str
    admission: Admission
    settlement: Settlement
    log: dict[str, Any] | None
    stored: bool = False
    refused: bool = False  # Table Storage refused its transaction as invalid (``Ledger._refused``)


@dataclass(slots=True)
class Settlement:
    """What one finished request adds to the attendee's day."""

    model: str
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    reached_upstream: bool
    succeeded: bool
    backend: str = ""  # the upstream backend that answered (proxy.config.backends)
    cached_tokens: int = 0
    cost_nanos: int = 0  # USD x 1e9 (proxy.config.prices)
    unpriced: bool = False  # reached upstream, and no price was known for its model


def day_row(item: Finished) -> str:
    """The row key of the day a finished request is settled on."""
    return f"{item.admission.day}|{item.user}"


def refusal(
    event: Event, entity: dict[str, Any], now: datetime, minute: int, estimate: int, rate: float = 0.0
) -> CapExceeded | None:
    """Why the caps refuse a request of ``estimate`` tokens on this day entity, or None when they admit it."""
    if event.daily_requests is not None and entity.get("reserved", 0) >= event.daily_requests:
        return CapExceeded(
            f"You have used all {event.daily_requests} requests allowed per attendee today in "
            f"'{event.name}'. The cap resets at midnight in the event's time zone, {_reset(event, now)}.",
            code="daily_request_cap_exceeded",
            retry_after=seconds_to_midnight(now, event.time_zone),
        )
    if event.daily_tokens is not None and booked_tokens(entity) >= event.daily_tokens:
        return CapExceeded(
            f"You have used your {event.daily_tokens} tokens for today in '{event.name}'. "
            f"The budget resets at midnight in the event's time zone, {_reset(event, now)}.",
            code="daily_token_cap_exceeded",
            retry_after=seconds_to_midnight(now, event.time_zone),
        )
    if event.daily_cost is not None and booked_cost(entity, rate) >= round(event.daily_cost * 1_000_000_000):
        used = booked_cost(entity, rate) / 1_000_000_000
        return CapExceeded(
            f"You have used your ${event.daily_cost:,.2f} for today in '{event.name}' (${used:,.4f}, counting "
            f"requests still running at their highest price). The cap resets at midnight in the event's time "
            f"zone, {_reset(event, now)}.",
            code="daily_cost_cap_exceeded",
            retry_after=seconds_to_midnight(now, event.time_zone),
        )
    if event.tpm is not None and entity.get("tpm_minute") == minute:
        booked = entity.get("tpm_tokens", 0)
        if booked > 0 and booked + estimate > event.tpm:
            wait = 60 - int(now.timestamp()) % 60
            return CapExceeded(
                f"Rate limit: {event.tpm} tokens per minute per attendee in '{event.name}'; this request "
                f"may use about {estimate} more (prompt estimate plus max_tokens). Retry in {wait} s, "
                "or ask for fewer max_tokens.",
                code="rate_limited",
                retry_after=wait,
            )
    return None


def remaining(event: Event, entity: dict[str, Any]) -> tuple[int | None, int | None]:
    """Requests and tokens left today under the event's caps (None: no cap)."""
    requests = None if event.daily_requests is None else event.daily_requests - entity["reserved"]
    tokens = None if event.daily_tokens is None else max(0, event.daily_tokens - booked_tokens(entity))
    return requests, tokens


def booked_cost(entity: dict[str, Any], rate: float) -> int:
    """The day's cost as the daily cost cap counts it (nano-dollars): recorded (per model, ``models``), plus the
    requests in flight at ``rate``, the dearest price per token of the event's models."""
    models = entity.get("models") or "{}"
    rows: dict[str, list[int]] = orjson.loads(models) if isinstance(models, str) else models
    recorded = sum(row[5] for row in rows.values() if len(row) > 5)
    return round(recorded + flights.booked(flights.decode(entity)) * rate)


def booked_tokens(entity: dict[str, Any]) -> int:
    """The day's tokens as the daily token cap counts them: recorded, plus the estimates in flight."""
    return int(entity.get("total_tokens", 0)) + flights.booked(flights.decode(entity))


def _reset(event: Event, now: datetime) -> str:
    """When the daily caps reset, as a person reads it: the event's midnight, and that moment in UTC."""
    midnight = next_midnight(now, event.time_zone)
    in_utc = midnight.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return f"{event.local(midnight)}" + ("" if event.time_zone == "UTC" else f" ({in_utc})")


def _base(entity: dict[str, Any], user: str, day: str) -> dict[str, Any]:
    updated = {"PartitionKey": entity["PartitionKey"], "RowKey": entity["RowKey"], "user": user, "day": day}
    for name in _COUNTERS:
        updated[name] = int(entity.get(name, 0))
    updated["models"] = entity.get("models", "{}")
    updated["backends"] = entity.get("backends", "{}")
    updated["tpm_minute"] = int(entity.get("tpm_minute", 0))
    updated["tpm_tokens"] = int(entity.get("tpm_tokens", 0))
    updated["inflight"] = flights.decode(entity)  # shared: copied by whoever changes it
    return updated


def admitted(
    entity: dict[str, Any], user: str, day: str, minute: int, estimate: int, request_id: str, now: datetime
) -> dict[str, Any]:
    """The day with one more request admitted: its slot taken, its entry in flight, its estimate in the TPM window."""
    updated = _base(entity, user, day)
    updated["reserved"] += 1
    inflight = dict(updated["inflight"])
    inflight[request_id] = [estimate, int(now.timestamp())]
    updated["inflight"] = inflight
    if updated["tpm_minute"] != minute:
        updated["tpm_minute"], updated["tpm_tokens"] = minute, 0
    updated["tpm_tokens"] += estimate
    return updated


def released(
    entity: dict[str, Any], inflight: dict[str, list[int]], stale: list[str], forgotten: list[str]
) -> dict[str, Any]:
    """The day with the ``stale`` requests' slots given back (their entries marked released) and the
    ``forgotten`` entries dropped (``proxy.ledger.reconcile``)."""
    updated = _base(entity, str(entity.get("user", "")), str(entity.get("day", "")))
    inflight = dict(inflight)
    for request_id in stale:
        estimate, admitted_at = inflight[request_id][:2]
        inflight[request_id] = [estimate, admitted_at, 1]
        updated["reserved"] = max(0, updated["reserved"] - 1)
        if updated["tpm_minute"] == admitted_at // 60:
            updated["tpm_tokens"] = max(0, updated["tpm_tokens"] - estimate)
    for request_id in forgotten:
        del inflight[request_id]
    updated["inflight"] = inflight
    return updated


def settled(entity: dict[str, Any], user: str, admission: Admission, settlement: Settlement) -> dict[str, Any]:
    """The day with a finished request settled: its entry in flight removed, its slot kept or given back, its
    tokens and cost added (``entity`` itself when there is nothing to change, as for a retried write)."""
    if not admission.reserved and not settlement.reached_upstream:
        return entity  # nothing taken and nothing used: a request refused by the event's budget, say
    updated = _base(entity, user, admission.day)
    if admission.reserved:
        inflight = dict(updated["inflight"])
        entry = inflight.pop(admission.request_id, None)
        if entry is None:
            return entity  # settled already: a retried write whose first attempt had landed
        updated["inflight"] = inflight
        released = flights.released(entry)
        if settlement.succeeded and released:
            updated["reserved"] += 1  # it outlived its lease after all: it takes its slot again
        elif not settlement.succeeded and not released:
            updated["reserved"] = max(0, updated["reserved"] - 1)
        if updated["tpm_minute"] == admission.minute:
            booked = 0 if released else admission.estimate
            updated["tpm_tokens"] = max(0, updated["tpm_tokens"] - booked + settlement.total_tokens)
    if not settlement.reached_upstream:
        return updated
    updated["requests"] += 1
    updated["failed"] += 0 if settlement.succeeded else 1
    figures = (settlement.prompt_tokens, settlement.completion_tokens, settlement.total_tokens)
    updated["prompt_tokens"] += figures[0]
    updated["completion_tokens"] += figures[1]
    updated["total_tokens"] += figures[2]
    # Per model and per backend: requests, prompt, completion, total, cached tokens, cost (nano-USD), unpriced.
    row_figures = (1, *figures, settlement.cached_tokens, settlement.cost_nanos, int(settlement.unpriced))
    for name, key in (("models", settlement.model), ("backends", settlement.backend)):
        grouped: dict[str, list[int]] = orjson.loads(updated[name])
        row = grouped.setdefault(key, [])
        row.extend([0] * (len(row_figures) - len(row)))  # rows stored before cost was tracked had 4
        for index, value in enumerate(row_figures):
            row[index] += value
        updated[name] = orjson.dumps(grouped).decode()
    return updated
