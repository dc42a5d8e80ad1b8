"""Costs: every recorded request priced from the sourced table (or MODEL_PRICES), cached tokens at their price.

The reports' ``cost`` must equal the tokens upstream reported (as the SDK saw
them) times the prices in ``proxy/data/prices.json``, computed here on its
own; a model with no known price is counted and flagged, not priced at 0
silently.
"""

from __future__ import annotations

import json
import secrets
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import httpx
import pytest
from openai import OpenAI

from proxy.admission.days import Admission
from proxy.admission.limits import Ledger
from proxy.config.prices import PRICES_FILE, Price, PriceTable
from proxy.config.settings import Settings, SettingsError
from proxy.ledger.reports import report, request_log
from proxy.ledger.usage import UsageRecord
from proxy.storage.tables import Tables
from tests.conftest import MakeEvent
from tests.support import ORGANIZER_KEY, eventually

AUTH = {"Authorization": f"Bearer {ORGANIZER_KEY}"}
SOURCED = json.loads(PRICES_FILE.read_text())["models"]


def expected_usd(model: str, prompt: int, cached: int, completion: int) -> Decimal:
    """Tokens times the sourced prices (USD per million), in exact decimal arithmetic."""
    price = {name: Decimal(str(SOURCED[model][name])) for name in ("input", "cached_input", "output")}
    nanos = (prompt - cached) * price["input"] + cached * price["cached_input"] + completion * price["output"]
    return nanos / Decimal(1_000_000)


def test_every_sourced_price_names_its_source_and_date() -> None:
    for model, entry in SOURCED.items():
        assert "Azure Retail Prices API" in entry["source"], model
        datetime.strptime(entry["date"], "%Y-%m-%d")
        assert entry["input"] > 0 and entry["cached_input"] <= entry["input"], model


def test_the_price_is_upstreams_model_then_the_deployment_and_model_prices_win() -> None:
    table = PriceTable.load({"my-mini": Price(input=1.0, cached_input=0.5, output=2.0)})
    # Upstream names a dated model: its undated name is in the table.
    assert table.price("gpt-4o-2024-11-20", "prod-chat", 1_000_000, 0, 0).cost_nanos == 2_500_000_000
    # Upstream's name wins over the deployment's.
    assert table.price("gpt-4o-mini-2024-07-18", "gpt-4o", 1_000_000, 0, 0).model == "gpt-4o-mini"
    # No model in the answer: the deployment's name.
    assert table.price("", "gpt-5.2", 0, 0, 1_000_000).cost_nanos == 14_000_000_000
    # MODEL_PRICES by deployment beats everything; cached tokens at the cached price.
    assert table.price("gpt-4o-mini-2024-07-18", "my-mini", 1000, 400, 100).cost_nanos == 600_000 + 200_000 + 200_000
    unknown = table.price("llama-9", "llama", 100, 0, 100)
    assert unknown.unpriced and unknown.cost_nanos == 0


@pytest.mark.parametrize(
    ("raw", "named"),
    [
        ("not json", "MODEL_PRICES is not valid JSON"),
        ('{"m": {"input": 1}}', "'m': output: Field required"),
        ('{"m": {"input": -1, "output": 1}}', "'m': input"),
        ('{"m": {"input": 1, "output": 1, "cache": 1}}', "'m': cache: Extra inputs"),
    ],
)
def test_model_prices_setting_is_validated(raw: str, named: str) -> None:
    with pytest.raises(SettingsError, match=named):
        Settings.from_env({"STORAGE_CONNECTION_STRING": "UseDevelopmentStorage=true", "MODEL_PRICES": raw},
                          need_upstream=False)  # fmt: skip
    settings = Settings.from_env(
        {"STORAGE_CONNECTION_STRING": "UseDevelopmentStorage=true", "MODEL_PRICES": '{"m": {"input": 1, "output": 2}}'},
        need_upstream=False,
    )
    assert settings.model_prices["m"].output == 2


async def test_cost_in_reports_equals_tokens_times_sourced_prices(app: str, make_event: MakeEvent) -> None:
    new = await make_event(daily_requests=100)
    client = OpenAI(base_url=f"{app}/api/v1", api_key=new.key("ada"), max_retries=0)
    other = OpenAI(base_url=f"{app}/api/v1", api_key=new.key("bob"), max_retries=0)
    try:
        # A long system prompt sent twice: the second time Azure serves it from its prompt cache.
        system = {"role": "system", "content": f"{secrets.token_hex(8)} " + "You are a careful tutor. " * 220}
        seen: list[tuple[str, int, int, int]] = []  # (model, prompt, cached, completion) as the SDK got them
        for user, asked in ((client, "first"), (client, "second"), (other, "third")):
            answer = user.chat.completions.create(
                model="gpt-4o-mini", messages=[system, {"role": "user", "content": asked}]
            )
            assert answer.usage is not None and answer.usage.prompt_tokens_details is not None
            cached = answer.usage.prompt_tokens_details.cached_tokens or 0
            seen.append(("gpt-4o-mini", answer.usage.prompt_tokens, cached, answer.usage.completion_tokens))
        stream = client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[system, {"role": "user", "content": "streamed"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        for chunk in stream:
            if chunk.usage is not None:
                details = chunk.usage.prompt_tokens_details
                cached = (details.cached_tokens or 0) if details else 0
                seen.append(("gpt-4o-mini", chunk.usage.prompt_tokens, cached, chunk.usage.completion_tokens))
        embedded = client.embeddings.create(model="text-embedding-3-small", input=["cost me", "and me"])
        seen.append(("text-embedding-3-small", embedded.usage.prompt_tokens, 0, 0))
    finally:
        client.close()
        other.close()
    assert len(seen) == 5
    assert sum(s[2] for s in seen) >= 3 * 1024, "the repeated system prompt was served from the cache"

    async with httpx.AsyncClient(base_url=f"{app}/api/manage/events/{new.event.id}", headers=AUTH) as api:

        async def by(grouping: str) -> dict[str, Any]:
            data: dict[str, Any] = (await api.get("/usage", params={"by": grouping})).json()
            return data

        per_model = await eventually(
            lambda: by("model"), lambda data: data["totals"]["requests"] == 5, what="5 records"
        )
        per_user = await by("user")
        csv = (await api.get("/usage", headers={"Accept": "text/csv"})).text

    for model in ("gpt-4o-mini", "text-embedding-3-small"):
        row = next(r for r in per_model["rows"] if r["key"] == model)
        mine = [s for s in seen if s[0] == model]
        assert row["cached_tokens"] == sum(s[2] for s in mine)
        assert row["unpriced_requests"] == 0
        assert Decimal(str(row["cost"])) == sum((expected_usd(*s) for s in mine), Decimal(0))
    total = sum((expected_usd(*s) for s in seen), Decimal(0))
    assert Decimal(str(per_model["totals"]["cost"])) == total
    assert Decimal(str(per_user["totals"]["cost"])) == total
    assert {r["key"] for r in per_user["rows"]} == {"ada", "bob"}
    ada_seen = seen[:2] + seen[3:]
    assert Decimal(str(next(r for r in per_user["rows"] if r["key"] == "ada")["cost"])) == sum(
        (expected_usd(*s) for s in ada_seen), Decimal(0)
    )
    header = csv.splitlines()[0].split(",")
    assert header[-3:] == ["cached_tokens", "cost", "unpriced_requests"]
    assert Decimal(csv.splitlines()[-1].split(",")[-2]) == total


async def test_a_model_without_a_price_is_counted_and_flagged(tables: Tables) -> None:
    event_id = f"unpriced-{secrets.token_hex(4)}"
    now = datetime.now(UTC)
    ledger = Ledger(tables)
    records = []
    for index, (upstream, deployment) in enumerate(
        (("llama-9-2031-01-01", "llama"), ("gpt-4o-mini-2024-07-18", "mine"))
    ):
        record = UsageRecord(
            event_id=event_id,
            user="ada",
            model=deployment,
            kind="chat",
            stream=False,
            admission=Admission(f"r{index}", now.date().isoformat(), 0, 10, None, None, reserved=False),
            request_id=f"r{index}-{secrets.token_hex(4)}",
            started_at=now,
            status=200,
            reached_upstream=True,
        )
        record.take_usage(
            {"prompt_tokens": 2000, "completion_tokens": 100, "prompt_tokens_details": {"cached_tokens": 1024}},
            upstream,
        )
        records.append(record)
    prices = PriceTable.load({"mine": Price(input=2.0, output=8.0)})  # no cached price: cached at the input price
    await ledger.settle(event_id, [record.finished(prices) for record in records])

    data = await report(tables, event_id, "model")
    rows = {row["key"]: row for row in data["rows"]}
    assert rows["llama"]["unpriced_requests"] == 1 and rows["llama"]["cost"] == 0
    assert rows["llama"]["total_tokens"] == 2100 and rows["llama"]["cached_tokens"] == 1024
    assert rows["mine"]["unpriced_requests"] == 0
    assert Decimal(str(rows["mine"]["cost"])) == Decimal("0.0048")  # 2000 x 2.0 + 100 x 8.0 per million
    assert data["totals"]["unpriced_requests"] == 1
    logged = {entry["model"]: entry for entry in await request_log(tables, event_id)}
    assert logged["llama"]["priced_as"] == "" and logged["mine"]["priced_as"] == "mine"
