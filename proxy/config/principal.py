"""Organizers signed in with Entra ID through App Service authentication ("Easy Auth").

With authentication configured on the function app (``infra/``, ``organizerEntraClientId``),
the platform signs the browser in and adds ``X-MS-CLIENT-PRINCIPAL`` (Base64 JSON of the
claims) to each request it lets through; it strips that header from what clients send. The
app can only tell the platform's header from a forged one by being told the platform is in
front of it, so the header is read only when ``ORGANIZER_TRUST_APP_SERVICE_AUTH=true`` (the
Bicep sets it together with the authentication config), never by default: without it the
organizer key alone opens the organizer API.

A principal's role (``proxy.policy.accounts``) comes from the settings that list its
object id (``oid`` claim) or one of its ``groups`` claims (comma-separated ids):
``ORGANIZER_ENTRA_ADMIN_OBJECT_IDS`` / ``ORGANIZER_ENTRA_ADMIN_GROUP_IDS`` make
it an *admin*, ``ORGANIZER_ENTRA_OBJECT_IDS`` / ``ORGANIZER_ENTRA_GROUP_IDS`` an
*organizer*, ``ORGANIZER_ENTRA_VIEWER_OBJECT_IDS`` /
``ORGANIZER_ENTRA_VIEWER_GROUP_IDS`` a *viewer*; listed in several, the highest
role wins. It acts as ``entra:<object id>``: the owner of the events it creates,
the name events are shared with, the account in the audit log. The platform's session is a cookie the
browser sends by itself, so a principal is accepted only on requests that also carry
``X-Organizer-Portal: 1``, which the organizer page sends and which a page of another site
cannot send without a CORS preflight that this app never grants (no cross-site request
forgery).
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping
from dataclasses import dataclass

import orjson

PRINCIPAL_HEADER = "x-ms-client-principal"
PRINCIPAL_ID_HEADER = "x-ms-client-principal-id"
PORTAL_HEADER = "x-organizer-portal"
OBJECT_ID_CLAIMS = ("http://schemas.microsoft.com/identity/claims/objectidentifier", "oid")
GROUP_CLAIMS = ("groups", "http://schemas.microsoft.com/ws/2008/06/identity/claims/groups")
_ID = re.compile(r"[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}")
_MAX_HEADER = 64 * 1024


@dataclass(frozen=True, slots=True)
class Principal:
    """Who App Service authentication says is calling."""

    object_id: str
    groups: frozenset[str]
    name: str = ""


# The settings that list principals, per role, highest first: (role, object ids setting, group ids setting).
ROLE_SETTINGS = (
    ("admin", "ORGANIZER_ENTRA_ADMIN_OBJECT_IDS", "ORGANIZER_ENTRA_ADMIN_GROUP_IDS"),
    ("organizer", "ORGANIZER_ENTRA_OBJECT_IDS", "ORGANIZER_ENTRA_GROUP_IDS"),
    ("viewer", "ORGANIZER_ENTRA_VIEWER_OBJECT_IDS", "ORGANIZER_ENTRA_VIEWER_GROUP_IDS"),
)


@dataclass(frozen=True, slots=True)
class OrganizerSignIn:
    """Whether the platform's principal header is trusted, and whom it admits, with which role."""

    trusted: bool = False
    object_ids: frozenset[str] = frozenset()  # organizers
    group_ids: frozenset[str] = frozenset()
    admin_object_ids: frozenset[str] = frozenset()
    admin_group_ids: frozenset[str] = frozenset()
    viewer_object_ids: frozenset[str] = frozenset()
    viewer_group_ids: frozenset[str] = frozenset()

    @classmethod
    def parse(
        cls, trust: str | None, object_ids: str | None, group_ids: str | None, **by_role: str | None
    ) -> OrganizerSignIn:
        """From the settings' raw values (``by_role``: ``admin_object_ids``... as named in ``ROLE_SETTINGS``);
        ``ValueError`` names the one that is wrong."""
        if trust is not None and trust.lower() not in ("true", "false"):
            raise ValueError(f"ORGANIZER_TRUST_APP_SERVICE_AUTH must be true or false, got {trust!r}")
        raw = {"object_ids": object_ids, "group_ids": group_ids, **by_role}
        lists = {}
        for role, objects, groups in ROLE_SETTINGS:
            prefix = "" if role == "organizer" else f"{role}_"
            lists[f"{prefix}object_ids"] = _ids(objects, raw.get(f"{prefix}object_ids"))
            lists[f"{prefix}group_ids"] = _ids(groups, raw.get(f"{prefix}group_ids"))
        sign_in = cls(trusted=trust is not None and trust.lower() == "true", **lists)
        if sign_in.trusted and not any(lists.values()):
            raise ValueError(
                "ORGANIZER_TRUST_APP_SERVICE_AUTH is true but none of "
                + ", ".join(name for _, *names in ROLE_SETTINGS for name in names)
                + " names an organizer"
            )
        return sign_in

    def role(self, principal: Principal) -> str | None:
        """``admin``, ``organizer`` or ``viewer`` (the highest its settings give), or None: not an organizer."""
        object_id = principal.object_id.lower()
        groups = {group.lower() for group in principal.groups}
        for role, objects, group_ids in (
            ("admin", self.admin_object_ids, self.admin_group_ids),
            ("organizer", self.object_ids, self.group_ids),
            ("viewer", self.viewer_object_ids, self.viewer_group_ids),
        ):
            if object_id in objects or groups & group_ids:
                return role
        return None

    def admits(self, principal: Principal) -> bool:
        return self.role(principal) is not None


NO_SIGN_IN = OrganizerSignIn()  # the default: the header is ignored


def read_principal(headers: Mapping[str, str]) -> Principal | None:
    """The principal of ``X-MS-CLIENT-PRINCIPAL``; None when absent or not the platform's shape."""
    decoded = _decode(headers)
    if decoded is None:
        return None
    _, values = decoded
    object_id = next((values[typ][0] for typ in OBJECT_ID_CLAIMS if typ in values), None)
    object_id = object_id or headers.get(PRINCIPAL_ID_HEADER)
    if not object_id or not _ID.fullmatch(object_id):
        return None
    groups = frozenset(group for typ in GROUP_CLAIMS for group in values.get(typ, ()) if _ID.fullmatch(group))
    name = next(iter(values.get("name", values.get("preferred_username", [""]))), "")
    return Principal(object_id, groups, name)


def _decode(headers: Mapping[str, str]) -> tuple[dict[str, object], dict[str, list[str]]] | None:
    """``X-MS-CLIENT-PRINCIPAL`` as the platform builds it (Base64 JSON with a list of claims): the JSON and the
    values of each claim type; None when absent or of another shape."""
    raw = headers.get(PRINCIPAL_HEADER)
    if not raw or len(raw) > _MAX_HEADER:
        return None
    try:
        data = orjson.loads(base64.b64decode(raw, validate=True))
    except (binascii.Error, ValueError):
        return None
    claims = data.get("claims") if isinstance(data, dict) else None
    if not isinstance(claims, list):
        return None
    values: dict[str, list[str]] = {}
    for claim in claims:
        if isinstance(claim, dict) and isinstance(claim.get("typ"), str) and isinstance(claim.get("val"), str):
            values.setdefault(claim["typ"], []).append(claim["val"])
    return data, values


def _ids(setting: str, raw: str | None) -> frozenset[str]:
    ids = frozenset(part.strip().lower() for part in re.split(r"[,\s]+", raw or "") if part.strip())
    for value in ids:
        if not _ID.fullmatch(value):
            raise ValueError(f"{setting} must list Entra object ids (GUIDs), got {value!r}")
    return ids


# Attendees signed in with GitHub through App Service authentication (proxy.edge.registration), trusted only with
# ATTENDEE_SIGN_IN=github. GitHub logins: letters, digits and single hyphens, at most 39 characters.
GITHUB_LOGIN = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9]|-(?=[A-Za-z0-9])){0,38}")
NAME_CLAIMS = ("http://schemas.xmlsoap.org/ws/2005/05/identity/claims/name", "name")
ID_CLAIMS = ("http://schemas.xmlsoap.org/ws/2005/05/identity/claims/nameidentifier", "nameidentifier")
PRINCIPAL_NAME_HEADER = "x-ms-client-principal-name"
PRINCIPAL_IDP_HEADER = "x-ms-client-principal-idp"


@dataclass(frozen=True, slots=True)
class GitHubUser:
    """A GitHub account as App Service authentication names it: its numeric id (stable) and login."""

    id: str
    login: str


def read_github_user(headers: Mapping[str, str]) -> GitHubUser | None:
    """The GitHub account of ``X-MS-CLIENT-PRINCIPAL``; None when absent, not GitHub's, or not its shape."""
    decoded = _decode(headers)
    if decoded is None or str(decoded[0].get("auth_typ", "")).lower() != "github":
        return None
    data, claims = decoded
    values = {typ: found[0] for typ, found in claims.items()}
    name_claim = data.get("name_typ")
    login = values.get(name_claim) if isinstance(name_claim, str) else None
    login = login or next((values[typ] for typ in NAME_CLAIMS if typ in values), None) or headers.get(
        PRINCIPAL_NAME_HEADER
    )  # fmt: skip
    user_id = next((values[typ] for typ in ID_CLAIMS if typ in values), None) or headers.get(PRINCIPAL_ID_HEADER)
    if not login or not GITHUB_LOGIN.fullmatch(login) or not user_id or not user_id.isdigit():
        return None
    return GitHubUser(user_id, login)
