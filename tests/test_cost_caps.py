"""Cost caps (``daily_cost`` per attendee and day, ``event_cost`` for the event), exact as the token caps are.

Requests race over two app processes sharing Azurite. A request in flight is
counted at the dearest price of the event's models (here gpt-4o-mini's output
price) for its whole estimate, so the event's cost budget is never passed, and
an attendee's day passes its cap by at most one request's cost. Sequential
requests then show the bound is where the README says it is.
"""

from __future__ import annotations

import asyncio
import json
from decimal import Decimal

import httpx

from proxy.prices import PRICES_FILE
from proxy.storage import Tables
from proxy.usage import report
from tests.conftest import MakeEvent
from tests.support import Service

OUTPUT_PRICE = Decimal(str(json.loads(PRICES_FILE.read_text())["models"]["gpt-4o-mini"]["output"]))
BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "a question"}], "max_tokens": 20}


def most_one_request_costs() -> Decimal:
    """The dearest a request can be: its estimate (body bytes / 4 + max_tokens) at the output price."""
    estimate = len(json.dumps(BODY)) // 4 + 64 + BODY["max_tokens"]  # the proxy adds a user field: room for it
    return estimate * OUTPUT_PRICE / 1_000_000


async def send(client: httpx.AsyncClient, base: str, key: str) -> tuple[int, str]:
    answer = await client.post(f"{base}/api/v1/chat/completions", json=BODY, headers={"api-key": key})
    return answer.status_code, answer.json().get("error", {}).get("code", "") if answer.status_code != 200 else ""


async def test_event_cost_is_never_passed_over_two_processes(
    app: str, app_process: tuple[Service, str], make_event: MakeEvent, tables: Tables
) -> None:
    budget = Decimal("0.0002")
    created = await make_event(name="Costly", models=("gpt-4o-mini",), daily_requests=None, event_cost=float(budget))
    _, second = app_process
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=60)) as client:
        raced = await asyncio.gather(*(send(client, app if i % 2 else second, created.key(f"u{i % 6}"))
                                       for i in range(60)))  # fmt: skip
        admitted = sum(1 for status, _ in raced if status == 200)
        assert 0 < admitted < 60
        assert {code for status, code in raced if status != 200} == {"event_budget_exhausted"}
        # Then one at a time, until refused: what is left is less than one request may cost.
        for turn in range(60):
            status, code = await send(client, app if turn % 2 else second, created.key("late"))
            if status != 200:
                assert code == "event_budget_exhausted"
                break
        else:
            raise AssertionError("the event's cost budget never refused")
    spent = Decimal(str((await report(tables, created.event.id, "user"))["totals"]["cost"]))
    assert spent <= budget  # never passed
    assert budget - spent < most_one_request_costs()  # and refused only when less than one request's worth remained


async def test_daily_cost_passes_by_at_most_one_request_over_two_processes(
    app: str, app_process: tuple[Service, str], make_event: MakeEvent, tables: Tables
) -> None:
    cap = Decimal("0.00005")
    created = await make_event(name="Daily cost", models=("gpt-4o-mini",), daily_requests=None, daily_cost=float(cap))
    _, second = app_process
    key = created.key("ada")
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=30)) as client:
        raced = await asyncio.gather(*(send(client, app if i % 2 else second, key) for i in range(30)))
        assert {code for status, code in raced if status != 200} == {"daily_cost_cap_exceeded"}
        for turn in range(40):  # one at a time: each sees the cost of the answer before it
            status, code = await send(client, app if turn % 2 else second, key)
            if status != 200:
                assert code == "daily_cost_cap_exceeded"
                break
        else:
            raise AssertionError("the daily cost cap never refused")
        refusal = await client.post(f"{app}/api/v1/chat/completions", json=BODY, headers={"api-key": key})
        assert "resets at midnight in the event's time zone" in refusal.json()["error"]["message"]
        assert int(refusal.headers["retry-after"]) > 0
    spent = Decimal(str((await report(tables, created.event.id, "user"))["totals"]["cost"]))
    assert cap <= spent < cap + most_one_request_costs()
