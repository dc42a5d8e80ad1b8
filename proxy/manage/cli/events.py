"""The CLI's ``events`` commands: create, list, show, update, rotate-code, enable, disable, delete, share, unshare."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from proxy.manage import operations as organizer
from proxy.manage.cli.common import (
    Parser,
    Refused,
    budget_lines,
    dollars,
    flag,
    local,
    models,
    number,
    output,
    table,
    url,
)
from proxy.policy.accounts import CLI, AccountStore
from proxy.policy.events import DEFAULT_DAILY_REQUESTS, DEFAULT_MAX_TOKENS, DEFAULT_MODELS, EventStore
from proxy.storage.tables import Tables


def add_parsers(commands: argparse._SubParsersAction[Parser]) -> None:
    """The ``events`` command and its actions."""
    events = commands.add_parser("events", help="create, list, change and delete events")
    actions = events.add_subparsers(dest="action", required=True, parser_class=Parser)

    def action(name: str, help_text: str, *, with_id: bool = True) -> argparse.ArgumentParser:
        sub = actions.add_parser(name, help=help_text, description=help_text)
        if with_id:
            sub.add_argument("id", metavar="ID", help="the event id (see 'events list')")
        sub.add_argument("--json", action="store_true", help="print one JSON object")
        return sub

    create = action("create", "Create an event; prints its code once.", with_id=False)
    event_options(create, creating=True)
    action("list", "List all events.", with_id=False)
    action("show", "Show one event.")
    update = action("update", "Change the given fields of an event.")
    event_options(update, creating=False)
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


def event_options(parser: argparse.ArgumentParser, *, creating: bool) -> None:
    hide = argparse.SUPPRESS  # absent options are not sent, so an update changes only what is given

    def option(flag: str, help_text: str, default_text: str = "", **kwargs: Any) -> None:
        shown = f"{help_text} (default: {default_text})" if creating and default_text else help_text
        parser.add_argument(flag, default=hide, help=shown, **kwargs)

    option("--name", "the event's name", required=creating)
    option("--start", "ISO 8601 with an offset, e.g. 2026-11-21T09:00:00+01:00", metavar="ISO", required=creating)
    option("--end", "ISO 8601 with an offset, after --start", metavar="ISO", required=creating)
    option("--time-zone", "IANA time zone for display, e.g. Europe/Paris", "UTC", metavar="TZ")
    option("--models", "comma-separated deployment names", ",".join(DEFAULT_MODELS), type=models, metavar="M1,M2")
    option("--max-tokens", "cap on max_tokens per request", str(DEFAULT_MAX_TOKENS), type=number, metavar="N")
    clear = "" if creating else "; 'none' removes the cap"
    option("--daily-requests", f"requests per attendee and day (to midnight in --time-zone){clear}",
           str(DEFAULT_DAILY_REQUESTS), type=number, metavar="N")  # fmt: skip
    option("--daily-tokens", f"tokens per attendee and day{clear}", "no cap", type=number, metavar="N")
    option("--tpm", f"tokens per minute per attendee{clear}", "no limit", type=number, metavar="N")
    option("--event-requests", f"requests for the whole event, all attendees{clear}", "no budget",
           type=number, metavar="N")  # fmt: skip
    option("--event-tokens", f"tokens for the whole event, all attendees{clear}", "no budget",
           type=number, metavar="N")  # fmt: skip
    option("--daily-cost", f"USD per attendee and day{clear}", "no cap", type=dollars, metavar="USD")
    option("--event-cost", f"USD for the whole event, all attendees{clear}", "no budget", type=dollars, metavar="USD")
    option("--max-attendees", f"distinct attendee names{clear}", "no limit", type=number, metavar="N")
    back = "" if creating else "; 'none' goes back to the default"
    option("--session-turns", f"turns kept per chat session (session_id){back}", "20", type=number, metavar="N")
    option("--session-chars", f"characters kept per chat session{back}", "60000", type=number, metavar="N")
    option("--alert-webhook", f"POST budget alerts here at 80 %% and 100 %% (https){clear}", "none",
           type=url, metavar="URL")  # fmt: skip
    option("--description", "shown to attendees at /api/v1/event", metavar="TEXT")
    option("--organizer", "who runs the event", metavar="TEXT")
    keys_help = "every attendee needs a personal key (CODE/name refused); '--attendee-keys false' turns it off"
    option("--attendee-keys", keys_help, "off", type=flag, nargs="?", const=True, metavar="true|false")
    if creating:
        option("--code", "the event code, 4-64 of A-Z a-z 0-9 _ -", "a generated secret")
    else:
        option("--active", "true or false: switch the event on or off", type=flag, metavar="true|false")


def _fields(args: argparse.Namespace) -> dict[str, Any]:
    return {name: getattr(args, name) for name in sorted(organizer.EVENT_FIELDS) if hasattr(args, name)}


async def run(args: argparse.Namespace, store: EventStore, tables: Tables) -> None:
    """Carry out one ``events`` command and print its result."""
    action: str = args.action
    if action == "create":
        output(args, await organizer.create_event(store, CLI, _fields(args)), _created)
    elif action == "list":
        output(args, await organizer.list_events(store, CLI), _events_table)
    elif action == "show":
        event = await organizer.get_event(store, CLI, args.id)
        if args.json:
            output(args, event, _details)
        else:  # the readable form adds what is used of the event's budgets
            budget = (await organizer.usage_report(store, tables, CLI, args.id)).get("budget")
            print(_details(event) + budget_lines(budget))
    elif action in ("update", "disable", "enable"):
        fields = _fields(args) if action == "update" else {"active": action == "enable"}
        shown = _details if action == "update" else _switched
        output(args, await organizer.update_event(store, CLI, args.id, fields), shown)
    elif action == "rotate-code":
        output(args, await organizer.rotate_code(store, CLI, args.id, args.code), _rotated)
    elif action == "share":
        shared = await organizer.share_event(store, AccountStore(tables, store.hasher, 0), CLI, args.id,
                                             {"organizer": args.name, "role": args.role})  # fmt: skip
        output(args, shared, _shares)
    elif action == "unshare":
        output(args, await organizer.unshare_event(store, CLI, args.id, args.name), _shares)
    elif action == "delete":
        event = await organizer.get_event(store, CLI, args.id)
        if not args.yes and not _confirmed(f"Delete event '{event['name']}' ({event['id']})? Usage is kept. [y/N] "):
            raise Refused("Not deleted: confirm, or pass --yes.")
        output(args, await organizer.delete_event(store, CLI, args.id), lambda data: f"Deleted event {data['id']}.")


def _confirmed(question: str) -> bool:
    if not sys.stdin.isatty():
        return False
    return input(question).strip().lower() in ("y", "yes")


def _events_table(data: dict[str, Any]) -> str:
    if not data["data"]:
        return "No events yet: create one with 'python -m proxy.manage events create --help'."
    header = ("ID", "NAME", "START", "END", "TIME ZONE", "MODELS", "DAILY REQ", "ACTIVE")
    rows = [
        (e["id"], e["name"], local(e, "start"), local(e, "end"), e["time_zone"], ",".join(e["models"]),
         e["daily_requests"], "yes" if e["active"] else "no")
        for e in data["data"]
    ]  # fmt: skip
    return table(header, rows, (False,) * 6 + (True, False))


def _details(event: dict[str, Any]) -> str:
    shown = {**event, "start": f"{event['start']}  ({local(event, 'start')} {event['time_zone']})"}
    shown["end"] = f"{event['end']}  ({local(event, 'end')} {event['time_zone']})"
    shown["models"] = ", ".join(event["models"])
    shown["active"] = "yes" if event["active"] else "no (switched off)"
    rows = [(f"{name}:", "-" if value in (None, "") else value) for name, value in shown.items() if name != "code"]
    return table(None, rows, (False, False))


def _switched(event: dict[str, Any]) -> str:
    state = "on" if event["active"] else "off"
    return (
        f"Switched event {event['id']} {state}; this applies on every instance within a minute "
        f"(EVENT_CACHE_SECONDS).\n{_details(event)}"
    )


def _shares(data: dict[str, Any]) -> str:
    shares = ", ".join(f"{name} ({role})" for name, role in data["shared"].items()) or "nobody"
    return f"Event {data['event_id']}, owned by {data['owner'] or '-'}, is shared with: {shares}."


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
