"""The pre-event plan: peak TPM against the quota, the largest cost, a typical request, the changes that fix it.

The figures are worked out here by hand from the event's caps and the sourced
prices (``proxy/data/prices.json``), not by calling the code's helpers.
"""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import pytest

from proxy.config.prices import PRICES_FILE, PriceTable
from proxy.manage.plan import Quota, bicep_quotas, open_days, parse_tpm, plan
from proxy.policy.events import Event

SOURCED = json.loads(PRICES_FILE.read_text())["models"]
ROOT = Path(__file__).resolve().parent.parent


def workshop(**fields: object) -> Event:
    base = Event(
        id="big-workshop",
        name="Big workshop",
        code_hash="x",
        starts_at=datetime.fromisoformat("2026-11-21T09:00:00+01:00"),
        ends_at=datetime.fromisoformat("2026-11-21T17:00:00+01:00"),
        time_zone="Europe/Paris",
        models=("gpt-4o-mini", "text-embedding-3-small"),
        max_tokens=1000,
        daily_requests=200,
        daily_tokens=100_000,
        tpm=2000,
    )
    return replace(base, **fields)  # type: ignore[arg-type]


def test_500_attendees_against_a_500k_quota() -> None:
    quotas = {"gpt-4o-mini": Quota(500_000, "--tpm")}
    data = plan(workshop(), 500, "given", quotas, PriceTable.load(), {})
    assert (data["days"], data["open_minutes_per_day"]) == (1, 8 * 60)
    chat, embeddings = data["models"]

    # 500 attendees x 2,000 tokens a minute each.
    assert chat["peak_tpm"] == 1_000_000 and chat["quota_tpm"] == 500_000 and chat["holds"] is False
    # A day: each attendee's 100,000 tokens (below 2,000 x 480 minutes), all of them output: their
    # 200 requests x max_tokens 1,000 would allow 200,000 output tokens.
    day_tokens = 500 * 100_000
    assert chat["max_tokens_per_day"] == day_tokens
    assert chat["max_cost_per_day"] == pytest.approx(day_tokens * SOURCED["gpt-4o-mini"]["output"] / 1e6)
    assert chat["max_cost_per_day"] == pytest.approx(30.0)
    assert chat["max_cost_event"] == chat["max_cost_per_day"]
    typical = chat["typical_request"]
    assert (typical["prompt_tokens"], typical["completion_tokens"], typical["from"]) == (1000, 300, "assumed")
    price = SOURCED["gpt-4o-mini"]
    assert typical["cost"] == pytest.approx((1000 * price["input"] + 300 * price["output"]) / 1e6)
    assert chat["changes"][0].startswith("--tpm 1000: 500 attendees x 1,000 = 500,000 TPM")
    assert chat["changes"][1].startswith("--max-attendees 250:")
    assert chat["changes"][2].startswith("capacity 1000 for 'gpt-4o-mini' in infra/main.bicepparam")

    # Embeddings have no output: every token at the input price; no quota given, so no verdict.
    assert embeddings["max_cost_per_day"] == pytest.approx(
        day_tokens * SOURCED["text-embedding-3-small"]["input"] / 1e6
    )
    assert embeddings["holds"] is None and embeddings["changes"][0].startswith("Give the deployment's quota")


def test_what_bounds_the_cost() -> None:
    prices = PriceTable.load()
    # Output is bounded by requests x max_tokens: 10 attendees x 5 requests x 100 tokens; the rest is input.
    few = plan(workshop(daily_requests=5, max_tokens=100), 10, "given", {}, prices, {})["models"][0]
    price = SOURCED["gpt-4o-mini"]
    output = 10 * 5 * 100
    expected = (output * price["output"] + (10 * 100_000 - output) * price["input"]) / 1e6
    assert few["max_cost_per_day"] == pytest.approx(expected)
    # The event's token budget caps the whole event.
    budget = plan(workshop(event_tokens=1_000_000), 500, "given", {}, prices, {})["models"][0]
    assert budget["max_cost_event"] == pytest.approx(1_000_000 * price["output"] / 1e6)
    # No daily tokens and no tokens per minute: nothing bounds it, and the change says so.
    unbounded = plan(workshop(daily_tokens=None, tpm=None), 50, "given", {"gpt-4o-mini": Quota(50_000, "--tpm")},
                     prices, {})["models"][0]  # fmt: skip
    assert unbounded["max_cost_per_day"] is None and unbounded["peak_tpm"] is None and unbounded["holds"] is False
    assert unbounded["changes"][0].startswith("--tpm 1000: no tokens-per-minute cap")
    assert unbounded["changes"][-1].startswith("--event-cost USD (or --daily-cost USD, --daily-tokens N): nothing")
    # Cost caps bound it in money: $2 per attendee and day, $150 for the whole event.
    capped = plan(workshop(daily_tokens=None, tpm=None, daily_cost=2.0, event_cost=150.0), 100, "given", {},
                  prices, {})["models"][0]  # fmt: skip
    assert (capped["max_cost_per_day"], capped["max_cost_event"]) == (200.0, 150.0)
    assert not any(change.startswith("--event-cost") for change in capped["changes"])


def test_typical_request_is_the_events_own_average_once_it_has_usage() -> None:
    usage = {"gpt-4o-mini": {"requests": 4, "prompt_tokens": 800, "completion_tokens": 400, "cached_tokens": 0}}
    typical = plan(workshop(), 5, "given", {}, PriceTable.load(), usage)["models"][0]["typical_request"]
    price = SOURCED["gpt-4o-mini"]
    assert (typical["prompt_tokens"], typical["completion_tokens"]) == (200, 100)
    assert typical["cost"] == pytest.approx((200 * price["input"] + 100 * price["output"]) / 1e6)
    assert typical["from"] == "this event's average over 4 requests"


def test_days_are_counted_in_the_events_time_zone() -> None:
    two = workshop(ends_at=datetime.fromisoformat("2026-11-22T17:00:00+01:00"))
    assert open_days(two) == (2, 17 * 60)  # the second day is open from midnight to 17:00
    # 23:00 to 01:00 in Paris is two local days (one UTC day would say one).
    late = workshop(starts_at=datetime.fromisoformat("2026-11-21T23:00:00+01:00"),
                    ends_at=datetime.fromisoformat("2026-11-22T01:00:00+01:00"))  # fmt: skip
    assert open_days(late) == (2, 60)


def test_quota_comes_from_the_bicep_parameters_or_the_command_line(tmp_path: Path) -> None:
    quotas = bicep_quotas(ROOT / "infra" / "main.bicepparam")
    assert quotas["text-embedding-3-small"].tpm == 50_000  # capacity 50 = 50,000 tokens per minute
    two_regions = tmp_path / "main.bicepparam"
    two_regions.write_text(
        "param modelDeployments = [\n  {\n    name: 'chat'\n    model: 'gpt-4o-mini'\n    capacity: 30\n  }\n]\n"
        "param openAiExtraRegions = ['swedencentral']\n"
    )
    assert bicep_quotas(two_regions)["chat"] == Quota(
        60_000, "tmp/main.bicepparam x 2 regions".replace("tmp", tmp_path.name)
    )
    assert parse_tpm(["chat=120000"]) == {"chat": Quota(120_000, "--tpm")}
    for bad in ("chat", "chat=", "=5", "chat=-3", "chat=lots"):
        with pytest.raises(ValueError, match="MODEL=TPM"):
            parse_tpm([bad])
