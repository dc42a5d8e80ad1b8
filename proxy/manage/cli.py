"""The organizer CLI, ``python -m proxy.manage``: events and usage from a terminal.

It reads the same settings as the app (the environment first, then the
``Values`` of ``local.settings.json`` in the current folder), so it reaches
Azurite locally and Table Storage in Azure alike. With
``STORAGE_TABLE_ENDPOINT`` (and no connection string) it signs in with
``DefaultAzureCredential``, so an ``az login`` is enough. Creating an event or
rotating a code also needs the app's ``CODE_HASH_KEY`` (codes are stored as
hashes keyed with it, ``proxy.config.hashing``).

Output is an aligned table by default, one JSON object with ``--json`` (the
same shapes as ``/api/manage/``), CSV with ``usage --csv``. Errors are one line
on stderr: exit code 2 for bad input or an unknown event, 1 when storage cannot
be reached.

``doctor`` is different: it checks a running proxy over HTTP (``proxy.manage.doctor``),
so it needs only the organizer key and the proxy's URL.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, NoReturn, TypeVar
from zoneinfo import ZoneInfo

import orjson
from azure.core.credentials_async import AsyncTokenCredential
from azure.core.exceptions import ClientAuthenticationError

from proxy.config.prices import PriceTable
from proxy.config.settings import Settings, SettingsError, cli_values
from proxy.errors import ProxyError, StorageUnavailable
from proxy.ledger.usage import FIGURES, GROUPINGS, report_csv
from proxy.manage import doctor
from proxy.manage import operations as organizer
from proxy.manage.doctor import DEFAULT_URL
from proxy.policy.accounts import CLI, ROLES, AccountStore
from proxy.policy.attendees import Roster
from proxy.policy.events import DEFAULT_DAILY_REQUESTS, DEFAULT_MAX_TOKENS, DEFAULT_MODELS, EventStore
from proxy.policy.keys import PersonalKeys
from proxy.storage.tables import Tables


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


_CLEARED = ("none", "null", "off")
_N = TypeVar("_N", int, float)


def _number(value: str) -> int | str | None:
    """An integer, or ``none`` to clear a cap; anything else is left for validation to name."""
    return _parsed(value, int)


def _dollars(value: str) -> float | str | None:
    """A USD amount, or ``none`` to clear it; anything else is left for validation to name."""
    return _parsed(value, float)


def _parsed(value: str, kind: Callable[[str], _N]) -> _N | str | None:
    if value.strip().lower() in _CLEARED:
        return None
    try:
        return kind(value)
    except ValueError:
        return value


def _url(value: str) -> str | None:
    return None if value.strip().lower() in _CLEARED else value


def _flag(value: str) -> bool | str:
    lowered = value.strip().lower()
    return {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}.get(lowered, value)


def _models(value: str) -> list[str]:
    return [model.strip() for model in value.split(",") if model.strip()]


def _event_options(parser: argparse.ArgumentParser, *, creating: bool) -> None:
    hide = argparse.SUPPRESS  # absent options are not sent, so an update changes only what is given

    def option(flag: str, help_text: str, default_text: str = "", **kwargs: Any) -> None:
        shown = f"{help_text} (default: {default_text})" if creating and default_text else help_text
        parser.add_argument(flag, default=hide, help=shown, **kwargs)

    option("--name", "the event's name", required=creating)
    option("--start", "ISO 8601 with an offset, e.g. 2026-11-21T09:00:00+01:00", metavar="ISO", required=creating)
    option("--end", "ISO 8601 with an offset, after --start", metavar="ISO", required=creating)
    option("--time-zone", "IANA time zone for display, e.g. Europe/Paris", "UTC", metavar="TZ")
    option("--models", "comma-separated deployment names", ",".join(DEFAULT_MODELS), type=_models, metavar="M1,M2")
    option("--max-tokens", "cap on max_tokens per request", str(DEFAULT_MAX_TOKENS), type=_number, metavar="N")
    clear = "" if creating else "; 'none' removes the cap"
    option("--daily-requests", f"requests per attendee and day (to midnight in --time-zone){clear}",
           str(DEFAULT_DAILY_REQUESTS), type=_number, metavar="N")  # fmt: skip
    option("--daily-tokens", f"tokens per attendee and day{clear}", "no cap", type=_number, metavar="N")
    option("--tpm", f"tokens per minute per attendee{clear}", "no limit", type=_number, metavar="N")
    option("--event-requests", f"requests for the whole event, all attendees{clear}", "no budget",
           type=_number, metavar="N")  # fmt: skip
    option("--event-tokens", f"tokens for the whole event, all attendees{clear}", "no budget",
           type=_number, metavar="N")  # fmt: skip
    option("--daily-cost", f"USD per attendee and day{clear}", "no cap", type=_dollars, metavar="USD")
    option("--event-cost", f"USD for the whole event, all attendees{clear}", "no budget", type=_dollars, metavar="USD")
    option("--max-attendees", f"distinct attendee names{clear}", "no limit", type=_number, metavar="N")
    back = "" if creating else "; 'none' goes back to the default"
    option("--session-turns", f"turns kept per chat session (session_id){back}", "20", type=_number, metavar="N")
    option("--session-chars", f"characters kept per chat session{back}", "60000", type=_number, metavar="N")
    option("--alert-webhook", f"POST budget alerts here at 80 % and 100 % (https){clear}", "none",
           type=_url, metavar="URL")  # fmt: skip
    option("--description", "shown to attendees at /api/v1/event", metavar="TEXT")
    option("--organizer", "who runs the event", metavar="TEXT")
    keys_help = "every attendee needs a personal key (CODE/name refused); '--attendee-keys false' turns it off"
    option("--attendee-keys", keys_help, "off", type=_flag, nargs="?", const=True, metavar="true|false")
    if creating:
        option("--code", "the event code, 4-64 of A-Z a-z 0-9 _ -", "a generated secret")
    else:
        option("--active", "true or false: switch the event on or off", type=_flag, metavar="true|false")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m proxy.manage", description="Manage events and read their usage.")
    commands = parser.add_subparsers(dest="area", required=True, parser_class=_Parser)
    events = commands.add_parser("events", help="create, list, change and delete events")
    actions = events.add_subparsers(dest="action", required=True, parser_class=_Parser)

    def action(name: str, help_text: str, *, with_id: bool = True) -> argparse.ArgumentParser:
        sub = actions.add_parser(name, help=help_text, description=help_text)
        if with_id:
            sub.add_argument("id", metavar="ID", help="the event id (see 'events list')")
        sub.add_argument("--json", action="store_true", help="print one JSON object")
        return sub

    create = action("create", "Create an event; prints its code once.", with_id=False)
    _event_options(create, creating=True)
    action("list", "List all events.", with_id=False)
    action("show", "Show one event.")
    update = action("update", "Change the given fields of an event.")
    _event_options(update, creating=False)
    rotate = action("rotate-code", "Give an event a new code; the old one stops working.")
    rotate.add_argument("--code", help="the new code (default: a generated secret)")
    action("disable", "Switch an event off (reversible: 'events enable').")
    action("enable", "Switch an event back on.")
    delete = action("delete", "Delete an event and its code; its usage is kept for reports.")
    delete.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    share = action("share", "Let an organizer account see (viewer) or also change (organizer) an event; at once.")
    share.add_argument("name", metavar="NAME", help="the account's name (see 'organizers list'), or entra:<object id>")
    share.add_argument("--role", choices=("organizer", "viewer"), default="organizer", help="default: organizer")
    unshare = action("unshare", "Stop sharing an event with an account; at once.")
    unshare.add_argument("name", metavar="NAME")

    accounts = commands.add_parser("organizers", help="organizer accounts: add, list, remove, reset-key")
    account_actions = accounts.add_subparsers(dest="action", required=True, parser_class=_Parser)
    for verb, text in (
        ("add", "Add an account; prints its key once."),
        ("list", "List the accounts."),
        ("remove", "Remove an account; its key stops working."),
        ("reset-key", "Give an account a new key (printed once); the old one stops working."),
    ):
        sub = account_actions.add_parser(verb, help=text, description=text)
        if verb != "list":
            sub.add_argument("name", metavar="NAME", help="1-64 of A-Z a-z 0-9 . @ -, starting with a letter or digit")
        if verb == "add":
            sub.add_argument("--role", choices=ROLES, required=True, help="admin, organizer or viewer")
        sub.add_argument("--json", action="store_true", help="print one JSON object")

    log = commands.add_parser("audit", help="the audit log: who changed what, newest first")
    log.add_argument("event_id", metavar="EVENT_ID", nargs="?", help="one event's entries (default: all)")
    log.add_argument("--json", action="store_true", help="print one JSON object")

    attendees = commands.add_parser("attendees", help="list an event's attendees, block or unblock one, reset a key")
    verbs = attendees.add_subparsers(dest="action", required=True, parser_class=_Parser)
    listing = verbs.add_parser("list", help="names seen: first seen, requests, tokens, blocked")
    listing.add_argument("event_id", metavar="EVENT_ID")
    listing.add_argument("--json", action="store_true", help="print one JSON object")
    for verb, text in (
        ("block", "refuse this name's requests (403 attendee_blocked)"),
        ("unblock", "let it in again"),
        ("reset-key", "the name's personal key stops working, and the name can register again"),
    ):
        sub = verbs.add_parser(verb, help=text, description=f"{text[0].upper()}{text[1:]}; applies within a minute.")
        sub.add_argument("event_id", metavar="EVENT_ID")
        sub.add_argument("user", metavar="USER")
        sub.add_argument("--json", action="store_true", help="print one JSON object")

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

    doctor = commands.add_parser(
        "doctor",
        help="check a running proxy before an event",
        description="Health, storage, organizer key, each event's window and caps, and a one-token probe of "
        "every model it allows. One line per finding; exit code 1 when something needs fixing.",
    )
    doctor.add_argument("--url", default=DEFAULT_URL, help=f"the proxy, without /api (default: {DEFAULT_URL})")
    doctor.add_argument(
        "--event", metavar="EVENT_ID", help="check this event (default, without --models: every event not ended)"
    )
    doctor.add_argument("--models", type=_models, default=[], metavar="M1,M2", help="probe these deployments")
    return parser


def _fields(args: argparse.Namespace) -> dict[str, Any]:
    return {name: getattr(args, name) for name in sorted(organizer.EVENT_FIELDS) if hasattr(args, name)}


async def run(args: argparse.Namespace, store: EventStore, tables: Tables, settings: Settings) -> None:
    """Carry out one command and print its result."""
    if args.area == "organizers":
        accounts = AccountStore(tables, store.hasher, 0)
        if args.action == "list":
            _print(args, await accounts.list(), _accounts_table)
        elif args.action == "add":
            _print(args, await accounts.add(CLI, args.name, args.role), _account_key)
        elif args.action == "reset-key":
            _print(args, await accounts.reset_key(CLI, args.name), _account_key)
        else:
            _print(args, await accounts.remove(CLI, args.name), lambda data: f"Removed account {data['name']}.")
        return
    if args.area == "audit":
        _print(args, await organizer.audit_log(store, tables, CLI, args.event_id), _audit_table)
        return
    if args.area == "usage":
        data = await organizer.usage_report(store, tables, CLI, args.event_id, args.by)
        if args.csv:
            print(report_csv(data), end="")
        else:
            _print(args, data, _usage_table)
        return
    if args.area == "plan":
        prices = PriceTable.load(settings.model_prices)
        data = await organizer.plan_event(store, tables, prices, CLI, args.event_id, args.attendees, args.tpm)
        _print(args, data, _plan_text)
        return
    if args.area == "attendees":
        keys = PersonalKeys(tables, store, Roster(tables), 0)
        if args.action == "list":
            _print(args, await organizer.list_attendees(store, tables, CLI, args.event_id, keys), _attendees_table)
        elif args.action == "reset-key":
            _print(args, await organizer.reset_key(store, tables, CLI, keys, args.event_id, args.user), _key_reset)
        else:
            blocked = await organizer.set_blocked(store, CLI, args.event_id, args.user, args.action == "block")
            _print(args, blocked, _blocked)
        return
    action: str = args.action
    if action == "create":
        _print(args, await organizer.create_event(store, CLI, _fields(args)), _created)
    elif action == "list":
        _print(args, await organizer.list_events(store, CLI), _events_table)
    elif action == "show":
        event = await organizer.get_event(store, CLI, args.id)
        if args.json:
            _print(args, event, _details)
        else:  # the readable form adds what is used of the event's budgets
            budget = (await organizer.usage_report(store, tables, CLI, args.id)).get("budget")
            print(_details(event) + _budget_lines(budget))
    elif action in ("update", "disable", "enable"):
        fields = _fields(args) if action == "update" else {"active": action == "enable"}
        shown = _details if action == "update" else _switched
        _print(args, await organizer.update_event(store, CLI, args.id, fields), shown)
    elif action == "rotate-code":
        _print(args, await organizer.rotate_code(store, CLI, args.id, args.code), _rotated)
    elif action == "share":
        shared = await organizer.share_event(store, AccountStore(tables, store.hasher, 0), CLI, args.id,
                                             {"organizer": args.name, "role": args.role})  # fmt: skip
        _print(args, shared, _shares)
    elif action == "unshare":
        _print(args, await organizer.unshare_event(store, CLI, args.id, args.name), _shares)
    elif action == "delete":
        event = await organizer.get_event(store, CLI, args.id)
        if not args.yes and not _confirmed(f"Delete event '{event['name']}' ({event['id']})? Usage is kept. [y/N] "):
            raise _Refused("Not deleted: confirm, or pass --yes.")
        _print(args, await organizer.delete_event(store, CLI, args.id), lambda data: f"Deleted event {data['id']}.")


class _Refused(Exception):
    """The organizer did not confirm."""


def _confirmed(question: str) -> bool:
    if not sys.stdin.isatty():
        return False
    return input(question).strip().lower() in ("y", "yes")


# Rendering


def _print(args: argparse.Namespace, data: dict[str, Any], readable: Any) -> None:
    print(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode() if args.json else readable(data))


def _local(event: dict[str, Any], name: str) -> str:
    moment = datetime.fromisoformat(event[name]).astimezone(ZoneInfo(event["time_zone"]))
    return moment.strftime("%Y-%m-%d %H:%M")


def _table(header: Sequence[str] | None, rows: Sequence[Sequence[Any]], numeric: Sequence[bool]) -> str:
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


def _events_table(data: dict[str, Any]) -> str:
    if not data["data"]:
        return "No events yet: create one with 'python -m proxy.manage events create --help'."
    header = ("ID", "NAME", "START", "END", "TIME ZONE", "MODELS", "DAILY REQ", "ACTIVE")
    rows = [
        (e["id"], e["name"], _local(e, "start"), _local(e, "end"), e["time_zone"], ",".join(e["models"]),
         e["daily_requests"], "yes" if e["active"] else "no")
        for e in data["data"]
    ]  # fmt: skip
    return _table(header, rows, (False,) * 6 + (True, False))


def _details(event: dict[str, Any]) -> str:
    shown = {**event, "start": f"{event['start']}  ({_local(event, 'start')} {event['time_zone']})"}
    shown["end"] = f"{event['end']}  ({_local(event, 'end')} {event['time_zone']})"
    shown["models"] = ", ".join(event["models"])
    shown["active"] = "yes" if event["active"] else "no (switched off)"
    rows = [(f"{name}:", "-" if value in (None, "") else value) for name, value in shown.items() if name != "code"]
    return _table(None, rows, (False, False))


def _switched(event: dict[str, Any]) -> str:
    state = "on" if event["active"] else "off"
    return (
        f"Switched event {event['id']} {state}; this applies on every instance within a minute "
        f"(EVENT_CACHE_SECONDS).\n{_details(event)}"
    )


def _attendees_table(data: dict[str, Any]) -> str:
    limit = "" if data["max_attendees"] is None else f" of at most {data['max_attendees']}"
    if not data["data"]:
        return f"No attendees yet{limit}."
    header = ("USER", "FIRST SEEN", "REQUESTS", "TOTAL TOKENS", "BLOCKED", "PERSONAL KEY")
    rows = [(a["user"], a["first_seen"], a["requests"], a["total_tokens"], "yes" if a["blocked"] else "",
             "yes" if a["personal_key"] else "") for a in data["data"]]  # fmt: skip
    return f"{data['count']} attendees{limit}.\n" + _table(header, rows, (False, False, True, True, False, False))


def _accounts_table(data: dict[str, Any]) -> str:
    if not data["data"]:
        return "No organizer accounts yet: add one with 'python -m proxy.manage organizers add NAME --role ROLE'."
    rows = [(a["name"], a["role"], a["created_at"], a["created_by"]) for a in data["data"]]
    return _table(("NAME", "ROLE", "CREATED", "BY"), rows, (False,) * 4)


def _account_key(data: dict[str, Any]) -> str:
    return (
        f"Organizer account '{data['name']}' ({data['role']}).\nKey: {data['key']}\n"
        "The key is shown only now: give it to its owner, who signs in with it on /api/manage/portal or sends it "
        "as 'Authorization: Bearer <key>'."
    )


def _shares(data: dict[str, Any]) -> str:
    shares = ", ".join(f"{name} ({role})" for name, role in data["shared"].items()) or "nobody"
    return f"Event {data['event_id']}, owned by {data['owner'] or '-'}, is shared with: {shares}."


def _audit_table(data: dict[str, Any]) -> str:
    if not data["data"]:
        return "No audit entries."
    rows = [
        (e["time"], e["account"], e["action"], e["event_id"], e["target"],
         "; ".join(f"{name}: {_value(c['old'])} -> {_value(c['new'])}" for name, c in e["changes"].items()))
        for e in data["data"]
    ]  # fmt: skip
    return _table(("TIME", "ACCOUNT", "ACTION", "EVENT", "TARGET", "CHANGES"), rows, (False,) * 6)


def _value(value: Any) -> str:
    return "-" if value is None else orjson.dumps(value).decode() if isinstance(value, (dict, list)) else str(value)


def _key_reset(data: dict[str, Any]) -> str:
    if not data["reset"]:
        return f"'{data['user']}' has no personal key in event {data['event_id']}; nothing to reset."
    return (
        f"Reset the personal key of '{data['user']}' in event {data['event_id']}: it stops working on every instance "
        "within a minute, and the name can register again."
    )


def _blocked(data: dict[str, Any]) -> str:
    done = "Blocked" if data["blocked"] else "Unblocked"
    return f"{done} '{data['user']}' in event {data['event_id']}; this applies on every instance within a minute."


def _share_hint(code: str) -> str:
    return (
        f"Event code: {code}\n"
        f"Share {code}/your-name as the API key (each attendee puts their own name, e.g. {code}/alice).\n"
        "The code is shown only now; 'events rotate-code ID' makes a new one."
    )


def _created(data: dict[str, Any]) -> str:
    return f"Created event '{data['name']}' with id {data['id']}.\n{_details(data)}\n\n{_share_hint(data['code'])}"


def _rotated(data: dict[str, Any]) -> str:
    return f"New code for event {data['id']}; the old code stops working within a minute.\n{_share_hint(data['code'])}"


def _usage_table(data: dict[str, Any]) -> str:
    shown = (*FIGURES, "cached_tokens", "cost")
    header = (data["by"].upper(), *(name.upper().replace("_", " ") for name in FIGURES), "CACHED", "COST (USD)")

    def cells(row: dict[str, Any]) -> tuple[Any, ...]:
        return (*(row[name] for name in FIGURES), row["cached_tokens"], f"{row['cost']:.6f}")

    rows = [(row["key"], *cells(row)) for row in data["rows"]]
    rows.append(("TOTAL", *cells(data["totals"])))
    table = _table(header, rows, (False, *(True for _ in shown)))
    return table + _unpriced_line(data["totals"]) + _budget_lines(data.get("budget"))


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


def _budget_lines(figures: dict[str, Any] | None) -> str:
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


# Entry point


def _credential(settings: Settings) -> AsyncTokenCredential | None:
    if settings.storage_connection_string:
        return None
    from azure.identity.aio import DefaultAzureCredential

    if settings.client_id:
        return DefaultAzureCredential(managed_identity_client_id=settings.client_id)
    return DefaultAzureCredential()


async def _main(args: argparse.Namespace, settings: Settings) -> None:
    credential = _credential(settings)
    tables = Tables.create(settings, credential)
    try:
        # Without CODE_HASH_KEY all works but what touches a code (create, rotate-code): they say what to set.
        hasher = settings.hasher() if settings.code_hash_key else None
        await run(args, EventStore(tables, hasher, 0), tables, settings)
    finally:
        await tables.aclose()
        if credential is not None:
            await credential.close()


def _fail(code: int, message: str) -> NoReturn:
    print(f"error: {' '.join(message.split())}", file=sys.stderr)
    raise SystemExit(code)


def _doctor(args: argparse.Namespace) -> NoReturn:
    # The doctor talks HTTP only: it needs the organizer key, not the storage settings.
    try:
        key = cli_values().get("ORGANIZER_KEY", "").strip() or None
    except SettingsError as exc:
        _fail(2, str(exc))
    raise SystemExit(doctor.run(args.url, key, args.event, args.models))


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.area == "doctor":
        _doctor(args)
    try:
        settings = Settings.for_cli()
    except SettingsError as exc:
        _fail(2, f"{exc} (set it in the environment or in local.settings.json)")
    try:
        asyncio.run(_main(args, settings))
    except StorageUnavailable as exc:
        if isinstance(exc.__cause__, ClientAuthenticationError):
            _fail(1, "No Azure credential for Table Storage: run 'az login' (your account needs the "
                  "Storage Table Data Contributor role on the storage account).")  # fmt: skip
        if settings.storage_connection_string:
            _fail(1, "Table Storage cannot be reached at STORAGE_CONNECTION_STRING: is Azurite running ('make run')?")
        _fail(1, f"Table Storage cannot be reached at {settings.table_endpoint}: check the account name and network.")
    except ProxyError as exc:
        _fail(2 if exc.status < 500 else 1, exc.message)
    except SettingsError as exc:
        _fail(2, str(exc))
    except _Refused as exc:
        _fail(2, str(exc))
    except KeyboardInterrupt:
        _fail(130, "interrupted")


if __name__ == "__main__":
    main()
