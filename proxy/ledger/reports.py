"""The reports organizers read: an event's usage by user, model, day, backend or hour, its request log, and CSV.

``report`` reads the per-attendee day entities only (one partition range
query per event, ``RowKey`` below ``log|``), never the request log, so it
stays fast for large events. ``hourly_report`` and ``request_log`` read the
request log (``RowKey`` from ``log|``), the first only its last
``HOURLY_WINDOW``; a log row holds one request's entry or several's
(``proxy.admission.requestlog.entries`` reads both alike). Both kinds of
rows are written by ``proxy.ledger.usage``.
"""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime, timedelta
from typing import Any, Literal
from zoneinfo import ZoneInfo

import orjson
from azure.core.exceptions import ResourceNotFoundError

from proxy.admission.requestlog import PREFIX as LOG_PREFIX
from proxy.admission.requestlog import entries
from proxy.config.prices import NANOS_PER_USD, usd
from proxy.storage.tables import Tables, gathered

LOG_FIELDS = (
    "request_id",
    "time",
    "user",
    "model",
    "kind",
    "stream",
    "status",
    "latency_ms",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "estimated",
    "backend",
    "cached_tokens",
    "priced_as",
    "cost",
)

GroupBy = Literal["user", "model", "day", "backend", "hour"]
GROUPINGS: tuple[GroupBy, ...] = ("user", "model", "day", "backend", "hour")
HOURLY_WINDOW = timedelta(hours=48)  # what ``by=hour`` covers, read from the request log
FIGURES = ("requests", "prompt_tokens", "completion_tokens", "total_tokens")
# What a report row holds, in order (DESIGN, Organizers); cost in USD.
COLUMNS = (*FIGURES, "cached_tokens", "cost", "unpriced_requests")
# The layout of a day's per-model and per-backend rows (proxy.admission.days): cost in nano-dollars.
_ROW = (*FIGURES, "cached_tokens", "cost_nanos", "unpriced_requests")


async def report(tables: Tables, event_id: str, by: GroupBy) -> dict[str, Any]:
    """``{"event_id", "totals", "rows"}`` grouped by user, model, day or backend (DESIGN).

    Each row and the totals: ``requests``, ``prompt_tokens``, ``completion_tokens``,
    ``total_tokens``, ``cached_tokens`` (of the prompt tokens), ``cost`` (USD, from
    ``proxy.config.prices``) and ``unpriced_requests`` (requests whose model had no known
    price: their cost is missing from ``cost``). Days recorded before backends were
    tracked count under the backend ``""``; before costs were, with cost 0.
    """
    rows: dict[str, list[int]] = {}
    totals = [0] * len(_ROW)
    entities = tables.usage.query_entities(
        "PartitionKey eq @pk and RowKey lt @log", parameters={"pk": event_id, "log": LOG_PREFIX}
    )
    try:
        found = await gathered(entities)
    except ResourceNotFoundError:
        found = []
    for entity in found:
        models = _grouped(entity.get("models"))
        day = [int(entity.get(name, 0)) for name in FIGURES] + _sum(models.values())[len(FIGURES) :]
        if by in ("model", "backend"):
            grouped = models if by == "model" else _grouped(entity.get("backends"))
            for key, figures in grouped.items():
                _add(rows.setdefault(key, [0] * len(_ROW)), figures)
            rest = [a - b for a, b in zip(day, _sum(grouped.values()), strict=True)]
            if by == "backend" and any(rest):
                _add(rows.setdefault("", [0] * len(_ROW)), rest)
        else:
            _add(rows.setdefault(entity["user"] if by == "user" else entity["day"], [0] * len(_ROW)), day)
        _add(totals, day)
    return {
        "event_id": event_id,
        "by": by,
        "totals": _figures(totals),
        "rows": [{"key": key, **_figures(figures)} for key, figures in sorted(rows.items())],
    }


def _grouped(raw: object) -> dict[str, list[int]]:
    """A day's ``models`` or ``backends`` map, each row padded to the full layout."""
    grouped: dict[str, list[int]] = orjson.loads(raw) if isinstance(raw, str) and raw else {}
    return {key: [int(v) for v in row] + [0] * (len(_ROW) - len(row)) for key, row in grouped.items()}


def _sum(rows: Any) -> list[int]:
    total = [0] * len(_ROW)
    for row in rows:
        _add(total, row)
    return total


def _add(target: list[int], figures: list[int]) -> None:
    for index, value in enumerate(figures):
        target[index] += int(value)


def _figures(counted: list[int]) -> dict[str, Any]:
    figures: dict[str, Any] = dict(zip(_ROW, counted, strict=True))
    figures["cost"] = usd(figures.pop("cost_nanos"))
    return {name: figures[name] for name in COLUMNS}


async def request_log(tables: Tables, event_id: str) -> list[dict[str, Any]]:
    """Every recorded request of an event, oldest day first."""
    entities = tables.usage.query_entities(
        "PartitionKey eq @pk and RowKey gt @first and RowKey lt @after",
        parameters={"pk": event_id, "first": LOG_PREFIX, "after": LOG_PREFIX[:-1] + chr(ord(LOG_PREFIX[-1]) + 1)},
    )
    try:
        rows = await gathered(entities)
    except ResourceNotFoundError:
        return []
    return [{name: entry.get(name, "") for name in LOG_FIELDS} for row in rows for entry in entries(row)]


async def hourly_report(tables: Tables, event_id: str, zone: str, now: datetime) -> dict[str, Any]:
    """The last ``HOURLY_WINDOW`` of an event by hour of its time zone (``"2026-11-21T09:00"``), from the
    request log; each hour also has ``models``: the same figures per model.

    The log is read from the day before the first UTC day the window touches (its row keys start with the day), so the
    query stays bounded however long the event.
    """
    since = now - HOURLY_WINDOW
    entities = tables.usage.query_entities(
        "PartitionKey eq @pk and RowKey ge @first and RowKey lt @after",
        # Log rows are keyed by the event's local day: from the UTC date before, to be safe west of UTC.
        parameters={"pk": event_id, "first": f"{LOG_PREFIX}{(since - timedelta(days=1)).date().isoformat()}",
                    "after": LOG_PREFIX[:-1] + chr(ord(LOG_PREFIX[-1]) + 1)},
    )  # fmt: skip
    try:
        found = [entry for row in await gathered(entities) for entry in entries(row)]
    except ResourceNotFoundError:
        found = []
    local = ZoneInfo(zone)
    # Every hour of the window, empty ones too, so that a chart's columns are a time axis.
    hours: dict[str, list[int]] = {}
    slot = since.astimezone(local).replace(minute=0, second=0, microsecond=0).astimezone(UTC)
    while slot <= now:
        hours.setdefault(slot.astimezone(local).strftime("%Y-%m-%dT%H:00"), [0] * len(_ROW))
        slot += timedelta(hours=1)
    models: dict[str, dict[str, list[int]]] = {}
    totals = [0] * len(_ROW)
    for entry in found:
        try:
            moment = datetime.fromisoformat(str(entry.get("time", "")))
        except ValueError:
            continue
        if not since <= moment <= now:
            continue
        hour = moment.astimezone(local).strftime("%Y-%m-%dT%H:00")
        figures = [1, *(int(entry.get(name, 0) or 0) for name in FIGURES[1:]), int(entry.get("cached_tokens", 0) or 0),
                   round(float(entry.get("cost", 0) or 0) * NANOS_PER_USD),
                   int("priced_as" in entry and not entry["priced_as"])]  # fmt: skip
        _add(hours.setdefault(hour, [0] * len(_ROW)), figures)
        _add(models.setdefault(hour, {}).setdefault(str(entry.get("model", "")), [0] * len(_ROW)), figures)
        _add(totals, figures)
    return {
        "event_id": event_id,
        "by": "hour",
        "time_zone": zone,
        "totals": _figures(totals),
        "rows": [
            {
                "key": key,
                **_figures(figures),
                "models": {m: _figures(f) for m, f in sorted(models.get(key, {}).items())},
            }
            for key, figures in sorted(hours.items())
        ],
    }


def report_csv(data: dict[str, Any]) -> str:
    """The report's rows as CSV with a header line, totals last.

    A key that a spreadsheet would read as a formula (attendee names may start
    with ``+ - @``) gets a leading apostrophe, as OWASP's CSV injection advice
    says: https://owasp.org/www-community/attacks/CSV_Injection.
    """
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([data["by"], *COLUMNS])
    for row in data["rows"]:
        writer.writerow([_inert(str(row["key"])), *_cells(row)])
    writer.writerow(["TOTAL", *_cells(data["totals"])])
    return out.getvalue()


def _cells(figures: dict[str, Any]) -> list[Any]:
    """A row's figures; the cost as a plain decimal (no exponent), to the nano-dollar."""
    return [f"{figures[f]:.9f}" if f == "cost" else figures[f] for f in COLUMNS]


def _inert(cell: str) -> str:
    return "'" + cell if cell.startswith(_FORMULA_STARTS) else cell


_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
