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
from collections.abc import Iterator
from decimal import Decimal

import httpx
import pytest

from proxy.config.prices import PRICES_FILE
from proxy.ledger.reports import report
from proxy.storage.tables import Tables
from tests.conftest import LENIENT, MakeEvent
from tests.support import ORGANIZER_KEY, Service, app_env, sim_stats, start_app, start_simulator

OUTPUT_PRICE = Decimal(str(json.loads(PRICES_FILE.read_text())["models"]["gpt-4o-mini"]["output"]))
AUTH = {"Authorization": f"Bearer {ORGANIZER_KEY}"}
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


@pytest.fixture(scope="module")
def unpriced_upstream(azurite: str) -> Iterator[tuple[str, str]]:
    """(app, simulator) where the simulator also serves ``team-chat``, a deployment name no price table knows."""
    simulator, sim_url = start_simulator("--deployment", "gpt-4o-mini=chat", "--deployment", "team-chat=chat")
    service, url = start_app(app_env(azurite, sim_url, EVENT_CACHE_SECONDS="1", **LENIENT))
    yield url, sim_url
    service.stop()
    simulator.stop()


async def test_a_model_with_no_price_is_refused_where_cost_is_capped(
    unpriced_upstream: tuple[str, str], make_event: MakeEvent, tables: Tables
) -> None:
    """An attendee calls, again and again, the one deployment the event's cost cap cannot price (the Responses
    API's answer names it too, so nothing prices it afterwards either): each request is refused before
    upstream, naming MODEL_PRICES, and nothing is spent. The event's priced model still works, the same
    deployment without a cost cap works (flagged unpriced), and the plan tells the organizer beforehand."""
    app, simulator = unpriced_upstream
    models = ("gpt-4o-mini", "team-chat")
    capped = await make_event(name="Capped", models=models, daily_requests=None, event_cost=0.0001, daily_cost=0.00005)
    free = await make_event(name="Uncapped", models=models, daily_requests=None)
    body = {"model": "team-chat", "input": "a question", "max_output_tokens": 20}
    async with httpx.AsyncClient(timeout=60) as client:

        async def ask(key: str, model: str = "team-chat") -> httpx.Response:
            return await client.post(f"{app}/api/v1/responses", json={**body, "model": model}, headers={"api-key": key})

        refused = await asyncio.gather(*(ask(capped.key(f"u{i % 3}")) for i in range(12)))
        refused += [await ask(capped.key("one-by-one")) for _ in range(4)]  # unpriced, each once cost 0 and passed
        for answer in refused:
            assert answer.status_code == 403, answer.text
            error = answer.json()["error"]
            assert error["code"] == "model_price_unknown" and error["param"] == "model"
            assert "'team-chat' has no known price" in error["message"] and "MODEL_PRICES" in error["message"]
        assert "team-chat" not in sim_stats(simulator)["by_deployment"]  # refused before upstream
        assert (await ask(capped.key(), "gpt-4o-mini")).status_code == 200
        assert (await ask(free.key())).status_code == 200
        plan = await client.get(f"{app}/api/manage/events/{capped.event.id}/plan", headers=AUTH)
        assert plan.status_code == 200, plan.text
        changes = {row["model"]: row["changes"] for row in plan.json()["models"]}
        assert any("MODEL_PRICES" in change and "model_price_unknown" in change for change in changes["team-chat"])
        assert not any("MODEL_PRICES" in change for change in changes["gpt-4o-mini"])
    spent = (await report(tables, capped.event.id, "model"))["rows"]
    assert [row["key"] for row in spent] == ["gpt-4o-mini"]
    unpriced = (await report(tables, free.event.id, "model"))["totals"]
    assert unpriced["requests"] == 1 and unpriced["unpriced_requests"] == 1 and unpriced["cost"] == 0
