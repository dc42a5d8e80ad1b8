"""Organizer sign-in with Entra ID through App Service authentication (``proxy.config.principal``).

The platform's ``X-MS-CLIENT-PRINCIPAL`` header is what App Service adds in Azure; here the
tests send it themselves, as the platform would, to an app told to trust it and to one that is
not (the shared app: the default). Only the first may take it.
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Iterator

import httpx
import pytest
from playwright.async_api import Browser, expect

from proxy.config.principal import OrganizerSignIn, read_principal
from proxy.config.settings import Settings, SettingsError
from tests.conftest import LENIENT
from tests.support import ORGANIZER_KEY, app_env, start_app
from tests.test_pages import WAIT_MS, browser  # noqa: F401 (the browser fixture)

ORGANIZER_OID = str(uuid.uuid4())
ORGANIZERS_GROUP = str(uuid.uuid4())
ADMIN_OID = str(uuid.uuid4())
VIEWERS_GROUP = str(uuid.uuid4())
OID_CLAIM = "http://schemas.microsoft.com/identity/claims/objectidentifier"


def principal(object_id: str, *groups: str, name: str = "Ada Organizer") -> str:
    """An ``X-MS-CLIENT-PRINCIPAL`` value as App Service builds it for an Entra ID sign-in."""
    claims = [{"typ": OID_CLAIM, "val": object_id}, {"typ": "name", "val": name}]
    claims += [{"typ": "groups", "val": group} for group in groups]
    body = {"auth_typ": "aad", "claims": claims, "name_typ": "name", "role_typ": "roles"}
    return base64.b64encode(json.dumps(body).encode()).decode()


def signed_in(object_id: str, *groups: str, portal: bool = True) -> dict[str, str]:
    headers = {"x-ms-client-principal": principal(object_id, *groups), "x-ms-client-principal-idp": "aad"}
    if portal:
        headers["x-organizer-portal"] = "1"
    return headers


@pytest.fixture(scope="module")
def entra_app(azurite: str, simulator: str) -> Iterator[str]:
    """An app told that App Service authentication is in front of it, with one organizer and one group."""
    env = app_env(
        azurite,
        simulator,
        EVENT_CACHE_SECONDS="1",
        ORGANIZER_TRUST_APP_SERVICE_AUTH="true",
        ORGANIZER_ENTRA_OBJECT_IDS=f"{ORGANIZER_OID}, {uuid.uuid4()}",
        ORGANIZER_ENTRA_GROUP_IDS=ORGANIZERS_GROUP,
        ORGANIZER_ENTRA_ADMIN_OBJECT_IDS=ADMIN_OID.upper(),  # ids compare whatever their case
        ORGANIZER_ENTRA_VIEWER_GROUP_IDS=VIEWERS_GROUP,
        **LENIENT,
    )
    service, url = start_app(env)
    yield url
    service.stop()


def test_trusted_principal_of_an_organizer_is_accepted(entra_app: str, http: httpx.Client) -> None:
    by_id = http.get(f"{entra_app}/api/manage/events", headers=signed_in(ORGANIZER_OID))
    assert by_id.status_code == 200, by_id.text
    assert by_id.json()["object"] == "list"
    by_group = http.get(f"{entra_app}/api/manage/events", headers=signed_in(str(uuid.uuid4()), ORGANIZERS_GROUP))
    assert by_group.status_code == 200, by_group.text
    # The key keeps working beside it.
    with_key = http.get(f"{entra_app}/api/manage/events", headers={"authorization": f"Bearer {ORGANIZER_KEY}"})
    assert with_key.status_code == 200


def test_trusted_principal_that_is_not_an_organizer_is_refused(entra_app: str, http: httpx.Client) -> None:
    stranger = str(uuid.uuid4())
    refused = http.get(f"{entra_app}/api/manage/events", headers=signed_in(stranger, str(uuid.uuid4())))
    assert refused.status_code == 401
    error = refused.json()["error"]
    assert error["code"] == "unauthorized" and stranger in error["message"]
    assert "ORGANIZER_ENTRA_OBJECT_IDS" in error["message"]


def test_signed_in_principals_get_the_role_their_setting_gives(entra_app: str, http: httpx.Client) -> None:
    """Admins by ORGANIZER_ENTRA_ADMIN_OBJECT_IDS, organizers by ORGANIZER_ENTRA_OBJECT_IDS (or group), viewers by
    ORGANIZER_ENTRA_VIEWER_GROUP_IDS; each acts as entra:<object id>: owner, share name, audit account."""
    window = {"start": "2026-01-01T00:00:00Z", "end": "2099-01-01T00:00:00Z"}
    made = http.post(f"{entra_app}/api/manage/events", json={"name": "By Entra", **window},
                     headers=signed_in(ORGANIZER_OID))  # fmt: skip
    assert made.status_code == 201, made.text
    event_id, organizer = made.json()["id"], f"entra:{ORGANIZER_OID}"
    assert made.json()["owner"] == organizer
    url = f"{entra_app}/api/manage/events/{event_id}"
    # Another organizer (by group) does not see it; an admin does.
    other = signed_in(str(uuid.uuid4()), ORGANIZERS_GROUP)
    assert http.get(url, headers=other).status_code == 404
    assert http.get(url, headers=signed_in(ADMIN_OID)).status_code == 200
    assert http.get(f"{entra_app}/api/manage/organizers", headers=signed_in(ADMIN_OID)).status_code == 200
    assert http.get(f"{entra_app}/api/manage/organizers", headers=signed_in(ORGANIZER_OID)).status_code == 403
    # A viewer by group: 404 until it is shared with them by object id, then reads and is refused writes.
    viewer_oid = str(uuid.uuid4())
    viewer = signed_in(viewer_oid, VIEWERS_GROUP)
    assert http.get(url, headers=viewer).status_code == 404
    shared = http.post(f"{url}/share", json={"organizer": f"entra:{viewer_oid}", "role": "viewer"},
                       headers=signed_in(ORGANIZER_OID))  # fmt: skip
    assert shared.status_code == 200, shared.text
    assert http.get(url, headers=viewer).status_code == 200
    assert http.patch(url, json={"description": "no"}, headers=viewer).status_code == 403
    log = http.get(f"{entra_app}/api/manage/audit", params={"event": event_id}, headers=signed_in(ADMIN_OID)).json()
    assert [(e["account"], e["action"]) for e in log["data"]] == [(organizer, "share"), (organizer, "create")]


def test_trusted_principal_needs_the_organizer_page_header(entra_app: str, http: httpx.Client) -> None:
    """A cross-site form or link carries the platform's cookie but cannot add the page's header."""
    created = http.post(
        f"{entra_app}/api/manage/events",
        headers=signed_in(ORGANIZER_OID, portal=False),
        content=b'{"name": "forged", "start": "2026-01-01T00:00:00Z", "end": "2099-01-01T00:00:00Z"}',
    )
    assert created.status_code == 401
    assert "x-organizer-portal" in created.json()["error"]["message"]


def test_malformed_principal_is_not_a_sign_in(entra_app: str, http: httpx.Client) -> None:
    for value in ("not base64!", base64.b64encode(b"[1, 2]").decode(), principal("not-a-guid")):
        answer = http.get(
            f"{entra_app}/api/manage/events", headers={"x-ms-client-principal": value, "x-organizer-portal": "1"}
        )
        assert answer.status_code == 401, value
        assert "ORGANIZER_KEY" in answer.json()["error"]["message"]


def test_principal_is_ignored_where_the_app_does_not_trust_it(app: str, http: httpx.Client) -> None:
    """The default: a client that forges the platform's header gets 401, as without it."""
    answer = http.get(f"{app}/api/manage/events", headers=signed_in(ORGANIZER_OID))
    assert answer.status_code == 401
    assert answer.json()["error"]["code"] == "unauthorized"
    assert "ORGANIZER_KEY" in answer.json()["error"]["message"]


async def test_organizer_page_signs_in_with_the_platform_session(entra_app: str, app: str, browser: Browser) -> None:  # noqa: F811
    """With the platform in front (its header added to every request), the page needs no key."""
    context = await browser.new_context(extra_http_headers={"x-ms-client-principal": principal(ORGANIZER_OID)})
    context.set_default_timeout(WAIT_MS)
    try:
        page = await context.new_page()
        await page.goto(f"{entra_app}/api/manage/portal")
        await expect(page.get_by_role("heading", name="Events")).to_be_visible()
        assert await page.evaluate("sessionStorage.length") == 0  # no key kept
        # The app that does not trust the header offers no such sign-in and asks for the key.
        await page.goto(f"{app}/api/manage/portal")
        await expect(page.get_by_label("Organizer key")).to_be_visible()
        await expect(page.get_by_role("link", name="sign in with your Microsoft Entra ID account")).to_be_hidden()
        await expect(page.get_by_role("heading", name="Events")).to_be_hidden()
    finally:
        await context.close()
    # Without the platform's session, the trusting app's page offers the Entra ID sign-in.
    context = await browser.new_context()
    context.set_default_timeout(WAIT_MS)
    try:
        page = await context.new_page()
        await page.goto(f"{entra_app}/api/manage/portal")
        link = page.get_by_role("link", name="sign in with your Microsoft Entra ID account")
        await expect(link).to_be_visible()
        assert await link.get_attribute("href") == "/.auth/login/aad?post_login_redirect_uri=/api/manage/portal"
        await expect(page.get_by_role("alert")).to_be_hidden()
    finally:
        await context.close()


def test_sign_in_settings_are_validated() -> None:
    base = {"AZURE_OPENAI_ENDPOINT": "http://127.0.0.1:1", "STORAGE_CONNECTION_STRING": "UseDevelopmentStorage=true"}
    assert Settings.from_env(base).organizer_sign_in == OrganizerSignIn()  # off by default
    with pytest.raises(SettingsError, match="none of ORGANIZER_ENTRA_ADMIN_OBJECT_IDS"):
        Settings.from_env({**base, "ORGANIZER_TRUST_APP_SERVICE_AUTH": "true"})
    with pytest.raises(SettingsError, match="must be true or false"):
        Settings.from_env({**base, "ORGANIZER_TRUST_APP_SERVICE_AUTH": "yes"})
    with pytest.raises(SettingsError, match="ORGANIZER_ENTRA_GROUP_IDS must list Entra object ids"):
        Settings.from_env({**base, "ORGANIZER_TRUST_APP_SERVICE_AUTH": "true", "ORGANIZER_ENTRA_GROUP_IDS": "admins"})
    upper = ORGANIZER_OID.upper()
    sign_in = Settings.from_env(
        {**base, "ORGANIZER_TRUST_APP_SERVICE_AUTH": "true", "ORGANIZER_ENTRA_OBJECT_IDS": upper}
    ).organizer_sign_in
    found = read_principal({"x-ms-client-principal": principal(ORGANIZER_OID)})
    assert found is not None and sign_in.admits(found)  # ids compare whatever their case
    # Set but "false": the header is still ignored, lists or not.
    assert not Settings.from_env({**base, "ORGANIZER_TRUST_APP_SERVICE_AUTH": "false"}).organizer_sign_in.trusted


def test_bicep_trusts_the_header_only_with_the_authentication_config() -> None:
    """One switch (a client id) turns on App Service authentication and the setting that trusts its header."""
    from tests.test_infra import body, function_app_settings, parsed, resources_of

    settings = function_app_settings()
    trust = settings["ORGANIZER_TRUST_APP_SERVICE_AUTH"]["operator"]
    assert trust == {"type": "conditional", "operands": {"condition": "entraSignIn", "true_value": "true",
                                                         "false_value": "false"}}  # fmt: skip
    assert settings["ORGANIZER_ENTRA_OBJECT_IDS"] == "organizerEntraObjectIds"
    assert settings["ORGANIZER_ENTRA_GROUP_IDS"] == "organizerEntraGroupIds"
    for role in ("Admin", "Viewer"):
        for kind in ("Object", "Group"):
            assert settings[f"ORGANIZER_ENTRA_{role.upper()}_{kind.upper()}_IDS"] == f"organizerEntra{role}{kind}Ids"
    module = parsed("modules/functionapp.bicep")
    switch = module["variables"]["entraSignIn"]["value"]["operator"]
    assert switch["type"] == "not" and "organizerEntraClientId" in json.dumps(switch)
    assert module["parameters"]["organizerEntraClientId"]["default"] == ""  # off unless asked for
    (resource,) = resources_of("modules/functionapp.bicep", "Microsoft.Web/sites/config")
    assert resource["config"]["condition"] == "entraSignIn"
    config = body(resource)
    assert config["name"] == "authsettingsV2" and config["parent"] == "app"
    properties = config["properties"]
    # Attendees never sign in: the platform must let anonymous calls through to the app.
    assert properties["globalValidation"] == {
        "requireAuthentication": False,
        "unauthenticatedClientAction": "AllowAnonymous",
    }
    entra = properties["identityProviders"]["azureActiveDirectory"]
    assert entra["enabled"] is True and entra["registration"]["clientId"] == "organizerEntraClientId"
    assert "clientSecretSettingName" not in entra["registration"]  # no secret anywhere: the ID token flow
    # main.bicep hands the module what main.bicepparam reads from the environment.
    main = json.dumps(parsed("main.bicep"))
    for name in ("organizerEntraClientId", "organizerEntraObjectIds", "organizerEntraGroupIds",
                 "organizerEntraAdminObjectIds", "organizerEntraViewerGroupIds"):  # fmt: skip
        assert name in main
