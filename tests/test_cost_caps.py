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

from proxy.config.prices import PRICES_FILE
from proxy.ledger.usage import report
from proxy.storage.tables import Tables
from tests.conftest import MakeEvent
from tests.support import Service

OUTPUT_PRICE = Decimal(str(json.loads(PRICES_FILE.read_text())["models"]["gpt-4o-mini"]["output"]))
BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "a question"}], "max_tokens": 20}


def most_one_request_costs() -> Decimal:
    """The dearest a request can be: its estimate (body bytes / 4 + max_tokens) at the output price."""
    estimate = len(json.dumps(BODY)) // 4 + 64 + BODY["max_tokens"]  # the proxy adds a user field: room for it
    return estimate * OUTPUT_PRICE / 1_000_000


async def send(client: httpx.AsyncClient, base: str, key: str) -> tuple[int, str, str]:
    """(status, error code, error message) of one chat request."""
    answer = await client.post(f"{base}/api/v1/chat/completions", json=BODY, headers={"api-key": key})
    error = answer.json().get("error", {}) if answer.status_code != 200 else {}
    return answer.status_code, error.get("code", ""), error.get("message", "")


async def until_refused(client: httpx.AsyncClient, apps: tuple[str, str], key: str, most: int = 60) -> tuple[str, str]:
    """Send one request at a time, alternating between the apps, until one is refused; its error code and message."""
    for turn in range(most):
        status, code, message = await send(client, apps[turn % 2], key)
        if status != 200:
            return code, message
    raise AssertionError(f"{most} requests one at a time, none refused")


async def test_event_cost_is_never_passed_over_two_processes(
    app: str, app_process: tuple[Service, str], make_event: MakeEvent, tables: Tables
) -> None:
    budget = Decimal("0.0002")
    created = await make_event(name="Costly", models=("gpt-4o-mini",), daily_requests=None, event_cost=float(budget))
    _, second = app_process
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=60)) as client:
        raced = await asyncio.gather(*(send(client, app if i % 2 else second, created.key(f"u{i % 6}"))
                                       for i in range(60)))  # fmt: skip
        admitted = sum(1 for status, _, _ in raced if status == 200)
        assert 0 < admitted < 60
        assert {code for status, code, _ in raced if status != 200} == {"event_budget_exhausted"}
        # Then one at a time, until refused: what is left is less than one request may cost.
        code, message = await until_refused(client, (app, second), created.key("late"))
        assert code == "event_budget_exhausted" and "has used up its budget of $0.00" in message
    spent = Decimal(str((await report(tables, created.event.id, "user"))["totals"]["cost"]))
    assert spent <= budget  # never passed
    # Refused only when less than one request's worth remained, give or take the last request of the other
    # process, whose shard may still hold its estimate for 50 ms after its answer (proxy.admission.budget: deferred).
    assert budget - spent < 2 * most_one_request_costs()


async def test_daily_cost_passes_by_at_most_one_request_over_two_processes(
    app: str, app_process: tuple[Service, str], make_event: MakeEvent, tables: Tables
) -> None:
    cap = Decimal("0.00005")
    created = await make_event(name="Daily cost", models=("gpt-4o-mini",), daily_requests=None, daily_cost=float(cap))
    _, second = app_process
    key = created.key("ada")
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=30)) as client:
        raced = await asyncio.gather(*(send(client, app if i % 2 else second, key) for i in range(30)))
        assert {code for status, code, _ in raced if status != 200} == {"daily_cost_cap_exceeded"}
        # One at a time: each sees the cost of the answer before it.
        code, message = await until_refused(client, (app, second), key)
        assert code == "daily_cost_cap_exceeded" and "resets at midnight in the event's time zone" in message
    spent = Decimal(str((await report(tables, created.event.id, "user"))["totals"]["cost"]))
    assert cap <= spent < cap + most_one_request_costs()
