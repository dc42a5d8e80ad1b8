"""The CLI's commands about people: ``organizers`` (accounts and their keys), ``audit`` (who changed what),
``attendees`` (list, block, unblock, reset a personal key)."""

from __future__ import annotations

import argparse
from typing import Any

import orjson

from proxy.manage import operations as organizer
from proxy.manage.cli.common import Parser, output, table
from proxy.policy.accounts import CLI, ROLES, AccountStore
from proxy.policy.attendees import Roster
from proxy.policy.events import EventStore
from proxy.policy.keys import PersonalKeys
from proxy.storage.tables import Tables

AREAS = ("organizers", "audit", "attendees")


def add_parsers(commands: argparse._SubParsersAction[Parser]) -> None:
    """The ``organizers``, ``audit`` and ``attendees`` commands."""
    accounts = commands.add_parser("organizers", help="organizer accounts: add, list, remove, reset-key")
    account_actions = accounts.add_subparsers(dest="action", required=True, parser_class=Parser)
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
    verbs = attendees.add_subparsers(dest="action", required=True, parser_class=Parser)
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


async def run(args: argparse.Namespace, store: EventStore, tables: Tables) -> None:
    """Carry out one ``organizers``, ``audit`` or ``attendees`` command and print its result."""
    if args.area == "organizers":
        accounts = AccountStore(tables, store.hasher, 0)
        if args.action == "list":
            output(args, await accounts.list(), _accounts_table)
        elif args.action == "add":
            output(args, await accounts.add(CLI, args.name, args.role), _account_key)
        elif args.action == "reset-key":
            output(args, await accounts.reset_key(CLI, args.name), _account_key)
        else:
            output(args, await accounts.remove(CLI, args.name), lambda data: f"Removed account {data['name']}.")
    elif args.area == "audit":
        output(args, await organizer.audit_log(store, tables, CLI, args.event_id), _audit_table)
    else:
        keys = PersonalKeys(tables, store, Roster(tables), 0)
        if args.action == "list":
            output(args, await organizer.list_attendees(store, tables, CLI, args.event_id, keys), _attendees_table)
        elif args.action == "reset-key":
            output(args, await organizer.reset_key(store, tables, CLI, keys, args.event_id, args.user), _key_reset)
        else:
            blocked = await organizer.set_blocked(store, CLI, args.event_id, args.user, args.action == "block")
            output(args, blocked, _blocked)


def _attendees_table(data: dict[str, Any]) -> str:
    limit = "" if data["max_attendees"] is None else f" of at most {data['max_attendees']}"
    if not data["data"]:
        return f"No attendees yet{limit}."
    header = ("USER", "FIRST SEEN", "REQUESTS", "TOTAL TOKENS", "BLOCKED", "PERSONAL KEY")
    rows = [(a["user"], a["first_seen"], a["requests"], a["total_tokens"], "yes" if a["blocked"] else "",
             "yes" if a["personal_key"] else "") for a in data["data"]]  # fmt: skip
    return f"{data['count']} attendees{limit}.\n" + table(header, rows, (False, False, True, True, False, False))


def _accounts_table(data: dict[str, Any]) -> str:
    if not data["data"]:
        return "No organizer accounts yet: add one with 'python -m proxy.manage organizers add NAME --role ROLE'."
    rows = [(a["name"], a["role"], a["created_at"], a["created_by"]) for a in data["data"]]
    return table(("NAME", "ROLE", "CREATED", "BY"), rows, (False,) * 4)


def _account_key(data: dict[str, Any]) -> str:
    return (
        f"Organizer account '{data['name']}' ({data['role']}).\nKey: {data['key']}\n"
        "The key is shown only now: give it to its owner, who signs in with it on /api/manage/portal or sends it "
        "as 'Authorization: Bearer <key>'."
    )


def _audit_table(data: dict[str, Any]) -> str:
    if not data["data"]:
        return "No audit entries."
    rows = [
        (e["time"], e["account"], e["action"], e["event_id"], e["target"],
         "; ".join(f"{name}: {_value(c['old'])} -> {_value(c['new'])}" for name, c in e["changes"].items()))
        for e in data["data"]
    ]  # fmt: skip
    return table(("TIME", "ACCOUNT", "ACTION", "EVENT", "TARGET", "CHANGES"), rows, (False,) * 6)


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
