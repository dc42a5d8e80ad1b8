"""Days are the event's local days: daily caps reset at its midnight, reports use its dates.

The ledger runs against Azurite with a clock the test sets: one UTC instant is
a different date on each side of the date line (Pacific/Pago_Pago is UTC-11,
Pacific/Kiritimati UTC+14).
"""

from __future__ import annotations

import secrets
from datetime import UTC, datetime

import pytest

from proxy.admission.limits import Ledger
from proxy.config.prices import PriceTable
from proxy.errors import CapExceeded
from proxy.ledger.reports import report
from proxy.ledger.usage import UsageRecord
from proxy.policy.events import Event
from proxy.storage.tables import Tables

INSTANT = datetime(2026, 12, 3, 10, 30, tzinfo=UTC)  # 2026-12-02 23:30 in Pago Pago, 2026-12-04 00:30 in Kiritimati


def event(zone: str, **caps: object) -> Event:
    return Event(
        id=f"days-{secrets.token_hex(4)}",
        name=f"Event in {zone}",
        code_hash="x",
        starts_at=datetime(2026, 12, 1, tzinfo=UTC),
        ends_at=datetime(2026, 12, 10, tzinfo=UTC),
        time_zone=zone,
        **caps,  # type: ignore[arg-type]
    )


async def one_request(ledger: Ledger, held: Event, user: str, now: datetime) -> None:
    request_id = secrets.token_hex(8)
    admission = await ledger.admit_all(held, user, now, 20, request_id)
    record = UsageRecord(event_id=held.id, user=user, model="gpt-4o-mini", kind="chat", stream=False,
                         admission=admission, request_id=request_id, started_at=now, status=200,
                         reached_upstream=True)  # fmt: skip
    record.take_usage({"prompt_tokens": 10, "completion_tokens": 5}, "gpt-4o-mini-2024-07-18")
    await ledger.settle(held.id, [record.finished(PriceTable.load())])


@pytest.mark.parametrize(
    ("zone", "local_date"), [("Pacific/Pago_Pago", "2026-12-02"), ("Pacific/Kiritimati", "2026-12-04")]
)
async def test_by_day_keys_are_the_events_local_dates(tables: Tables, zone: str, local_date: str) -> None:
    held = event(zone)
    await one_request(Ledger(tables), held, "ana", INSTANT)
    by_day = await report(tables, held.id, "day")
    assert [row["key"] for row in by_day["rows"]] == [local_date]  # UTC says 2026-12-03
    assert by_day["rows"][0]["requests"] == 1


async def test_a_daily_cap_resets_at_local_midnight(tables: Tables) -> None:
    held = event("Pacific/Pago_Pago", daily_requests=2)
    ledger = Ledger(tables)
    late = datetime.fromisoformat("2026-12-02T23:50:00-11:00")  # 2026-12-03 10:50 UTC
    for _ in range(2):
        await one_request(ledger, held, "ben", late)
    with pytest.raises(CapExceeded) as refused:
        await ledger.admit_all(held, "ben", late, 20, "over")
    assert refused.value.code == "daily_request_cap_exceeded"
    # The message names the local reset time (and its UTC equivalent); Retry-After counts to it.
    assert "2026-12-03 00:00 Pacific/Pago_Pago (2026-12-03 11:00 UTC)" in refused.value.message
    assert refused.value.headers["retry-after"] == "600"
    # Midnight in Pago Pago is 11:00 UTC: the same UTC date, a new local day.
    after_midnight = datetime.fromisoformat("2026-12-03T00:01:00-11:00")
    await one_request(ledger, held, "ben", after_midnight)
    assert [row["key"] for row in (await report(tables, held.id, "day"))["rows"]] == ["2026-12-02", "2026-12-03"]


async def test_utc_midnight_is_not_a_new_day_in_kiritimati(tables: Tables) -> None:
    held = event("Pacific/Kiritimati", daily_requests=1)
    ledger = Ledger(tables)
    before = datetime(2026, 12, 3, 23, 30, tzinfo=UTC)  # 2026-12-04 13:30 in Kiritimati
    await one_request(ledger, held, "cy", before)
    with pytest.raises(CapExceeded):
        await ledger.admit_all(held, "cy", datetime(2026, 12, 4, 0, 30, tzinfo=UTC), 20, "still-the-same-day")
    await one_request(ledger, held, "cy", datetime(2026, 12, 4, 10, 0, tzinfo=UTC))  # 00:00 on 12-05 there
