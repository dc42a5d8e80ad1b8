"""The CLI's reports: ``usage`` (an event's usage by user, model, day, backend or hour; table, CSV or JSON) and
``plan`` (will the quota hold, what can the event cost at most)."""

from __future__ import annotations

import argparse
from typing import Any

from proxy.config.prices import PriceTable
from proxy.config.settings import Settings
from proxy.ledger.reports import FIGURES, GROUPINGS, report_csv
from proxy.manage import operations as organizer
from proxy.manage.cli.common import Parser, budget_lines, output, table
from proxy.policy.accounts import CLI
from proxy.policy.events import EventStore
from proxy.storage.tables import Tables

AREAS = ("usage", "plan")


def add_parsers(commands: argparse._SubParsersAction[Parser]) -> None:
    """The ``usage`` and ``plan`` commands."""
    usage = commands.add_parser("usage", help="an event's usage", description="Usage of an event, totals last.")
    usage.add_argument("event_id", metavar="EVENT_ID")
    usage.add_argument(
        "--by",
        choices=GROUPINGS,
        default="user",
        help="group by user (default), model, day, backend or hour (the last 48 hours)",
    )
    output = usage.add_mutually_exclusive_group()
    output.add_argument("--csv", action="store_true", help="print CSV")
    output.add_argument("--json", action="store_true", help="print one JSON object")

    planning = commands.add_parser(
        "plan",
        help="will the quota hold, and what can the event cost at most",
        description="Per model the event allows: the tokens per minute its caps allow all attendees at full use "
        "against the deployment's quota, the largest cost the caps allow (per day and for the whole event), what "
        "one typical request costs, and the cap changes that would make the quota hold.",
    )
    planning.add_argument("event_id", metavar="EVENT_ID")
    planning.add_argument("--attendees", type=int, metavar="N", help="how many (default: max_attendees, else seen)")
    planning.add_argument(
        "--tpm",
        action="append",
        default=[],
        metavar="MODEL=TPM",
        help="a deployment's quota in tokens per minute (default: its capacity in infra/main.bicepparam)",
    )
    planning.add_argument("--json", action="store_true", help="print one JSON object")


async def run(args: argparse.Namespace, store: EventStore, tables: Tables, settings: Settings) -> None:
    """Carry out one ``usage`` or ``plan`` command and print its result."""
    if args.area == "usage":
        data = await organizer.usage_report(store, tables, CLI, args.event_id, args.by)
        if args.csv:
            print(report_csv(data), end="")
        else:
            output(args, data, _usage_table)
    else:
        prices = PriceTable.load(settings.model_prices)
        data = await organizer.plan_event(store, tables, prices, CLI, args.event_id, args.attendees, args.tpm)
        output(args, data, _plan_text)


def _usage_table(data: dict[str, Any]) -> str:
    shown = (*FIGURES, "cached_tokens", "cost")
    header = (data["by"].upper(), *(name.upper().replace("_", " ") for name in FIGURES), "CACHED", "COST (USD)")

    def cells(row: dict[str, Any]) -> tuple[Any, ...]:
        return (*(row[name] for name in FIGURES), row["cached_tokens"], f"{row['cost']:.6f}")

    rows = [(row["key"], *cells(row)) for row in data["rows"]]
    rows.append(("TOTAL", *cells(data["totals"])))
    aligned = table(header, rows, (False, *(True for _ in shown)))
    return aligned + _unpriced_line(data["totals"]) + budget_lines(data.get("budget"))


def _unpriced_line(totals: dict[str, Any]) -> str:
    unpriced = totals.get("unpriced_requests", 0)
    if not unpriced:
        return ""
    return (
        f"\n{unpriced} requests used a model with no known price: COST leaves them out. Add the model to "
        "MODEL_PRICES (USD per million tokens, by deployment name)."
    )


def _plan_text(data: dict[str, Any]) -> str:
    def money(value: float | None) -> str:
        if value is None:
            return "no cap bounds it"
        return f"${value:,.2f}" if value >= 1 else f"${value:.4f}" if value >= 0.001 else f"${value:.6f}"

    def tpm(value: int | None) -> str:
        return "unbounded (no --tpm cap)" if value is None else f"{value:,} TPM"

    days = f"{data['days']} day" + ("s" if data["days"] != 1 else "")
    lines = [f"Plan for {data['event_id']}: {data['attendees']} attendees ({data['attendees_from']}), {days}, "
             f"open up to {data['open_minutes_per_day']} minutes a day."]  # fmt: skip
    for model in data["models"]:
        quota = "unknown" if model["quota_tpm"] is None else f"{model['quota_tpm']:,} TPM ({model['quota_from']})"
        verdict = {True: "holds", False: "DOES NOT HOLD", None: "not checked (no quota known)"}[model["holds"]]
        typical = model["typical_request"]
        lines += [
            "",
            f"{model['model']}:",
            f"  peak at full use   {tpm(model['peak_tpm'])} against a quota of {quota}: {verdict}",
            f"  largest cost       {money(model['max_cost_per_day'])} a day, {money(model['max_cost_event'])} "
            "for the whole event",
            f"  typical request    {typical['prompt_tokens']:,} prompt + {typical['completion_tokens']:,} completion "
            f"tokens = {money(typical['cost'])} ({typical['from']})",
        ]
        if model["price"] is None:
            lines.append("  no known price for this model: set MODEL_PRICES to see costs")
        lines += [f"  change: {change}" for change in model["changes"]]
    return "\n".join(lines)
