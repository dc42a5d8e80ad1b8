"""The CLI's entry point: the parser, which command group runs a command, and how errors end the process."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from typing import NoReturn

from azure.core.credentials_async import AsyncTokenCredential
from azure.core.exceptions import ClientAuthenticationError

from proxy.config.settings import Settings, SettingsError, cli_values
from proxy.errors import ProxyError, StorageUnavailable
from proxy.manage import doctor
from proxy.manage.cli import events, people, reports
from proxy.manage.cli.common import Parser, Refused, models
from proxy.manage.doctor import DEFAULT_URL
from proxy.policy.events import EventStore
from proxy.storage.tables import Tables


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m proxy.manage", description="Manage events and read their usage.")
    commands = parser.add_subparsers(dest="area", required=True, parser_class=Parser)
    events.add_parsers(commands)
    people.add_parsers(commands)
    reports.add_parsers(commands)
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
    doctor.add_argument("--models", type=models, default=[], metavar="M1,M2", help="probe these deployments")
    return parser


async def run(args: argparse.Namespace, store: EventStore, tables: Tables, settings: Settings) -> None:
    """Carry out one command and print its result."""
    if args.area in people.AREAS:
        await people.run(args, store, tables)
    elif args.area in reports.AREAS:
        await reports.run(args, store, tables, settings)
    else:
        await events.run(args, store, tables)


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
    except Refused as exc:
        _fail(2, str(exc))
    except KeyboardInterrupt:
        _fail(130, "interrupted")
