"""``POST /api/v1/keys``: an attendee registers a personal key (``proxy.policy.keys``), by code and name or with GitHub.

The body is ``{"code", "name"}`` and no credential header is needed. The answer
is 201 ``{"key", "name", "event_id", "event", "starts_at", "ends_at"}``, the
key shown this once (``Cache-Control: no-store``). A wrong code is 401
``invalid_event_code`` and counts as a failed lookup for the guessing throttle
(``proxy.policy.guessing``), as on every other route; an event outside its window
answers ``event_not_started`` / ``event_ended`` / ``event_disabled``.

GitHub sign-in (optional). With App Service authentication's GitHub provider
in front of the app, the platform signs attendees in at
``/.auth/login/github`` and adds ``X-MS-CLIENT-PRINCIPAL`` to each request it
lets through (it strips one a client sends). The app can only tell the
platform's header from a forged one by being told the platform is there, so it
reads it only with ``ATTENDEE_SIGN_IN=github``, never by default. Then:

- the name registered is the signed-in GitHub login (a ``name`` in the body
  must be that login, or be left out), and the name's row keeps the GitHub
  account's numeric id: the same account signing in again gets a new key that
  replaces its old one (a lost key is recovered without the organizer), any
  other account gets 409 ``name_taken``;
- a registration without the sign-in is refused (401 ``sign_in_required``,
  pointing at ``/api/portal``): keys are issued to GitHub accounts only, so no
  one can claim a GitHub login that is not theirs, in any event;
- the platform's session is a cookie the browser sends by itself, so a
  signed-in registration must carry ``X-Attendee-Portal: 1``, which the
  attendee page sends and a page of another site cannot send without a CORS
  preflight this app never grants (no cross-site request forgery).

``CODE/name`` is not affected by the setting: it is refused for claimed names
and in events with ``attendee_keys``, as without GitHub.
"""

from __future__ import annotations

import orjson
from starlette.requests import Request
from starlette.responses import Response

from proxy.config.principal import GitHubUser, read_github_user
from proxy.edge.access import Access
from proxy.edge.handlers import Proxy, answering
from proxy.errors import InvalidRequest, SignInRequired
from proxy.policy.credentials import CODE_PATTERN, USER_PATTERN
from proxy.policy.guessing import client_address
from proxy.upstream import payload as bodies

REGISTRATION_BYTES = 4096  # a code and a name: no credential yet, so no room for more
PORTAL_HEADER = "x-attendee-portal"
_JSON = "application/json"


class Registration:
    """The ``POST /v1/keys`` handler, on the worker's services."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.github = proxy.settings.attendee_sign_in == "github"

    @answering
    async def register(self, request: Request) -> Response:
        fields = await bodies.read_json(request, REGISTRATION_BYTES)
        code, user = fields.get("code"), fields.get("name")
        if not isinstance(code, str) or not CODE_PATTERN.fullmatch(code):
            raise InvalidRequest("'code' must be the event code: 4 to 64 of A-Z a-z 0-9 _ -", param="code")
        github = self._github_user(request) if self.github else None
        if github is not None:
            if user is not None and user != github.login:
                raise InvalidRequest(
                    f"Signed in with GitHub as '{github.login}': that is the name registered. Leave 'name' out.",
                    param="name",
                )
            user = github.login
        if not isinstance(user, str) or not USER_PATTERN.fullmatch(user):
            raise InvalidRequest("'name' must be 1 to 128 of A-Z a-z 0-9 . _ @ + -", param="name")
        access: Access = request.state.access
        access.attendee = user
        address = client_address(request.headers.get("x-forwarded-for"), request.client and request.client.host)
        event = await self.proxy.callers.open_event(address, code)
        access.event_id = event.id
        key = await self.proxy.keys.register(event, user, github.id if github else None)
        registered = {"key": key, "name": user, "event_id": event.id, "event": event.name,
                      "starts_at": event.starts_at.isoformat(), "ends_at": event.ends_at.isoformat()}  # fmt: skip
        return Response(orjson.dumps(registered), 201, headers={"cache-control": "no-store"}, media_type=_JSON)

    def _github_user(self, request: Request) -> GitHubUser:
        """The signed-in GitHub account; 401 ``sign_in_required`` without one."""
        github = read_github_user(request.headers)
        if github is None:
            raise SignInRequired(
                "Personal keys on this proxy are registered by signing in with GitHub: open /api/portal, sign in, "
                "and register there."
            )
        if request.headers.get(PORTAL_HEADER) != "1":
            raise SignInRequired(f"Signed in with GitHub, register from the attendee page (it sends {PORTAL_HEADER}).")
        return github
