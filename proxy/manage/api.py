"""The organizer HTTP API under ``/api/manage/``: authentication, routing, rendering.

Every route needs ``Authorization: Bearer <key>``: ``ORGANIZER_KEY`` (an
admin, compared in constant time) or an organizer account's key
(``proxy.policy.accounts``: its role decides what it sees and may change; an event it
may not see is 404); a missing or wrong key is 401 ``unauthorized``.
In Azure, an organizer signed in with Entra ID through App Service
authentication is let in too, only where the app is told to trust the
platform's header (``proxy.config.principal``). Without an
``ORGANIZER_KEY`` setting (nor that sign-in) the API is off (503 ``organizer_api_disabled``).
The key is never logged nor echoed. The operations themselves live in
``proxy.manage.operations``, shared with the CLI, so both answer with the same JSON.

- ``POST /events`` (201, the event with its code, shown once), ``GET /events``
- ``GET``/``PATCH``/``DELETE /events/{id}``
- ``POST /events/{id}/rotate-code`` (optional body ``{"code": "..."}``)
- ``GET /events/{id}/usage?by=user|model|day`` (JSON, or CSV with
  ``Accept: text/csv``); answers for deleted events whose usage was kept.
- ``GET /events/{id}/plan?attendees=N&tpm=MODEL=TPM``: the pre-event plan (``proxy.manage.plan``)
- ``GET /events/{id}/attendees``; ``PATCH /events/{id}/attendees/{user}`` with
  ``{"blocked": true|false}``; ``POST /events/{id}/attendees/{user}/reset-key``
  (the name's personal key stops working, ``proxy.policy.keys``)
- ``POST /events/{id}/share`` with ``{"organizer", "role"}``; ``DELETE /events/{id}/share/{name}``
- ``POST``/``GET /organizers``, ``DELETE /organizers/{name}``, ``POST /organizers/{name}/reset-key``
  (admins only; the key is shown once)
- ``GET /audit?event=ID``: the audit log (``proxy.policy.audit``), newest first
- ``GET /openapi.json``: the schema of all of the above (``proxy.manage.models``)
- ``POST /probe``: does each model answer? (``proxy.manage.probe``, for the doctor)
"""

from __future__ import annotations

import hmac
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from proxy.config.prices import PriceTable
from proxy.config.principal import PORTAL_HEADER, read_principal
from proxy.config.settings import Settings
from proxy.edge.handlers import answering
from proxy.errors import InvalidRequest, MethodNotAllowed, OrganizerApiDisabled, Unauthorized
from proxy.ledger.reports import report_csv
from proxy.manage import operations as organizer
from proxy.manage.models import AttendeePatch, OrganizerCreate, RotateCode, validated
from proxy.manage.openapi import openapi
from proxy.policy.accounts import ORGANIZER_KEY, AccountStore, Actor, check_role, require_admin
from proxy.policy.events import EventStore
from proxy.policy.keys import PersonalKeys
from proxy.storage.tables import Tables
from proxy.upstream.payload import read_json

_JSON = "application/json"


class OrganizerApi:
    """The handlers of ``/api/manage/...``, on the worker's tables and event store."""

    def __init__(self, settings: Settings, tables: Tables, events: EventStore, keys: PersonalKeys) -> None:
        self.settings, self.tables, self.store, self.keys = settings, tables, events, keys
        self.accounts = AccountStore(tables, settings.hasher(), settings.event_cache_seconds)
        self.prices = PriceTable.load(settings.model_prices)
        self._schema: dict[str, Any] | None = None  # built on first request: 44 ms at import (cold start)

    @answering
    async def events(self, request: Request) -> Response:
        actor = await self.authorize(request)
        if request.method == "POST":
            fields = await read_json(request, self.settings.max_request_bytes)
            return _json(await organizer.create_event(self.store, actor, fields), status=201)
        if request.method == "GET":
            return _json(await organizer.list_events(self.store, actor))
        raise _no_method(request, ["GET", "POST"])

    @answering
    async def event(self, request: Request, event_id: str) -> Response:
        actor = await self.authorize(request)
        if request.method == "GET":
            return _json(await organizer.get_event(self.store, actor, event_id))
        if request.method == "PATCH":
            fields = await read_json(request, self.settings.max_request_bytes)
            return _json(await organizer.update_event(self.store, actor, event_id, fields))
        if request.method == "DELETE":
            return _json(await organizer.delete_event(self.store, actor, event_id))
        raise _no_method(request, ["GET", "PATCH", "DELETE"])

    @answering
    async def rotate_code(self, request: Request, event_id: str) -> Response:
        actor = await self.authorize(request)
        fields: dict[str, Any] = {}
        if _has_body(request):
            fields = await read_json(request, self.settings.max_request_bytes)
        body = validated(RotateCode, fields)
        return _json(await organizer.rotate_code(self.store, actor, event_id, body.code))

    @answering
    async def usage(self, request: Request, event_id: str) -> Response:
        actor = await self.authorize(request)
        by = request.query_params.get("by", "user")
        data = await organizer.usage_report(self.store, self.tables, actor, event_id, by)
        if "text/csv" in request.headers.get("accept", ""):
            filename = f"{data['event_id']}-usage-by-{data['by']}.csv"
            return Response(
                report_csv(data),
                media_type="text/csv",
                headers={"content-disposition": f'attachment; filename="{filename}"'},
            )
        return _json(data)

    @answering
    async def plan(self, request: Request, event_id: str) -> Response:
        """``GET /events/{id}/plan?attendees=N&tpm=MODEL=TPM``: the pre-event plan (``proxy.manage.plan``)."""
        actor = await self.authorize(request)
        query = request.query_params
        unknown = sorted(set(query) - {"attendees", "tpm"})
        if unknown:
            raise InvalidRequest(f"Unknown parameter '{unknown[0]}'. Known: attendees, tpm.", param=unknown[0])
        data = await organizer.plan_event(
            self.store, self.tables, self.prices, actor, event_id, query.get("attendees"), query.getlist("tpm")
        )
        return _json(data)

    @answering
    async def attendees(self, request: Request, event_id: str) -> Response:
        actor = await self.authorize(request)
        return _json(await organizer.list_attendees(self.store, self.tables, actor, event_id, self.keys))

    @answering
    async def attendee(self, request: Request, event_id: str, user: str) -> Response:
        """``PATCH {"blocked": true|false}``: block or unblock one name."""
        actor = await self.authorize(request)
        body = validated(AttendeePatch, await read_json(request, self.settings.max_request_bytes))
        return _json(await organizer.set_blocked(self.store, actor, event_id, user, body.blocked))

    @answering
    async def reset_key(self, request: Request, event_id: str, user: str) -> Response:
        """``POST``: the name's personal key stops working, and the name can be registered again."""
        actor = await self.authorize(request)
        return _json(await organizer.reset_key(self.store, self.tables, actor, self.keys, event_id, user))

    @answering
    async def share(self, request: Request, event_id: str) -> Response:
        """``POST {"organizer": NAME, "role": "organizer"|"viewer"}``: share the event; at once everywhere."""
        actor = await self.authorize(request)
        fields = await read_json(request, self.settings.max_request_bytes)
        return _json(await organizer.share_event(self.store, self.accounts, actor, event_id, fields))

    @answering
    async def unshare(self, request: Request, event_id: str, name: str) -> Response:
        """``DELETE``: stop sharing the event with ``name``."""
        actor = await self.authorize(request)
        return _json(await organizer.unshare_event(self.store, actor, event_id, name))

    @answering
    async def organizers(self, request: Request) -> Response:
        """``POST {"name", "role"}`` (201, the key shown once), ``GET``: organizer accounts, for admins."""
        actor = await self.authorize(request)
        if request.method == "POST":
            body = validated(OrganizerCreate, await read_json(request, self.settings.max_request_bytes))
            return _json(await self.accounts.add(actor, body.name, body.role), status=201)
        if request.method == "GET":
            require_admin(actor, "list organizer accounts")
            return _json(await self.accounts.list())
        raise _no_method(request, ["GET", "POST"])

    @answering
    async def organizer_account(self, request: Request, name: str) -> Response:
        """``DELETE``: remove an account; its key stops working."""
        actor = await self.authorize(request)
        return _json(await self.accounts.remove(actor, name))

    @answering
    async def organizer_reset_key(self, request: Request, name: str) -> Response:
        """``POST``: a new key for an account (shown once); the old one stops working."""
        actor = await self.authorize(request)
        return _json(await self.accounts.reset_key(actor, name))

    @answering
    async def audit(self, request: Request) -> Response:
        """``GET /audit?event=ID``: the audit log, newest first."""
        actor = await self.authorize(request)
        query = request.query_params
        unknown = sorted(set(query) - {"event"})
        if unknown:
            raise InvalidRequest(f"Unknown parameter '{unknown[0]}'. Known: event.", param=unknown[0])
        return _json(await organizer.audit_log(self.store, self.tables, actor, query.get("event")))

    @answering
    async def openapi(self, request: Request) -> Response:
        """``GET /openapi.json``: this API's schema, from the models that validate it (``proxy.manage.models``)."""
        await self.authorize(request)
        if self._schema is None:
            self._schema = openapi()
        return _json(self._schema)

    async def authorize(self, request: Request) -> Actor:
        """Who calls: the organizer key (an admin), an organizer account's key (``proxy.policy.accounts``, one point
        read
        per key and cache lifetime), or an organizer signed in with Entra ID when the app trusts the platform's
        header (its role from the settings that list it, ``proxy.config.principal``)."""
        expected = self.settings.organizer_key
        sign_in = self.settings.organizer_sign_in
        if not expected and not sign_in.trusted:
            raise OrganizerApiDisabled(
                "The organizer API is off: set the ORGANIZER_KEY app setting (a Key Vault reference in Azure) "
                "and restart the app, or use 'python -m proxy.manage' instead."
            )
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        given = given.strip()
        if scheme.lower() == "bearer" and given:
            if expected and hmac.compare_digest(given.encode(), expected.encode()):
                return Actor(ORGANIZER_KEY, "admin")
            account = await self.accounts.by_key(given)
            if account is not None:
                return account
        principal = read_principal(request.headers) if sign_in.trusted else None  # proxy.config.principal
        if principal is not None:
            if request.headers.get(PORTAL_HEADER) != "1":
                raise Unauthorized(f"Signed in with Entra ID, call from the organizer page (it sends {PORTAL_HEADER}).")
            role = sign_in.role(principal)
            if role is not None:
                return Actor(f"entra:{principal.object_id.lower()}", check_role(role))
            raise Unauthorized(
                f"The Entra ID account {principal.object_id} is not an organizer of this app: add its object id to "
                "ORGANIZER_ENTRA_OBJECT_IDS, or one of its groups to ORGANIZER_ENTRA_GROUP_IDS (or to the "
                "ORGANIZER_ENTRA_ADMIN_... or ORGANIZER_ENTRA_VIEWER_... settings, for those roles)."
            )
        raise Unauthorized("Send the organizer key as 'Authorization: Bearer <ORGANIZER_KEY>'.")


def _json(data: dict[str, Any], status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type=_JSON)


def _has_body(request: Request) -> bool:
    length = request.headers.get("content-length")
    if length is None:
        return "transfer-encoding" in request.headers
    return length.strip() != "0"


def _no_method(request: Request, allowed: list[str]) -> MethodNotAllowed:
    return MethodNotAllowed(request.method, request.url.path, allowed)
