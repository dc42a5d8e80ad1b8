"""Placeholder replaced by the organizer API (issue 4)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from proxy.events import EventStore
from proxy.settings import Settings
from proxy.storage import Tables


class OrganizerApi:
    def __init__(self, settings: Settings, tables: Tables, events: EventStore) -> None:
        self.settings, self.tables, self.store = settings, tables, events

    async def events(self, request: Request) -> Response:
        return Response(status_code=501)

    async def event(self, request: Request, event_id: str) -> Response:
        return Response(status_code=501)

    async def rotate_code(self, request: Request, event_id: str) -> Response:
        return Response(status_code=501)

    async def usage(self, request: Request, event_id: str) -> Response:
        return Response(status_code=501)
