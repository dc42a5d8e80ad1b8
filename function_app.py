"""Azure Functions entry point: registers the HTTP routes and hands each to ``proxy``.

Python v2 programming model with the HTTP streams extension, so answers stream
chunk by chunk (needs ``PYTHON_ENABLE_INIT_INDEXING=1``). A timer-triggered
function gives back every 5 minutes the daily slots of requests whose worker was
killed before they settled, and another every hour deletes the chat sessions
past their time to live. The services are created once per worker, when this
module is imported; a missing setting fails here, at cold start, with a message
that names it. Locally the real Python worker runs this module behind the host
emulator (``devtools/funchost/host.py``), as in Azure.
"""

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import azure.functions as func
from azurefunctions.extensions.http.fastapi import Request, Response, StreamingResponse

from proxy.config.collector import settle_collector
from proxy.config.settings import Settings
from proxy.conversations.sessions import purge_expired
from proxy.edge.handlers import Proxy
from proxy.edge.pages import Pages
from proxy.edge.registration import Registration
from proxy.ledger.reconcile import RECONCILE_SCHEDULE, reconcile
from proxy.manage.api import OrganizerApi
from proxy.manage.probe import ProbeApi

settings = Settings.from_env()
proxy = Proxy.from_settings(settings)
registration = Registration(proxy)
organizer = OrganizerApi(settings, proxy.tables, proxy.events, proxy.keys)
pages = Pages(entra_sign_in=settings.organizer_sign_in.trusted, github_sign_in=registration.github)

app = func.FunctionApp(http_auth_level=func.AuthLevel.ANONYMOUS)

Handler = Callable[..., Awaitable[Response]]

# (function name, route under the "api" prefix, methods, handler)
ROUTES: list[tuple[str, str, list[str], Handler]] = [
    ("chat_completions", "v1/chat/completions", ["POST"], proxy.chat),
    ("embeddings", "v1/embeddings", ["POST"], proxy.embeddings),
    ("models", "v1/models", ["GET"], proxy.models),
    ("event", "v1/event", ["GET"], proxy.event_info),
    ("responses", "v1/responses", ["POST"], proxy.create_response),
    ("response", "v1/responses/{response_id}", ["GET", "DELETE"], proxy.stored_response),
    ("response_input_items", "v1/responses/{response_id}/input_items", ["GET"], proxy.response_input_items),
    ("session", "v1/sessions/{session_id}", ["DELETE"], proxy.forget_session),
    ("keys", "v1/keys", ["POST"], registration.register),
    ("azure_responses", "openai/responses", ["POST"], proxy.create_response),
    ("azure_response", "openai/responses/{response_id}", ["GET", "DELETE"], proxy.stored_response),
    ("azure_response_input_items", "openai/responses/{response_id}/input_items", ["GET"], proxy.response_input_items),
    ("azure_v1_responses", "v1/openai/responses", ["POST"], proxy.create_response),
    ("azure_v1_response", "v1/openai/responses/{response_id}", ["GET", "DELETE"], proxy.stored_response),
    (
        "azure_v1_response_input_items",
        "v1/openai/responses/{response_id}/input_items",
        ["GET"],
        proxy.response_input_items,
    ),
    ("azure_chat_completions", "openai/deployments/{deployment}/chat/completions", ["POST"], proxy.chat),
    ("azure_embeddings", "openai/deployments/{deployment}/embeddings", ["POST"], proxy.embeddings),
    ("azure_v1_chat_completions", "v1/openai/deployments/{deployment}/chat/completions", ["POST"], proxy.chat),
    ("azure_v1_embeddings", "v1/openai/deployments/{deployment}/embeddings", ["POST"], proxy.embeddings),
    ("health", "health", ["GET"], proxy.health),
    ("manage_events", "manage/events", ["GET", "POST"], organizer.events),
    ("manage_event", "manage/events/{event_id}", ["GET", "PATCH", "DELETE"], organizer.event),
    ("manage_rotate_code", "manage/events/{event_id}/rotate-code", ["POST"], organizer.rotate_code),
    ("manage_usage", "manage/events/{event_id}/usage", ["GET"], organizer.usage),
    ("manage_plan", "manage/events/{event_id}/plan", ["GET"], organizer.plan),
    ("manage_attendees", "manage/events/{event_id}/attendees", ["GET"], organizer.attendees),
    ("manage_attendee", "manage/events/{event_id}/attendees/{user}", ["PATCH"], organizer.attendee),
    ("manage_reset_key", "manage/events/{event_id}/attendees/{user}/reset-key", ["POST"], organizer.reset_key),
    ("manage_share", "manage/events/{event_id}/share", ["POST"], organizer.share),
    ("manage_unshare", "manage/events/{event_id}/share/{name}", ["DELETE"], organizer.unshare),
    ("manage_organizers", "manage/organizers", ["GET", "POST"], organizer.organizers),
    ("manage_organizer", "manage/organizers/{name}", ["DELETE"], organizer.organizer_account),
    ("manage_organizer_reset_key", "manage/organizers/{name}/reset-key", ["POST"], organizer.organizer_reset_key),
    ("manage_audit", "manage/audit", ["GET"], organizer.audit),
    ("manage_openapi", "manage/openapi.json", ["GET"], organizer.openapi),
    ("manage_probe", "manage/probe", ["POST"], ProbeApi(organizer, proxy.upstream).probe),
    ("portal", "portal/{*asset}", ["GET"], pages.portal),  # the attendee page and the pages' assets
    ("manage_portal", "manage/portal", ["GET"], pages.manage),
    ("not_found", "{*path}", ["GET", "POST", "PUT", "PATCH", "DELETE"], proxy.not_found),
]


def _register(name: str, route: str, methods: list[str], handler: Handler) -> None:
    async def function(req: Request) -> StreamingResponse:
        req.state.route = route  # the template, not the path, for the access log (proxy.edge.access)
        return await handler(req, **req.path_params)

    function.__name__ = name
    app.function_name(name)(app.route(route=route, methods=methods)(function))


for _route in ROUTES:
    _register(*_route)
proxy.know_routes([(route, methods) for _, route, methods, _ in ROUTES])  # for 405 method_not_allowed


# Every 5 minutes, not every minute: each run wakes an instance (a cold start when the app has
# scaled to zero) and is billed for its execution time at the instance's memory, 1,440 times a
# day for nothing most days; a slot comes back 11 to 16 minutes after its worker died instead
# of 11 to 12 (proxy.ledger.reconcile).
@app.function_name("reconcile")
@app.timer_trigger(schedule=RECONCILE_SCHEDULE, arg_name="timer", use_monitor=False)
async def reconcile_reservations(timer: func.TimerRequest) -> None:
    """Give back the daily slots of requests whose worker was killed (``proxy.ledger.reconcile``)."""
    await reconcile(proxy.tables, proxy.ledger, settings.reservation_lease_seconds)
    # Budget alerts whose sender died before the webhook took them (proxy.admission.alerts): sent from here.
    if await proxy.alerts.sweep(proxy.events):
        await proxy.alerts.drain(timeout=60)


@app.function_name("forget_sessions")
@app.timer_trigger(schedule="0 17 * * * *", arg_name="timer", use_monitor=False)
async def forget_expired_sessions(timer: func.TimerRequest) -> None:
    """Delete the chat sessions past their time to live, hourly (``proxy.conversations.sessions``)."""
    await purge_expired(proxy.tables, datetime.now(UTC))


settle_collector()  # last: what the import made is frozen (proxy.config.collector)
