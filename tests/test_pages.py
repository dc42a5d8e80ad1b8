"""The attendee and organizer pages in a real headless Chromium, against the app behind the host emulator.

Chromium is Debian's ``chromium`` package (``.ci/run`` installs it when missing), driven by
Playwright through ``executable_path``: Playwright's own browser download is not used. A missing
browser fails these tests with the command that installs it; nothing is skipped.

Screenshots of each page at desktop and phone widths are kept in ``tests/artifacts/`` (gitignored).
Every wait is a condition with a timeout (Playwright's ``expect``), never a bare sleep.
"""

from __future__ import annotations

import re
import secrets
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from zoneinfo import ZoneInfo

import h11
import httpx
import pytest
from playwright.async_api import Browser, BrowserContext, Page, async_playwright, expect

from devtools.deploy.package import is_ignored, parse_ignore
from proxy.config.hashing import SecretHasher
from proxy.policy.events import EventStore
from proxy.storage.tables import Tables
from tests.conftest import MakeEvent
from tests.support import CODE_HASH_KEY, ORGANIZER_KEY, ROOT, eventually

ARTIFACTS = ROOT / "tests" / "artifacts"
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}
WAIT_MS = 15_000  # the longest any condition is waited for (the organizer page refreshes usage every 5 s)
expect.set_options(timeout=WAIT_MS)


def chromium_path() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.fail("Debian's chromium is needed for the page tests: apt-get update && apt-get install -y chromium")
    return found


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as driver:
        launched = await driver.chromium.launch(executable_path=chromium_path(), args=["--no-sandbox"])
        yield launched
        await launched.close()


class Watched:
    """A browser context whose pages' script errors and CSP violations are collected."""

    def __init__(self, context: BrowserContext) -> None:
        self.context = context
        self.problems: list[str] = []

    async def page(self) -> Page:
        page = await self.context.new_page()
        page.on("pageerror", lambda error: self.problems.append(f"script error: {error}"))
        page.on(
            "console",
            lambda message: (
                self.problems.append(f"console: {message.text}")
                if "Content Security Policy" in message.text or "Refused to" in message.text
                else None
            ),
        )
        return page


@pytest.fixture
async def browsing(browser: Browser) -> AsyncIterator[Watched]:
    context = await browser.new_context(viewport=DESKTOP, timezone_id="Europe/Paris", accept_downloads=True)
    await context.grant_permissions(["clipboard-read", "clipboard-write"])
    context.set_default_timeout(WAIT_MS)
    watched = Watched(context)
    yield watched
    await context.close()
    assert watched.problems == [], "the pages broke a rule of their own CSP or threw"


async def screenshots(page: Page, name: str) -> None:
    """The page at desktop and phone widths, kept as test artefacts; every control it shows has a name."""
    unnamed = await page.evaluate(
        """() => [...document.querySelectorAll("input, select, textarea, button")]
            .filter((e) => e.offsetParent !== null && e.type !== "hidden")
            .filter((e) => !(e.labels && e.labels.length) && !e.getAttribute("aria-label") && !e.textContent.trim())
            .map((e) => e.outerHTML)"""
    )
    assert unnamed == [], f"controls without a label on {name}"
    ARTIFACTS.mkdir(exist_ok=True)
    size = page.viewport_size or DESKTOP
    await page.set_viewport_size(DESKTOP)
    await page.screenshot(path=ARTIFACTS / f"{name}-desktop.png", full_page=True)
    await page.set_viewport_size(PHONE)
    await page.screenshot(path=ARTIFACTS / f"{name}-phone.png", full_page=True)
    # Nothing may be wider than a phone's screen (tables scroll inside their own box).
    assert await page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    await page.set_viewport_size(size)


async def sign_in_attendee(page: Page, app: str, credential: str) -> None:
    await page.goto(f"{app}/api/portal")
    await page.get_by_label("Your credential").fill(credential)
    await page.get_by_role("button", name="Show my event").click()


async def chat(page: Page, prompt: str) -> None:
    """Send one playground message and wait for its answer's token count."""
    answers = page.locator(".message.assistant")
    before = await answers.count()
    await page.get_by_label("Your message").fill(prompt)
    await page.get_by_role("button", name="Send").click()
    await expect(answers.nth(before).locator(".used")).to_contain_text(re.compile(r"Used \d+ tokens"))


async def until_proxy_answers(app: str, credential: str, done: Callable[[httpx.Response], bool]) -> None:
    """Wait until ``GET /api/v1/event`` reflects an organizer's change (events are cached for up to 1 s here)."""
    async with httpx.AsyncClient(timeout=10) as client:

        async def probe() -> httpx.Response:
            return await client.get(f"{app}/api/v1/event", headers={"authorization": f"Bearer {credential}"})

        await eventually(probe, done, what="the proxy to see the organizer's change")


async def test_attendee_sees_the_event_and_chats_in_the_playground(
    app: str, make_event: MakeEvent, browsing: Watched
) -> None:
    created = await make_event(name="Browser workshop", description="Bring a laptop.", daily_requests=5,
                               daily_tokens=50_000, time_zone="Europe/Paris")  # fmt: skip
    page = await browsing.page()
    await sign_in_attendee(page, app, created.key("ada"))

    await expect(page.locator("#event-name")).to_have_text("Browser workshop")
    await expect(page.locator("#event-state")).to_have_text("Open")
    await expect(page.locator("#countdown")).to_contain_text("Closes in 7 h")
    await expect(page.locator("#event-zone")).to_have_text("Europe/Paris")
    await expect(page.locator("#remaining-requests")).to_have_text("5 of 5")
    await expect(page.locator("#remaining-tokens")).to_have_text("50,000 of 50,000")
    await expect(page.locator("#models")).to_contain_text("gpt-4o-mini")
    # The credential is in this tab's storage and the snippets, never in the address.
    assert created.code not in page.url
    assert await page.evaluate("sessionStorage.getItem('eventproxy.attendee')") == created.key("ada")
    await expect(page.locator("#snippets")).to_contain_text(f'base_url="{app}/api/v1", api_key="{created.key("ada")}"')
    await page.get_by_role("button", name="Copy the curl snippet").click()
    copied = await page.evaluate("navigator.clipboard.readText()")
    assert copied.startswith(f"curl {app}/api/v1/chat/completions") and created.key("ada") in copied

    await chat(page, "Say hello to the workshop")
    assistant = page.locator(".message.assistant").first
    assert (await assistant.locator(".text").inner_text()).strip()
    await expect(page.locator("#remaining-requests")).to_have_text("4 of 5")
    await expect(page.locator("#used-requests")).to_have_text("1")
    used = int((await page.locator("#used-tokens").inner_text()).replace(",", ""))
    assert used > 0
    await expect(page.locator("#remaining-tokens")).to_have_text(f"{50_000 - used:,} of 50,000")
    await screenshots(page, "attendee")

    # Stop: the simulator holds this answer back for 20 s; the page aborts it.
    await page.get_by_label("Your message").fill("Wait for it SIM_SLOW_MS=20000")
    await page.get_by_role("button", name="Send").click()
    await expect(page.get_by_role("button", name="Stop")).to_be_enabled()
    await page.get_by_role("button", name="Stop").click()
    await expect(page.locator("#chat-status")).to_contain_text("Stopped.")
    await expect(page.get_by_role("button", name="Send")).to_be_enabled()

    # The Python snippets run as shown (each one request).
    for title in ("Python: OpenAI", "Python: AzureOpenAI"):
        snippet = page.locator("figure.snippet", has_text=title).locator("code")
        ran = subprocess.run([sys.executable, "-c", await snippet.inner_text()], capture_output=True, text=True,
                             timeout=60, check=False)  # fmt: skip
        assert ran.returncode == 0 and ran.stdout.strip(), (title, ran.stderr)
    await page.reload()
    # 1 chat and 2 snippets, and the stopped answer once recorded: it reached Azure OpenAI, so it is charged.
    await expect(page.locator("#used-requests")).to_have_text(re.compile(r"^[34]$"))

    # A reload keeps the tab signed in; signing out forgets the credential.
    await expect(page.locator("#event-name")).to_have_text("Browser workshop")
    await page.get_by_role("button", name="Sign out").click()
    await expect(page.get_by_label("Your credential")).to_be_visible()
    assert await page.evaluate("sessionStorage.length") == 0

    # The proxy's own message for a code it does not know.
    # By keyboard: the field has the focus, Enter sends it.
    await expect(page.get_by_label("Your credential")).to_be_focused()
    await page.keyboard.type("NOSUCHCODE123/ada")
    await page.keyboard.press("Enter")
    await expect(page.get_by_role("alert")).to_contain_text("This event code is not known")


async def test_attendee_page_before_the_event_shows_the_countdown_and_the_proxys_refusal(
    app: str, make_event: MakeEvent, browsing: Watched
) -> None:
    now = datetime.now(UTC)
    created = await make_event(
        name="Tomorrow's lab", starts_at=now + timedelta(hours=3), ends_at=now + timedelta(hours=5)
    )
    page = await browsing.page()
    await sign_in_attendee(page, app, created.key("lin"))
    await expect(page.locator("#event-state")).to_have_text("Not started")
    await expect(page.locator("#countdown")).to_contain_text(re.compile(r"Opens in 2 h 5\d min"))
    await expect(page.locator("#remaining-requests")).to_contain_text("(closed)")
    # The model picker still offers the event's models (the proxy lists them only once open).
    await expect(page.locator("#chat-model option")).to_have_count(1)
    await page.get_by_label("Your message").fill("Too early?")
    await page.get_by_role("button", name="Send").click()
    await expect(page.locator(".message.failed")).to_contain_text(f"The event '{created.event.name}' starts at")


async def test_organizer_runs_an_event_from_the_page(app: str, browsing: Watched) -> None:
    manage = await browsing.page()
    await manage.goto(f"{app}/api/manage/portal")
    await manage.get_by_label("Organizer key").fill("wrong-key")
    await manage.get_by_role("button", name="Sign in").click()
    await expect(manage.get_by_role("alert")).to_contain_text("organizer key")
    await manage.get_by_label("Organizer key").fill(ORGANIZER_KEY)
    await manage.get_by_role("button", name="Sign in").click()
    await expect(manage.get_by_role("heading", name="Events")).to_be_visible()
    assert ORGANIZER_KEY not in manage.url

    name = f"Page event {secrets.token_hex(3)}"
    await manage.get_by_role("button", name="New event").click()
    await expect(manage.get_by_label("Time zone (IANA)")).to_have_value("Europe/Paris")
    await manage.get_by_label("Name", exact=True).fill(name)
    await manage.get_by_label("Description", exact=True).fill("Made in a browser.")
    await manage.get_by_label("Requests per day").fill("20")
    await manage.get_by_label("Other models, comma-separated").fill("gpt-4o-mini")
    await screenshots(manage, "organizer-new-event")
    await manage.get_by_role("button", name="Create event").click()

    code_box = manage.locator("#code-value")
    await expect(code_box).to_have_text(re.compile(r"^[A-Za-z0-9_-]{16,}$"))
    code = await code_box.inner_text()
    await manage.get_by_role("button", name="Copy code").click()
    assert await manage.evaluate("navigator.clipboard.readText()") == code
    await expect(manage.locator("#detail-state")).to_have_text("Open")
    await expect(manage.locator("#events")).to_contain_text(name)
    await manage.get_by_role("button", name="I have copied it").click()

    attendee = await browsing.page()
    await sign_in_attendee(attendee, app, f"{code}/grace")
    await expect(attendee.locator("#event-name")).to_have_text(name)
    await expect(attendee.locator("#remaining-requests")).to_have_text("20 of 20")
    await chat(attendee, "Hello from the organizer's test")
    await expect(attendee.locator("#remaining-requests")).to_have_text("19 of 20")

    # Usage shows up by itself (live refresh), per attendee, then per model and per day.
    rows = manage.locator("#usage-table tbody tr")
    await expect(rows.filter(has_text="grace")).to_have_count(1)
    await expect(rows.filter(has_text="grace").locator("td").nth(1)).to_have_text("1")
    # In money too: one small gpt-4o-mini request costs a fraction of a cent.
    await expect(rows.filter(has_text="grace").locator("td").nth(6)).to_have_text(re.compile(r"^\$0\.0000\d\d$"))
    await expect(manage.locator("#usage-totals")).to_contain_text(re.compile(r"\$0\.0000\d\d\."))
    await expect(manage.locator("#usage-chart svg")).to_be_visible()
    await expect(manage.locator("#attendees-table")).to_contain_text("grace")
    await manage.get_by_role("button", name="Per model").click()
    await expect(rows.filter(has_text="gpt-4o-mini")).to_have_count(1)
    await manage.get_by_role("button", name="Per attendee").click()
    async with manage.expect_download() as download_info:
        await manage.get_by_role("button", name="Download CSV").click()
    download = await download_info.value
    assert download.suggested_filename.endswith("-usage-by-user.csv")
    csv_text = Path(await download.path()).read_text()
    assert csv_text.splitlines()[0].startswith("key,") or "requests" in csv_text.splitlines()[0]
    assert any(line.startswith("grace,") for line in csv_text.splitlines())
    await screenshots(manage, "organizer")

    # Edit: only what changed is sent; the attendee sees the new cap, the usage the new event-wide budget.
    await manage.get_by_role("button", name="Edit").click()
    await expect(manage.get_by_label("Name", exact=True)).to_have_value(name)
    await manage.get_by_label("Requests per day").fill("30")
    await manage.get_by_label("Requests, all attendees").fill("100")
    await manage.get_by_label("Turns kept per session").fill("5")
    await manage.get_by_role("button", name="Save changes").click()
    await expect(manage.locator("#detail-facts")).to_contain_text("Requests, whole event100")
    await expect(manage.locator("#usage-budget")).to_contain_text(re.compile(r"requests \d+ of 100"))
    await until_proxy_answers(app, f"{code}/grace", lambda answer: answer.json()["caps"]["daily_requests"] == 30)
    await until_proxy_answers(app, f"{code}/grace", lambda answer: answer.json()["caps"]["session_turns"] == 5)
    await attendee.reload()
    await expect(attendee.locator("#remaining-requests")).to_have_text("29 of 30")

    # Rotate: confirmed in a dialog, the new code shown once; the old one stops working.
    await manage.get_by_role("button", name="Rotate code").click()
    await manage.locator("#confirm").get_by_role("button", name="Rotate code").click()
    await expect(code_box).not_to_have_text(code)
    await expect(code_box).to_have_text(re.compile(r"^[A-Za-z0-9_-]{16,}$"))
    new_code = await code_box.inner_text()
    await until_proxy_answers(app, f"{code}/grace", lambda answer: answer.status_code == 401)  # EVENT_CACHE_SECONDS
    await attendee.reload()
    await expect(attendee.get_by_role("alert")).to_contain_text("This event code is not known")
    await attendee.get_by_label("Your credential").fill(f"{new_code}/grace")
    await attendee.get_by_role("button", name="Show my event").click()
    await expect(attendee.locator("#remaining-requests")).to_have_text("29 of 30")

    # Disable: confirmed; the attendee page reports it, and the playground gets the proxy's refusal.
    await manage.get_by_role("button", name="Disable").click()
    await manage.locator("#confirm").get_by_role("button", name="Disable").click()
    await expect(manage.locator("#detail-state")).to_have_text("Disabled")
    await expect(manage.get_by_role("button", name="Enable")).to_be_visible()
    await until_proxy_answers(app, f"{new_code}/grace", lambda answer: not answer.json()["active"])
    await attendee.reload()
    await expect(attendee.locator("#event-state")).to_have_text("Switched off")
    await expect(attendee.locator("#countdown")).to_contain_text("switched this event off")
    await expect(attendee.locator("#remaining-requests")).to_have_text("0 of 30 (closed)")
    await attendee.get_by_label("Your message").fill("Still there?")
    await attendee.get_by_role("button", name="Send").click()
    await expect(attendee.locator(".message.failed")).to_contain_text("switched off by its organizer")
    await screenshots(attendee, "attendee-disabled")

    # Block one click; delete, confirmed.
    await manage.get_by_role("button", name="Block grace").click()
    await expect(manage.get_by_role("button", name="Unblock grace")).to_be_visible()
    await manage.get_by_role("button", name="Delete").click()
    await manage.locator("#confirm").get_by_role("button", name="Delete event").click()
    await expect(manage.get_by_role("alert")).to_contain_text("is deleted")
    await expect(manage.locator("#events")).not_to_contain_text(name)


def assert_strict_policy(header: str) -> None:
    """A Content-Security-Policy, read as a browser reads it, allows this origin's files and nothing else."""
    directives: dict[str, list[str]] = {}
    for directive in header.split(";"):
        name, *sources = directive.split()
        directives.setdefault(name.lower(), [s.lower() for s in sources])  # a repeated directive is ignored
    assert directives.get("default-src") == ["'none'"], header  # what is not named below is refused
    for fetch in ("script-src", "style-src", "img-src", "connect-src"):
        assert directives.get(fetch, ["'none'"]) in (["'self'"], ["'none'"]), (fetch, header)
    for absent in ("script-src-elem", "script-src-attr", "style-src-elem", "style-src-attr", "worker-src"):
        assert absent not in directives, (absent, header)  # each would widen what its parent allows
    assert directives.get("frame-ancestors") == ["'none'"] and directives.get("base-uri") == ["'none'"], header
    assert directives.get("form-action") == ["'none'"], header


async def test_the_policy_blocks_injected_scripts_in_the_browser(app: str, browser: Browser) -> None:
    """Markup that slipped into a page can run nothing: no inline script, no script or fetch from elsewhere."""
    elsewhere = ThreadingHTTPServer(("127.0.0.2", 0), _Elsewhere)  # another origin that would serve a script
    threading.Thread(target=elsewhere.serve_forever, daemon=True).start()
    other = f"http://127.0.0.2:{elsewhere.server_address[1]}"
    context = await browser.new_context()
    try:
        for path in ("/api/portal", "/api/manage/portal"):
            page = await context.new_page()
            await page.goto(app + path)
            await page.evaluate(
                """(other) => {
                    window.ran = [];
                    window.refused = [];
                    document.addEventListener("securitypolicyviolation", (e) => window.refused.push(e.blockedURI));
                    const inline = document.createElement("script");
                    inline.textContent = "window.ran.push('inline')";
                    document.body.append(inline);
                    const external = document.createElement("script");
                    external.src = other + "/evil.js";
                    document.body.append(external);
                    const handler = document.createElement("img");
                    handler.setAttribute("onerror", "window.ran.push('attribute')");
                    handler.src = "/api/portal/no-such-image.svg";
                    document.body.append(handler);
                    fetch(other + "/data").then(() => window.ran.push("fetch"), () => {});
                }""",
                other,
            )
            # Each of the four either ran or was refused with a violation report.
            await page.wait_for_function("window.refused.length + window.ran.length >= 4")
            assert await page.evaluate("window.ran") == [], path
            refused = await page.evaluate("window.refused")
            assert {"inline", f"{other}/evil.js", f"{other}/data"} <= set(refused), refused
            await page.close()
    finally:
        await context.close()
        elsewhere.shutdown()
        elsewhere.server_close()


class _Elsewhere(BaseHTTPRequestHandler):
    """Answers every GET with a script that records it ran (and lets any origin read it)."""

    def do_GET(self) -> None:
        body = b"window.ran.push('external');"
        self.send_response(200)
        self.send_header("content-type", "text/javascript")
        self.send_header("access-control-allow-origin", "*")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


async def test_organizer_sees_charts_and_the_plan(
    app: str, browsing: Watched, make_event: MakeEvent, tables: Tables
) -> None:
    """Requests, tokens and cost per hour by model, the models, the top attendees, drawn as SVG by the page."""
    name = f"Charted {secrets.token_hex(3)}"
    webhook = "https://hooks.example.com/services/T0/B0/s3cr3t"
    created = await make_event(name=name, max_attendees=40, time_zone="Pacific/Auckland", daily_cost=1.5,
                               event_cost=100.0, alert_webhook=webhook)  # fmt: skip
    async with httpx.AsyncClient(base_url=f"{app}/api/v1", timeout=30) as client:
        for user, asks in (("ana", 3), ("ben", 2), ("cy", 1)):
            for _ in range(asks):
                headers = {"api-key": created.key(user)}
                chat = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "chart me " * 20}]}
                assert (await client.post("/chat/completions", json=chat, headers=headers)).status_code == 200
        embed = {"model": "text-embedding-3-small", "input": "embed me"}
        assert (
            await client.post("/embeddings", json=embed, headers={"api-key": created.key("ana")})
        ).status_code == 200

    manage = await browsing.page()
    await manage.goto(f"{app}/api/manage/portal")
    await manage.get_by_label("Organizer key").fill(ORGANIZER_KEY)
    await manage.get_by_role("button", name="Sign in").click()
    await manage.get_by_role("button", name=f"Manage {name}").click()

    facts = manage.locator("#detail-facts")
    await expect(facts).to_contain_text("Cost per attendee per day$1.50")
    await expect(facts).to_contain_text("Budget alerts tohttps://hooks.example.com/…")
    assert "s3cr3t" not in await manage.content()
    await expect(manage.locator("#usage-budget")).to_contain_text(re.compile(r"cost \$0\.0\d+ of \$100\.00"))
    hours = manage.locator("#activity-hours svg")
    await expect(hours).to_have_count(3)
    for title in ("Requests per hour", "Tokens per hour", "Cost (USD) per hour"):
        await expect(manage.get_by_role("img", name=title)).to_be_visible()
    # One column this hour, stacked by model: 7 requests, 6 of gpt-4o-mini and 1 embedding.
    requests_chart = manage.get_by_role("img", name="Requests per hour")
    await expect(requests_chart.locator("rect")).to_have_count(2)
    stacked = [re.compile(r"gpt-4o-mini: 6$"), re.compile(r"text-embedding-3-small: 1$")]
    await expect(requests_chart.locator("rect title")).to_contain_text(stacked)
    # The hour is the event's own (Auckland), not the browser's (Paris) nor UTC.
    auckland = datetime.now(UTC).astimezone(ZoneInfo("Pacific/Auckland")).strftime("%Y-%m-%dT%H:00")
    await expect(requests_chart.locator("rect title").first).to_contain_text(auckland)
    models = manage.get_by_role("img", name="Cost by model")
    await expect(models.locator("text")).to_contain_text(["Cost by model", "gpt-4o-mini", re.compile(r"^\$0\.0\d+ · ")],
                                                         timeout=WAIT_MS)  # fmt: skip
    top = manage.get_by_role("img", name="Top attendees by cost")
    await expect(top.locator("text").nth(1)).to_have_text("ana")  # 3 chats and an embedding: the most
    await expect(top.locator("text").nth(3)).to_have_text("ben")
    await expect(manage.locator("#activity-legend")).to_contain_text("text-embedding-3-small")

    # The plan, on the page: 40 attendees (max_attendees) and no tokens-per-minute cap: the quota cannot hold.
    await expect(manage.get_by_label("Expected attendees")).to_have_value("40")
    await manage.get_by_label("Quota per model (MODEL=TPM, comma-separated)").fill("gpt-4o-mini=40000")
    await manage.get_by_role("button", name="Show plan").click()
    result = manage.locator("#plan-result")
    await expect(result).to_contain_text("40 attendees (given)")
    await expect(result.locator(".plan-model").first).to_contain_text("against 40,000 TPM (--tpm): does not hold")
    await expect(result.locator(".plan-model").first.locator("li").first).to_contain_text("--tpm 1000:")
    await manage.locator("#activity").scroll_into_view_if_needed()
    await screenshots(manage, "organizer-charts")

    # The cost caps and the webhook from the editor: the masked webhook left as shown is not sent back.
    await manage.get_by_role("button", name="Edit").click()
    await expect(manage.get_by_label("Budget alerts webhook (https; POSTed at 80 % and 100 %)")).to_have_value(
        "https://hooks.example.com/…"
    )
    await manage.get_by_label("Cost per day (USD)").fill("2.25")
    await manage.get_by_label("Cost, whole event (USD)").fill("")
    await manage.get_by_role("button", name="Save changes").click()
    await expect(facts).to_contain_text("Cost per attendee per day$2.25")
    await expect(facts).not_to_contain_text("Cost, whole event")
    await expect(facts).to_contain_text("Budget alerts tohttps://hooks.example.com/…")
    stored = await EventStore(tables, SecretHasher(CODE_HASH_KEY), 0).get(created.event.id)
    assert (stored.alert_webhook, stored.daily_cost, stored.event_cost) == (webhook, 2.25, None)


def test_pages_and_assets_carry_strict_headers(app: str, http: httpx.Client) -> None:
    for path in ("/api/portal", "/api/manage/portal"):
        page = http.get(app + path)
        assert page.status_code == 200
        assert page.headers["content-type"] == "text/html; charset=utf-8"
        assert_strict_policy(page.headers["content-security-policy"])
        assert page.headers["x-frame-options"] == "DENY"
        assert page.headers["referrer-policy"] == "no-referrer"
        assert page.headers["x-content-type-options"] == "nosniff"
        assert page.headers["cache-control"] == "no-cache"
        # No inline script or style, nothing from another origin.
        assert not re.search(r"<script(?![^>]*\bsrc=)", page.text)
        assert "style=" not in page.text and "<style" not in page.text
        assert not re.search(r"(src|href)=\"(https?:)?//", page.text)
        assert page.headers["content-encoding"] == "gzip"  # httpx asks for it, and decodes it
        plain = http.get(app + path, headers={"accept-encoding": "identity"})
        assert "content-encoding" not in plain.headers and plain.content == page.content
        again = http.get(app + path, headers={"if-none-match": page.headers["etag"]})
        assert again.status_code == 304 and again.content == b""

        for asset in re.findall(r"(?:src|href)=\"(/api/portal/[^\"]+)\"", page.text):
            fresh = http.get(app + asset)
            assert fresh.status_code == 200, asset
            assert fresh.headers["cache-control"] == "public, max-age=31536000, immutable"
            assert_strict_policy(fresh.headers["content-security-policy"])
            expected = {"css": "text/css", "js": "text/javascript", "svg": "image/svg+xml"}
            assert fresh.headers["content-type"].startswith(expected[asset.split("?")[0].rsplit(".", 1)[1]])
            unversioned = http.get(app + asset.split("?")[0])
            assert unversioned.headers["cache-control"] == "no-cache"
            assert unversioned.content == fresh.content

    missing = http.get(f"{app}/api/portal/nothing.js")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


def raw_get(app: str, target: str) -> tuple[int, bytes]:
    """GET ``target`` byte for byte over a socket: httpx would resolve its dot segments before sending."""
    url = httpx.URL(app)
    connection = h11.Connection(h11.CLIENT)
    request = h11.Request(method="GET", target=target.encode(), headers=[("host", url.netloc), ("connection", "close")])
    with socket.create_connection((url.host, url.port), timeout=30) as sock:
        sock.sendall(connection.send(request) + connection.send(h11.EndOfMessage()))
        status, body = 0, b""
        while True:
            event = connection.next_event()
            if event is h11.NEED_DATA:
                connection.receive_data(sock.recv(65536))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                body += bytes(event.data)
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                return status, body


def test_dot_segments_reach_no_file(app: str) -> None:
    """``/api/portal/{*asset}`` takes slashes: ``..`` in any spelling must not climb out of the pages' folder."""
    status, css = raw_get(app, "/api/portal/site.css")  # the client itself reaches a file
    assert status == 200 and css == (ROOT / "proxy" / "static" / "site.css").read_bytes()
    secrets_of = [
        (ROOT / name).read_bytes()[:120] for name in ("function_app.py", "proxy/config/settings.py", "host.json")
    ]
    for target in (
        "/api/portal/../function_app.py",
        "/api/portal/../../function_app.py",
        "/api/portal/../../../host.json",
        "/api/portal/../../proxy/settings.py",
        "/api/portal/x/../../../function_app.py",
        "/api/portal/..%2F..%2Ffunction_app.py",
        "/api/portal/%2e%2e/%2e%2e/function_app.py",
        "/api/portal/..%5C..%5Cfunction_app.py",
        "/api/portal/%252e%252e/%252e%252e/function_app.py",
        "/api/portal/site.css/../../../function_app.py",
    ):
        status, body = raw_get(app, target)
        assert 400 <= status < 500, (target, status)
        assert not any(secret in body for secret in secrets_of), target


def test_page_assets_ship_in_the_package() -> None:
    rules = parse_ignore((ROOT / ".funcignore").read_text())
    static = ROOT / "proxy" / "static"
    files = sorted(path.name for path in static.iterdir())
    assert {"portal.html", "manage.html", "site.css", "common.js", "portal.js", "manage.js"} <= set(files)
    for name in files:
        assert not is_ignored(f"proxy/static/{name}", rules), name
