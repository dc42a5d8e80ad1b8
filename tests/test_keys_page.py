"""Personal keys on the attendee page, in a real Chromium, and GitHub sign-in through the platform's header.

App Service authentication adds ``X-MS-CLIENT-PRINCIPAL`` in Azure; here the tests send it as the platform
would (the browser, through extra headers), to an app told to trust it (``ATTENDEE_SIGN_IN=github``) and to one
that is not (the shared app). Only the first may take it.
"""

from __future__ import annotations

import base64
import json
import re
import secrets
from collections.abc import Iterator

import httpx
import pytest
from playwright.async_api import Browser, expect

from proxy.config.principal import GitHubUser, read_github_user
from tests.conftest import LENIENT, MakeEvent
from tests.support import ORGANIZER_KEY, app_env, start_app
from tests.test_pages import DESKTOP, WAIT_MS, Watched, browser, browsing, chat  # noqa: F401 (fixtures)

AUTH = {"Authorization": f"Bearer {ORGANIZER_KEY}"}
KEY = re.compile(r"ek-[A-Za-z0-9_-]{32}")
NAME_CLAIM = "http://schemas.xmlsoap.org/ws/2005/05/identity/claims/name"
ID_CLAIM = "http://schemas.xmlsoap.org/ws/2005/05/identity/claims/nameidentifier"


def github_principal(user_id: str, login: str) -> dict[str, str]:
    """The headers App Service authentication adds for a GitHub sign-in."""
    claims = [{"typ": ID_CLAIM, "val": user_id}, {"typ": NAME_CLAIM, "val": login},
              {"typ": "urn:github:name", "val": "The Octocat"}]  # fmt: skip
    body = {"auth_typ": "github", "claims": claims, "name_typ": NAME_CLAIM, "role_typ": "roles"}
    return {
        "x-ms-client-principal": base64.b64encode(json.dumps(body).encode()).decode(),
        "x-ms-client-principal-idp": "github",
        "x-ms-client-principal-name": login,
        "x-ms-client-principal-id": user_id,
    }


def register(app: str, body: dict[str, str], headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(f"{app}/api/v1/keys", json=body, headers=headers, timeout=30)


@pytest.fixture(scope="module")
def github_app(azurite: str, simulator: str) -> Iterator[str]:
    """An app told that App Service authentication with GitHub is in front of it."""
    service, url = start_app(app_env(azurite, simulator, EVENT_CACHE_SECONDS="1", ATTENDEE_SIGN_IN="github", **LENIENT))
    yield url
    service.stop()


async def test_register_copy_the_key_and_chat_with_it(
    app: str,
    make_event: MakeEvent,
    browsing: Watched,  # noqa: F811 (the fixture)
) -> None:
    created = await make_event(name="Keyed workshop", attendee_keys=True)
    page = await browsing.page()
    await page.goto(f"{app}/api/portal")
    await page.get_by_label("Event code", exact=True).fill(created.code)
    await page.get_by_label("Your name", exact=True).fill("ada")
    await page.get_by_role("button", name="Get my key").click()
    await expect(page.locator("#new-key")).to_have_text(KEY)
    key = await page.locator("#new-key").inner_text()
    await page.get_by_role("button", name="Copy the key").click()
    assert await page.evaluate("navigator.clipboard.readText()") == key
    snippets = page.locator("#key-snippets")
    await expect(snippets).to_contain_text(f'api_key="{key}"')
    await expect(snippets).to_contain_text(f'apiKey: "{key}"')
    await expect(snippets).to_contain_text(f"Authorization: Bearer {key}")
    await expect(snippets).to_contain_text(f"OPENAI_API_KEY={key}")
    await expect(snippets).to_contain_text(f"OPENAI_BASE_URL={app}/api/v1")
    await expect(snippets).to_contain_text('model="gpt-4o-mini"')  # the event's models, read with the key
    assert created.code not in await page.content()  # the code typed is not kept on the page

    await page.get_by_role("button", name="Continue to my event").click()
    await expect(page.locator("#event-user")).to_have_text("ada")
    await expect(page.locator("#new-key")).to_have_text("")  # shown once
    assert await page.evaluate("sessionStorage.getItem('eventproxy.attendee')") == key
    await chat(page, "Hello with my key")  # the event refuses CODE/name: this answer came through the key
    await expect(page.locator("#used-requests")).to_have_text("1")

    # Signed out, the same name cannot be registered again, and CODE/ada is refused with the way out.
    await page.get_by_role("button", name="Sign out").click()
    await page.get_by_label("Event code", exact=True).fill(created.code)
    await page.get_by_label("Your name", exact=True).fill("ada")
    await page.get_by_role("button", name="Get my key").click()
    await expect(page.get_by_role("alert")).to_contain_text("already has a personal key")
    await page.get_by_label("Your credential").fill(created.key("ada"))
    await page.get_by_role("button", name="Show my event").click()
    await expect(page.get_by_role("alert")).to_contain_text("/api/portal")
    # The key typed in by hand works as the credential.
    await page.get_by_label("Your credential").fill(key)
    await page.get_by_role("button", name="Show my event").click()
    await expect(page.locator("#event-name")).to_have_text("Keyed workshop")


async def test_github_sign_in_registers_the_login(
    github_app: str,
    make_event: MakeEvent,
    browser: Browser,  # noqa: F811 (the fixture)
) -> None:
    created = await make_event(name="GitHub workshop", attendee_keys=True)
    context = await browser.new_context(viewport=DESKTOP)
    context.set_default_timeout(WAIT_MS)
    try:
        page = await context.new_page()
        await page.goto(f"{github_app}/api/portal")
        link = page.get_by_role("link", name="Sign in with GitHub")
        await expect(link).to_be_visible()
        assert await link.get_attribute("href") == "/.auth/login/github?post_login_redirect_uri=/api/portal"
        await expect(page.get_by_label("Your name", exact=True)).to_be_hidden()
        # Not signed in yet: the proxy says how.
        await page.get_by_label("Event code", exact=True).fill(created.code)
        await page.get_by_role("button", name="Get my key").click()
        await expect(page.get_by_role("alert")).to_contain_text("signing in with GitHub")
        # Signed in: the platform adds its header to every request.
        await context.set_extra_http_headers(github_principal("583231", "octocat"))
        await page.get_by_role("button", name="Get my key").click()
        await expect(page.locator("#new-key")).to_have_text(KEY)
        await page.get_by_role("button", name="Continue to my event").click()
        await expect(page.locator("#event-user")).to_have_text("octocat")
    finally:
        await context.close()


async def test_github_logins_belong_to_their_accounts(github_app: str, make_event: MakeEvent) -> None:
    created = await make_event()
    octocat = {**github_principal("583231", "octocat"), "x-attendee-portal": "1"}
    plain = register(github_app, {"code": created.code, "name": "octocat"})
    assert plain.status_code == 401 and plain.json()["error"]["code"] == "sign_in_required"
    no_portal = register(github_app, {"code": created.code}, github_principal("583231", "octocat"))
    assert no_portal.status_code == 401 and "x-attendee-portal" in no_portal.json()["error"]["message"]
    other_name = register(github_app, {"code": created.code, "name": "someone-else"}, octocat)
    assert other_name.status_code == 400 and other_name.json()["error"]["param"] == "name"
    first = register(github_app, {"code": created.code}, octocat)
    assert first.status_code == 201 and first.json()["name"] == "octocat"
    old = first.json()["key"]
    # The same account signing in again gets a new key; the old one stops working.
    again = register(github_app, {"code": created.code, "name": "octocat"}, octocat)
    assert again.status_code == 201 and again.json()["key"] != old
    assert httpx.get(f"{github_app}/api/v1/models", headers={"api-key": old}).status_code == 401
    assert httpx.get(f"{github_app}/api/v1/models", headers={"api-key": again.json()["key"]}).status_code == 200
    # Another GitHub account that holds the login now (a rename) does not get it.
    renamed = register(
        github_app, {"code": created.code}, {**github_principal("999", "octocat"), "x-attendee-portal": "1"}
    )
    assert renamed.status_code == 409 and renamed.json()["error"]["code"] == "name_taken"
    # A forged principal that is not GitHub's is no sign-in.
    forged = {**github_principal("1", "mallory"), "x-attendee-portal": "1"}
    forged["x-ms-client-principal"] = base64.b64encode(b'{"auth_typ": "aad", "claims": []}').decode()
    assert register(github_app, {"code": created.code}, forged).status_code == 401


async def test_the_principal_is_ignored_unless_trusted(app: str, make_event: MakeEvent) -> None:
    """The shared app has no ATTENDEE_SIGN_IN: a client's own principal header changes nothing."""
    created = await make_event()
    forged = {**github_principal("583231", "octocat"), "x-attendee-portal": "1"}
    typed = register(app, {"code": created.code, "name": "mallory"}, forged)
    assert typed.status_code == 201 and typed.json()["name"] == "mallory"
    assert register(app, {"code": created.code}, forged).status_code == 400  # no name: the header is not one


def test_github_principal_parsing() -> None:
    assert read_github_user(github_principal("583231", "octocat")) == GitHubUser("583231", "octocat")
    assert read_github_user(github_principal("1", "a" * 39)) == GitHubUser("1", "a" * 39)
    for login in ("-octocat", "octo--cat", "octo_cat", "a" * 40):
        assert read_github_user(github_principal("1", login)) is None
    assert read_github_user(github_principal("not-a-number", "octocat")) is None
    assert read_github_user({"x-ms-client-principal": "not base64!"}) is None


async def test_organizer_requires_keys_and_resets_one_from_the_page(
    app: str,
    browsing: Watched,  # noqa: F811 (the fixture)
) -> None:
    manage = await browsing.page()
    await manage.goto(f"{app}/api/manage/portal")
    await manage.get_by_label("Organizer key").fill(ORGANIZER_KEY)
    await manage.get_by_role("button", name="Sign in").click()
    name = f"Keys only {secrets.token_hex(3)}"
    await manage.get_by_role("button", name="New event").click()
    await manage.get_by_label("Name", exact=True).fill(name)
    await manage.get_by_label("Personal keys required").check()
    await manage.get_by_role("button", name="Create event").click()
    await expect(manage.locator("#code-value")).to_have_text(re.compile(r"^[A-Za-z0-9_-]{16,}$"))
    code = await manage.locator("#code-value").inner_text()
    await manage.get_by_role("button", name="I have copied it").click()
    await expect(manage.locator("#detail-facts")).to_contain_text("personal keys only")
    refused = httpx.get(f"{app}/api/v1/models", headers={"api-key": f"{code}/alice"}, timeout=30)
    assert refused.json()["error"]["code"] == "personal_key_required"
    key = register(app, {"code": code, "name": "alice"}).json()["key"]
    assert httpx.get(f"{app}/api/v1/models", headers={"api-key": key}, timeout=30).status_code == 200
    rows = manage.locator("#attendees-table tbody tr")
    await expect(rows.filter(has_text="alice")).to_have_count(1)  # the page refreshes by itself
    await manage.get_by_role("button", name="Reset the personal key of alice").click()
    await manage.locator("#confirm").get_by_role("button", name="Reset key").click()
    await expect(manage.get_by_role("alert")).to_contain_text("can register again")
    await expect(manage.get_by_role("button", name="Reset the personal key of alice")).to_have_count(0)
    assert httpx.get(f"{app}/api/v1/models", headers={"api-key": key}, timeout=30).status_code == 401
    # Edit: turning the requirement off is a change like any other.
    await manage.get_by_role("button", name="Edit").click()
    await manage.get_by_label("Personal keys required").uncheck()
    await manage.get_by_role("button", name="Save changes").click()
    event_id = (await manage.locator("#detail-facts").inner_text()).rsplit("Id", 1)[1].strip()
    shown = httpx.get(f"{app}/api/manage/events/{event_id}", headers=AUTH, timeout=30).json()
    assert shown["attendee_keys"] is False
