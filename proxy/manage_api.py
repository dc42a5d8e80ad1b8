"""The organizer HTTP API under ``/api/manage/``: authentication, routing, rendering.

Every route needs ``Authorization: Bearer <ORGANIZER_KEY>``, compared in
constant time; a missing or wrong key is 401 ``unauthorized``.
In Azure, an organizer signed in with Entra ID through App Service
authentication is let in too, only where the app is told to trust the
platform's header (``proxy.principal``). Without an
``ORGANIZER_KEY`` setting (nor that sign-in) the API is off (503 ``organizer_api_disabled``).
The key is never logged nor echoed. The operations themselves live in
``proxy.organizer``, shared with the CLI, so both answer with the same JSON.

- ``POST /events`` (201, the event with its code, shown once), ``GET /events``
- ``GET``/``PATCH``/``DELETE /events/{id}``
- ``POST /events/{id}/rotate-code`` (optional body ``{"code": "..."}``)
- ``GET /events/{id}/usage?by=user|model|day`` (JSON, or CSV with
  ``Accept: text/csv``); answers for deleted events whose usage was kept.
- ``GET /events/{id}/plan?attendees=N&tpm=MODEL=TPM``: the pre-event plan (``proxy.plan``)
- ``GET /events/{id}/attendees``; ``PATCH /events/{id}/attendees/{user}`` with
  ``{"blocked": true|false}``; ``POST /events/{id}/attendees/{user}/reset-key``
  (the name's personal key stops working, ``proxy.keys``)
- ``GET /openapi.json``: the schema of all of the above (``proxy.models``)
- ``POST /probe``: does each model answer? (``proxy.probe``, for the doctor)
"""

from __future__ import annotations

import hmac
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from proxy import organizer
from proxy.errors import InvalidRequest, MethodNotAllowed, OrganizerApiDisabled, Unauthorized
from proxy.events import EventStore
from proxy.handlers import answering
from proxy.keys import PersonalKeys
from proxy.models import AttendeePatch, RotateCode, openapi, validated
from proxy.payload import read_json
from proxy.prices import PriceTable
from proxy.principal import PORTAL_HEADER, read_principal
from proxy.settings import Settings
from proxy.storage import Tables
from proxy.usage import report_csv

_JSON = "application/json"


class OrganizerApi:
    """The handlers of ``/api/manage/...``, on the worker's tables and event store."""

    def __init__(self, settings: Settings, tables: Tables, events: EventStore, keys: PersonalKeys) -> None:
        self.settings, self.tables, self.store, self.keys = settings, tables, events, keys
        self.prices = PriceTable.load(settings.model_prices)
        self._schema = openapi()

    @answering
    async def events(self, request: Request) -> Response:
        self.authorize(request)
        if request.method == "POST":
            fields = await read_json(request, self.settings.max_request_bytes)
            return _json(await organizer.create_event(self.store, fields), status=201)
        if request.method == "GET":
            return _json(await organizer.list_events(self.store))
        raise _no_method(request, ["GET", "POST"])

    @answering
    async def event(self, request: Request, event_id: str) -> Response:
        self.authorize(request)
        if request.method == "GET":
            return _json(await organizer.get_event(self.store, event_id))
        if request.method == "PATCH":
            fields = await read_json(request, self.settings.max_request_bytes)
            return _json(await organizer.update_event(self.store, event_id, fields))
        if request.method == "DELETE":
            return _json(await organizer.delete_event(self.store, event_id))
        raise _no_method(request, ["GET", "PATCH", "DELETE"])

    @answering
    async def rotate_code(self, request: Request, event_id: str) -> Response:
        self.authorize(request)
        fields: dict[str, Any] = {}
        if _has_body(request):
            fields = await read_json(request, self.settings.max_request_bytes)
        body = validated(RotateCode, fields)
        return _json(await organizer.rotate_code(self.store, event_id, body.code))

    @answering
    async def usage(self, request: Request, event_id: str) -> Response:
        self.authorize(request)
        data = await organizer.usage_report(self.store, self.tables, event_id, request.query_params.get("by", "user"))
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
        """``GET /events/{id}/plan?attendees=N&tpm=MODEL=TPM``: the pre-event plan (``proxy.plan``)."""
        self.authorize(request)
        query = request.query_params
        unknown = sorted(set(query) - {"attendees", "tpm"})
        if unknown:
            raise InvalidRequest(f"Unknown parameter '{unknown[0]}'. Known: attendees, tpm.", param=unknown[0])
        data = await organizer.plan_event(
            self.store, self.tables, self.prices, event_id, query.get("attendees"), query.getlist("tpm")
        )
        return _json(data)

    @answering
    async def attendees(self, request: Request, event_id: str) -> Response:
        self.authorize(request)
        return _json(await organizer.list_attendees(self.store, self.tables, event_id, self.keys))

    @answering
    async def attendee(self, request: Request, event_id: str, user: str) -> Response:
        """``PATCH {"blocked": true|false}``: block or unblock one name."""
        self.authorize(request)
        body = validated(AttendeePatch, await read_json(request, self.settings.max_request_bytes))
        return _json(await organizer.set_blocked(self.store, event_id, user, body.blocked))

    @answering
    async def reset_key(self, request: Request, event_id: str, user: str) -> Response:
        """``POST``: the name's personal key stops working, and the name can be registered again."""
        self.authorize(request)
        return _json(await organizer.reset_key(self.store, self.keys, event_id, user))

    @answering
    async def openapi(self, request: Request) -> Response:
        """``GET /openapi.json``: this API's schema, from the models that validate it (``proxy.models``)."""
        self.authorize(request)
        return _json(self._schema)

    def authorize(self, request: Request) -> None:
        """The organizer key, or an organizer signed in with Entra ID when the app trusts the platform's header."""
        expected = self.settings.organizer_key
        sign_in = self.settings.organizer_sign_in
        if not expected and not sign_in.trusted:
            raise OrganizerApiDisabled(
                "The organizer API is off: set the ORGANIZER_KEY app setting (a Key Vault reference in Azure) "
                "and restart the app, or use 'python -m proxy.manage' instead."
            )
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if expected and scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), expected.encode()):
            return
        principal = read_principal(request.headers) if sign_in.trusted else None  # proxy.principal
        if principal is not None:
            if request.headers.get(PORTAL_HEADER) != "1":
                raise Unauthorized(f"Signed in with Entra ID, call from the organizer page (it sends {PORTAL_HEADER}).")
            if sign_in.admits(principal):
                return
            raise Unauthorized(
                f"The Entra ID account {principal.object_id} is not an organizer of this app: add its object id to "
                "ORGANIZER_ENTRA_OBJECT_IDS, or one of its groups to ORGANIZER_ENTRA_GROUP_IDS."
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
