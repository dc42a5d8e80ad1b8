"""The pre-event plan: will the deployments' quota hold, and what can the event cost at most.

For each model an event allows, with ``N`` attendees (``--attendees``, else
the event's ``max_attendees``, else the names seen so far):

- **Peak TPM**: what the caps let all attendees ask of that one deployment in a
  minute, at full use: ``N x tpm`` (the per-attendee tokens per minute, counted
  as Azure counts its quota: the prompt estimate plus ``max_tokens``). Without
  ``tpm`` nothing bounds it. It is checked against the deployment's quota (TPM):
  ``--tpm MODEL=TPM``, else the ``capacity`` (thousands of TPM) that
  ``infra/main.bicepparam`` gives the deployment, times the regions that share
  the load (``openAiExtraRegions``, unless only on failover).
- **Largest cost**: per day, ``N`` attendees using all their daily tokens
  (``daily_tokens``, or what ``tpm`` allows over the hours the event is open
  that day, whichever is less), as many of them output tokens as
  ``daily_requests x max_tokens`` allows and the rest input, at the model's
  price; for the whole event, that times its days, and no more than
  ``event_tokens`` allows. ``None`` when no cap bounds it.
- **Typical request**: the event's own average per request of that model when
  it has usage, else 1,000 prompt and 300 completion tokens (embeddings: 1,000
  input tokens), priced.
- **Changes**: when the peak passes the quota (or nothing bounds it), the cap
  changes that make it hold, one per line with the reason; and the price to
  set for a model with none in an event that caps cost (its requests are
  refused until then: ``403 model_price_unknown``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from proxy.config.prices import Price, PriceTable, usd
from proxy.policy.events import Event

BICEP_PARAMS = Path(__file__).resolve().parents[2] / "infra" / "main.bicepparam"
TYPICAL_CHAT = (1000, 300)  # prompt and completion tokens of a request when the event has no usage yet
TYPICAL_EMBEDDING = (1000, 0)
PLAN_CAPS = ("max_tokens", "daily_requests", "daily_tokens", "tpm", "event_requests", "event_tokens", "daily_cost",
             "event_cost")  # fmt: skip
_DEPLOYMENT = re.compile(r"\{[^{}]*?name:\s*'([^']+)'[^{}]*?capacity:\s*(\d+)[^{}]*\}", re.S)


@dataclass(frozen=True, slots=True)
class Quota:
    tpm: int
    source: str


def parse_tpm(values: list[str]) -> dict[str, Quota]:
    """``MODEL=TPM`` pairs (``--tpm``, ``?tpm=``); ValueError naming a malformed one."""
    quotas: dict[str, Quota] = {}
    for value in values:
        model, _, tpm = value.partition("=")
        if not model.strip() or not tpm.strip().isdigit() or int(tpm) <= 0:
            raise ValueError(f"--tpm takes MODEL=TPM (a deployment and its tokens per minute), got {value!r}")
        quotas[model.strip()] = Quota(int(tpm), "--tpm")
    return quotas


def bicep_quotas(path: Path = BICEP_PARAMS) -> dict[str, Quota]:
    """Each deployment's capacity in ``infra/main.bicepparam`` (thousands of TPM), times its regions."""
    try:
        text = path.read_text()
    except OSError:
        return {}
    text = re.sub(r"//[^\n]*", "", text)
    block = re.search(r"param\s+modelDeployments\s*=\s*\[(.*?)\n\]", text, re.S)
    if block is None:
        return {}
    extra = re.search(r"param\s+openAiExtraRegions\s*=\s*\[(.*?)\]", text, re.S)
    regions = 1 + (len(re.findall(r"'[^']+'", extra.group(1))) if extra else 0)
    if re.search(r"param\s+openAiExtraRegionsOnlyOnFailover\s*=\s*true", text):
        regions = 1
    where = f"{path.parent.name}/{path.name}" + (f" x {regions} regions" if regions > 1 else "")
    deployments = _DEPLOYMENT.findall(block.group(1))
    return {name: Quota(int(capacity) * 1000 * regions, where) for name, capacity in deployments}


def open_days(event: Event) -> tuple[int, int]:
    """(calendar days the event is open in its time zone, the most minutes it is open on one of them)."""
    zone = ZoneInfo(event.time_zone)
    start, end = event.starts_at.astimezone(zone), event.ends_at.astimezone(zone)
    days = (end - timedelta(microseconds=1)).date().toordinal() - start.date().toordinal() + 1
    longest = 0
    day = start
    while day < end:
        midnight = datetime.combine(day.date() + timedelta(days=1), datetime.min.time(), zone)
        longest = max(longest, math.ceil((min(midnight, end) - day).total_seconds() / 60))
        day = midnight
    return days, min(longest, 24 * 60)


def plan(
    event: Event,
    attendees: int,
    attendees_source: str,
    quotas: dict[str, Quota],
    prices: PriceTable,
    usage_by_model: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    """The plan's JSON (``GET /api/manage/events/{id}/plan``, ``manage plan --json``)."""
    days, minutes = open_days(event)
    models = [
        _model_plan(event, model, attendees, days, minutes, quotas.get(model), prices, usage_by_model.get(model))
        for model in event.models
    ]
    return {
        "event_id": event.id,
        "attendees": attendees,
        "attendees_from": attendees_source,
        "days": days,
        "open_minutes_per_day": minutes,
        "caps": {name: getattr(event, name) for name in PLAN_CAPS},
        "models": models,
    }


def _model_plan(
    event: Event,
    model: str,
    attendees: int,
    days: int,
    minutes: int,
    quota: Quota | None,
    prices: PriceTable,
    usage: dict[str, Any] | None,
) -> dict[str, Any]:
    price = prices.known(model)
    embedding = "embedding" in model
    peak = None if event.tpm is None else attendees * event.tpm
    # Nothing caps the peak (no tpm): attendees at full use can always ask for more than any quota.
    holds = None if quota is None else peak is not None and peak <= quota.tpm
    per_day = _tokens_per_attendee_day(event, minutes)
    day_tokens = None if per_day is None else per_day * attendees
    event_tokens = None if day_tokens is None else day_tokens * days
    if event.event_tokens is not None:
        event_tokens = event.event_tokens if event_tokens is None else min(event_tokens, event.event_tokens)
    completion_cap = _completion_cap(event, attendees)
    day_cost = _capped(_worst_cost(price, day_tokens, completion_cap, embedding),
                       None if event.daily_cost is None else event.daily_cost * attendees)  # fmt: skip
    event_completion = None if completion_cap is None else completion_cap * days
    if event.event_requests is not None:
        cap = event.event_requests * event.max_tokens
        event_completion = cap if event_completion is None else min(event_completion, cap)
    event_cost = _worst_cost(price, event_tokens, event_completion, embedding)
    if day_cost is not None:
        event_cost = _capped(event_cost, day_cost * days)
    event_cost = _capped(event_cost, event.event_cost)
    return {
        "model": model,
        "price": None if price is None else price.model_dump(),
        "quota_tpm": None if quota is None else quota.tpm,
        "quota_from": None if quota is None else quota.source,
        "peak_tpm": peak,
        "holds": holds,
        "max_tokens_per_day": day_tokens,
        "max_cost_per_day": day_cost,
        "max_cost_event": event_cost,
        "typical_request": _typical(price, usage, embedding),
        "changes": _changes(event, model, attendees, peak, quota, embedding)
        + _cost_changes(event, model, event_cost, price),
    }


def _capped(cost: float | None, cap: float | None) -> float | None:
    """The lesser of a cost and a cap in USD (None: unbounded)."""
    if cost is None or cap is None:
        return cap if cost is None else cost
    return min(cost, cap)


def _tokens_per_attendee_day(event: Event, minutes: int) -> int | None:
    bounds = [b for b in (event.daily_tokens, None if event.tpm is None else event.tpm * minutes) if b is not None]
    return min(bounds) if bounds else None


def _completion_cap(event: Event, attendees: int) -> int | None:
    """The most output tokens all attendees can get in a day: their requests times max_tokens."""
    return None if event.daily_requests is None else attendees * event.daily_requests * event.max_tokens


def _worst_cost(price: Price | None, tokens: int | None, completion_cap: int | None, embedding: bool) -> float | None:
    """``tokens`` as expensive as they can be: output up to ``completion_cap``, the rest input (USD)."""
    if price is None or tokens is None:
        return None
    output = tokens if completion_cap is None else min(tokens, completion_cap)
    if embedding or price.output < price.input:
        output = 0
    return usd(price.cost_nanos(tokens - output, 0, output))


def _typical(price: Price | None, usage: dict[str, Any] | None, embedding: bool) -> dict[str, Any]:
    if usage and usage.get("requests"):
        requests = usage["requests"]
        prompt, completion = round(usage["prompt_tokens"] / requests), round(usage["completion_tokens"] / requests)
        cached = round(usage.get("cached_tokens", 0) / requests)
        source = f"this event's average over {requests} request" + ("s" if requests != 1 else "")
    else:
        (prompt, completion), cached = TYPICAL_EMBEDDING if embedding else TYPICAL_CHAT, 0
        source = "assumed"
    cost = None if price is None else usd(price.cost_nanos(prompt, cached, completion))
    return {"prompt_tokens": prompt, "completion_tokens": completion, "cost": cost, "from": source}


def _cost_changes(event: Event, model: str, event_cost: float | None, price: Price | None) -> list[str]:
    if price is None and (event.daily_cost is not None or event.event_cost is not None):
        return [
            f'MODEL_PRICES: add {{"{model}": {{"input": USD, "output": USD}}}} (USD per million tokens; an app '
            f"setting): '{model}' has no known price, so while the event caps cost its requests are refused "
            "(403 model_price_unknown)."
        ]
    if event_cost is not None or price is None:
        return []
    return [
        "--event-cost USD (or --daily-cost USD, --daily-tokens N): nothing bounds what attendees can use, so the "
        "event's cost has no upper bound."
    ]


def _changes(
    event: Event, model: str, attendees: int, peak: int | None, quota: Quota | None, embedding: bool
) -> list[str]:
    if quota is None:
        return [f"Give the deployment's quota to check it: --tpm {model}=TPM (its tokens per minute in Azure)."]
    fair = quota.tpm // max(1, attendees)
    if peak is None:
        return [
            f"--tpm {fair}: no tokens-per-minute cap, so {attendees} attendees can ask for more than the "
            f"quota of {quota.tpm:,} TPM; {attendees} x {fair:,} stays within it."
        ]
    if peak <= quota.tpm:
        return []
    changes = [f"--tpm {fair}: {attendees} attendees x {fair:,} = {attendees * fair:,} TPM, within the quota of "
               f"{quota.tpm:,} (now {attendees} x {event.tpm:,} = {peak:,})."]  # fmt: skip
    if event.tpm:
        fit = quota.tpm // event.tpm
        changes.append(
            f"--max-attendees {fit}: at {event.tpm:,} TPM each, {fit} attendees fit in the quota of {quota.tpm:,}."
        )
    changes.append(
        f"capacity {math.ceil(peak / 1000)} for '{model}' in infra/main.bicepparam (thousands of TPM; "
        f"{peak:,} needed), if the subscription's quota allows it."
    )
    if fair and fair < event.max_tokens and not embedding:
        changes.append(
            f"--max-tokens {max(1, fair // 2)}: with --tpm {fair} a request asking for max_tokens {event.max_tokens:,} "
            "would never fit in a minute's tokens; half the minute leaves room for the prompt."
        )
    return changes
