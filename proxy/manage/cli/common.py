"""What the CLI's command groups share: the parser class, option values, and printing as JSON or aligned tables."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, NoReturn, TypeVar
from zoneinfo import ZoneInfo

import orjson


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


CLEARED = ("none", "null", "off")
_N = TypeVar("_N", int, float)


def number(value: str) -> int | str | None:
    """An integer, or ``none`` to clear a cap; anything else is left for validation to name."""
    return _parsed(value, int)


def dollars(value: str) -> float | str | None:
    """A USD amount, or ``none`` to clear it; anything else is left for validation to name."""
    return _parsed(value, float)


def _parsed(value: str, kind: Callable[[str], _N]) -> _N | str | None:
    if value.strip().lower() in CLEARED:
        return None
    try:
        return kind(value)
    except ValueError:
        return value


def url(value: str) -> str | None:
    return None if value.strip().lower() in CLEARED else value


def flag(value: str) -> bool | str:
    lowered = value.strip().lower()
    return {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}.get(lowered, value)


def models(value: str) -> list[str]:
    return [model.strip() for model in value.split(",") if model.strip()]


class Refused(Exception):
    """The organizer did not confirm."""


def output(args: argparse.Namespace, data: dict[str, Any], readable: Any) -> None:
    print(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode() if args.json else readable(data))


def local(event: dict[str, Any], name: str) -> str:
    moment = datetime.fromisoformat(event[name]).astimezone(ZoneInfo(event["time_zone"]))
    return moment.strftime("%Y-%m-%d %H:%M")


def table(header: Sequence[str] | None, rows: Sequence[Sequence[Any]], numeric: Sequence[bool]) -> str:
    cells = [["-" if value is None else str(value) for value in row] for row in rows]
    if header is not None:
        cells.insert(0, list(header))
    widths = [max(len(row[i]) for row in cells) for i in range(len(numeric))]
    lines = [
        "  ".join(
            cell.rjust(w) if right else cell.ljust(w) for cell, w, right in zip(row, widths, numeric, strict=True)
        )
        for row in cells
    ]
    return "\n".join(line.rstrip() for line in lines)


def budget_lines(figures: dict[str, Any] | None) -> str:
    """What is used of the event's budgets, one line each (nothing without a budget)."""
    if figures is None:
        return ""
    lines = ""
    for name in ("requests", "tokens"):
        if figures[name]["limit"] is not None:
            lines += f"\nEvent budget, {name}: {figures[name]['used']} used of {figures[name]['limit']}"
    if figures.get("cost"):
        lines += f"\nEvent budget, cost: ${figures['cost']['used']:,.4f} used of ${figures['cost']['limit']:,.2f}"
    if figures["exhausted"]:
        lines += "\nThe event's budget is used up: attendees get 429 event_budget_exhausted."
    return lines
