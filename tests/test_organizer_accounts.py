"""Organizer accounts and roles over real HTTP and the CLI (``proxy.policy.accounts``), and the audit log
(``proxy.policy.audit``).

The invariants: an account sees only the events it owns or that are shared with it, and every other event
answers exactly as one that does not exist (404, same body); a viewer changes nothing (403); sharing takes
effect at once; keys are shown once and never again; every change has exactly one audit entry, naming the
right account, even when two processes change one event at once.
"""

from __future__ import annotations

import re
import secrets
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from playwright.async_api import expect

from proxy.manage.models import AccountKey, AccountList, AuditList, Shares
from tests.conftest import LENIENT
from tests.relay import StorageRelay
from tests.support import ORGANIZER_KEY, Service, app_env, start_app, wait_for
from tests.test_manage_cli import Cli, cli, ok  # noqa: F401 (the cli fixture)
from tests.test_pages import Watched, browser, browsing, screenshots  # noqa: F401 (the browser fixtures)

ADMIN = {"Authorization": f"Bearer {ORGANIZER_KEY}"}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def window() -> dict[str, str]:
    now = datetime.now(UTC).replace(microsecond=0)
    return {"start": (now - timedelta(hours=1)).isoformat(), "end": (now + timedelta(hours=8)).isoformat()}


def account(http: httpx.Client, app: str, role: str, prefix: str = "acct") -> tuple[str, str]:
    name = f"{prefix}-{secrets.token_hex(4)}"
    made = http.post(f"{app}/api/manage/organizers", json={"name": name, "role": role}, headers=ADMIN)
    assert made.status_code == 201, made.text
    body = made.json()
    assert body["name"] == name and body["role"] == role and body["key"].startswith("ok-")
    return name, str(body["key"])


def event_of(http: httpx.Client, app: str, headers: dict[str, str], name: str = "Accounts test") -> str:
    made = http.post(f"{app}/api/manage/events", json={"name": name, **window()}, headers=headers)
    assert made.status_code == 201, made.text
    return str(made.json()["id"])


def every_route(event_id: str) -> list[tuple[str, str, dict[str, Any] | None]]:
    """(method, path, body) of every event route: reads first, then writes."""
    base = f"/api/manage/events/{event_id}"
    return [
        ("GET", base, None),
        ("GET", f"{base}/usage", None),
        ("GET", f"{base}/usage?by=model", None),
        ("GET", f"{base}/attendees", None),
        ("GET", f"{base}/plan?attendees=5", None),
        ("GET", f"/api/manage/audit?event={event_id}", None),
        ("PATCH", base, {"description": "changed"}),
        ("POST", f"{base}/rotate-code", None),
        ("PATCH", f"{base}/attendees/alice", {"blocked": True}),
        ("POST", f"{base}/attendees/alice/reset-key", None),
        ("POST", f"{base}/share", {"organizer": "someone", "role": "viewer"}),
        ("DELETE", f"{base}/share/someone", None),
        ("DELETE", base, None),
    ]


READS = 6


def call(http: httpx.Client, app: str, method: str, path: str, body: Any, headers: dict[str, str]) -> httpx.Response:
    return http.request(method, f"{app}{path}", json=body, headers=headers)


def test_an_organizer_sees_only_its_events_and_others_are_404_like_nothing(http: httpx.Client, app: str) -> None:
    ada, ada_key = account(http, app, "organizer", "ada")
    _, bob_key = account(http, app, "organizer", "bob")
    mine = event_of(http, app, bearer(ada_key))
    theirs = event_of(http, app, bearer(bob_key))
    created_by_admin = event_of(http, app, ADMIN)

    listed = {e["id"] for e in http.get(f"{app}/api/manage/events", headers=bearer(ada_key)).json()["data"]}
    assert mine in listed and theirs not in listed and created_by_admin not in listed
    shown = http.get(f"{app}/api/manage/events/{mine}", headers=bearer(ada_key)).json()
    assert shown["owner"] == ada and shown["shared"] == {}
    admin_sees = {e["id"] for e in http.get(f"{app}/api/manage/events", headers=ADMIN).json()["data"]}
    assert {mine, theirs, created_by_admin} <= admin_sees

    # Every route on another's event answers as on an id that was never used: same status, same body.
    nowhere = f"nothing-{secrets.token_hex(3)}"
    for (method, path, body), (_, nothing_path, _) in zip(every_route(theirs), every_route(nowhere), strict=True):
        guessed = call(http, app, method, path, body, bearer(ada_key))
        absent = call(http, app, method, nothing_path, body, bearer(ada_key))
        assert guessed.status_code == absent.status_code == 404, (method, path, guessed.text, absent.text)
        assert guessed.text.replace(theirs, "ID") == absent.text.replace(nowhere, "ID"), (method, path)
    # ... and nothing was changed: bob's event is whole.
    still = http.get(f"{app}/api/manage/events/{theirs}", headers=bearer(bob_key))
    assert still.status_code == 200 and still.json()["description"] == ""
    # The whole log, as ada may read it: the entries of her events only.
    log = http.get(f"{app}/api/manage/audit", headers=bearer(ada_key)).json()["data"]
    assert {e["event_id"] for e in log} == {mine} and all(e["action"] != "account-add" for e in log)
    # An organizer is no admin: accounts are out of reach.
    assert http.get(f"{app}/api/manage/organizers", headers=bearer(ada_key)).status_code == 403
    made = http.post(f"{app}/api/manage/organizers", json={"name": "x1", "role": "admin"}, headers=bearer(ada_key))
    assert made.status_code == 403 and made.json()["error"]["code"] == "forbidden"


def test_a_viewer_reads_what_is_shared_and_changes_nothing(http: httpx.Client, app: str) -> None:
    ada, ada_key = account(http, app, "organizer", "ada")
    vic, vic_key = account(http, app, "viewer", "vic")
    event_id = event_of(http, app, bearer(ada_key))
    assert http.get(f"{app}/api/manage/events/{event_id}", headers=bearer(vic_key)).status_code == 404

    shared = http.post(f"{app}/api/manage/events/{event_id}/share", json={"organizer": vic, "role": "viewer"},
                       headers=bearer(ada_key))  # fmt: skip
    assert shared.status_code == 200 and Shares.model_validate(shared.json()).shared == {vic: "viewer"}, shared.text
    # At once: the share is read with the event, no cache in between.
    for method, path, body in every_route(event_id)[:READS]:
        answer = call(http, app, method, path, body, bearer(vic_key))
        assert answer.status_code == 200, (path, answer.text)
    for method, path, body in every_route(event_id)[READS:]:
        answer = call(http, app, method, path, body, bearer(vic_key))
        assert answer.status_code == 403 and answer.json()["error"]["code"] == "forbidden", (method, path, answer.text)
    created = http.post(f"{app}/api/manage/events", json={"name": "V", **window()}, headers=bearer(vic_key))
    assert created.status_code == 403
    probe = http.post(f"{app}/api/manage/probe", json={"models": ["gpt-4o-mini"]}, headers=bearer(vic_key))
    assert probe.status_code == 403
    # Shared as organizer, a viewer account still only reads.
    http.post(f"{app}/api/manage/events/{event_id}/share", json={"organizer": vic, "role": "organizer"},
              headers=bearer(ada_key))  # fmt: skip
    patch = http.patch(f"{app}/api/manage/events/{event_id}", json={"description": "x"}, headers=bearer(vic_key))
    assert patch.status_code == 403
    assert http.get(f"{app}/api/manage/events/{event_id}", headers=ADMIN).json()["description"] == ""

    unshared = http.delete(f"{app}/api/manage/events/{event_id}/share/{vic}", headers=bearer(ada_key))
    assert unshared.status_code == 200 and unshared.json()["shared"] == {}
    assert http.get(f"{app}/api/manage/events/{event_id}", headers=bearer(vic_key)).status_code == 404
    assert ada == http.get(f"{app}/api/manage/events/{event_id}", headers=ADMIN).json()["owner"]


def test_a_shared_organizer_changes_the_event_and_sharing_names_real_accounts(http: httpx.Client, app: str) -> None:
    _, ada_key = account(http, app, "organizer", "ada")
    bob, bob_key = account(http, app, "organizer", "bob")
    event_id = event_of(http, app, bearer(ada_key))
    unknown = http.post(f"{app}/api/manage/events/{event_id}/share", json={"organizer": "nobody-here-x"},
                        headers=bearer(ada_key))  # fmt: skip
    assert unknown.status_code == 400 and unknown.json()["error"]["param"] == "organizer"
    extra = http.post(f"{app}/api/manage/events/{event_id}/share", json={"organizer": bob, "admin": True},
                      headers=bearer(ada_key))  # fmt: skip
    assert extra.status_code == 400 and extra.json()["error"]["param"] == "admin"
    http.post(f"{app}/api/manage/events/{event_id}/share", json={"organizer": bob}, headers=bearer(ada_key))
    patched = http.patch(f"{app}/api/manage/events/{event_id}", json={"description": "by bob"}, headers=bearer(bob_key))
    assert patched.status_code == 200 and patched.json()["description"] == "by bob"


def test_account_keys_shown_once_reset_and_removed(http: httpx.Client, app: str) -> None:
    name, key = account(http, app, "organizer", "kim")
    assert http.get(f"{app}/api/manage/events", headers=bearer(key)).status_code == 200
    listed = http.get(f"{app}/api/manage/organizers", headers=ADMIN)
    assert listed.status_code == 200 and key not in listed.text
    AccountList.model_validate(listed.json())
    assert any(a["name"] == name and a["role"] == "organizer" for a in listed.json()["data"])
    assert all(set(a) == {"name", "role", "created_at", "created_by"} for a in listed.json()["data"])
    taken = http.post(f"{app}/api/manage/organizers", json={"name": name, "role": "viewer"}, headers=ADMIN)
    assert taken.status_code == 409

    reset = http.post(f"{app}/api/manage/organizers/{name}/reset-key", headers=ADMIN)
    assert reset.status_code == 200, reset.text
    new_key = AccountKey.model_validate(reset.json()).key
    assert new_key != key
    assert http.get(f"{app}/api/manage/events", headers=bearer(key)).status_code == 401  # at once, this instance
    assert http.get(f"{app}/api/manage/events", headers=bearer(new_key)).status_code == 200

    removed = http.delete(f"{app}/api/manage/organizers/{name}", headers=ADMIN)
    assert removed.status_code == 200 and removed.json() == {"name": name, "removed": True}
    assert http.get(f"{app}/api/manage/events", headers=bearer(new_key)).status_code == 401
    assert http.delete(f"{app}/api/manage/organizers/{name}", headers=ADMIN).status_code == 404
    bad = http.post(f"{app}/api/manage/organizers", json={"name": "ORGANIZER_KEY", "role": "admin"}, headers=ADMIN)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "name"


def audit_of(http: httpx.Client, app: str, event_id: str, headers: dict[str, str] = ADMIN) -> list[dict[str, Any]]:
    answer = http.get(f"{app}/api/manage/audit", params={"event": event_id}, headers=headers)
    assert answer.status_code == 200, answer.text
    return list(answer.json()["data"])


def test_every_change_has_one_audit_entry_without_secrets(http: httpx.Client, app: str) -> None:
    ada, ada_key = account(http, app, "organizer", "ada")
    vic, _ = account(http, app, "viewer", "vic")
    code = "Audit" + secrets.token_hex(8)
    made = http.post(f"{app}/api/manage/events", json={"name": "Audited", "code": code, **window()},
                     headers=bearer(ada_key))  # fmt: skip
    event_id = made.json()["id"]
    base = f"{app}/api/manage/events/{event_id}"
    http.patch(base, json={"description": "first", "tpm": 900}, headers=bearer(ada_key))
    rotated = http.post(f"{base}/rotate-code", headers=bearer(ada_key)).json()["code"]
    http.patch(f"{base}/attendees/alice", json={"blocked": True}, headers=ADMIN)
    http.patch(f"{base}/attendees/alice", json={"blocked": False}, headers=bearer(ada_key))
    http.post(f"{base}/attendees/alice/reset-key", headers=bearer(ada_key))
    http.post(f"{base}/share", json={"organizer": vic, "role": "viewer"}, headers=bearer(ada_key))
    http.delete(f"{base}/share/{vic}", headers=bearer(ada_key))
    http.patch(base, json={"description": "first"}, headers=bearer(ada_key))  # no change: no entry
    http.delete(base, headers=bearer(ada_key))

    entries = audit_of(http, app, event_id)
    AuditList.model_validate({"object": "list", "event_id": event_id, "data": entries})
    schema = http.get(f"{app}/api/manage/openapi.json", headers=bearer(ada_key)).json()
    assert {"/audit", "/organizers", "/organizers/{name}/reset-key", "/events/{event_id}/share"} <= set(schema["paths"])
    actions = [(e["account"], e["action"]) for e in reversed(entries)]
    assert actions == [
        (ada, "create"), (ada, "update"), (ada, "rotate-code"), ("ORGANIZER_KEY", "block"), (ada, "unblock"),
        (ada, "reset-key"), (ada, "share"), (ada, "unshare"), (ada, "delete"),
    ]  # fmt: skip
    by_action = {e["action"]: e for e in entries}
    assert by_action["update"]["changes"] == {"description": {"old": "", "new": "first"},
                                              "tpm": {"old": None, "new": 900}}  # fmt: skip
    assert by_action["block"]["target"] == "alice"
    assert by_action["block"]["changes"] == {"blocked": {"old": False, "new": True}}
    assert by_action["share"]["changes"] == {"shared": {"old": {}, "new": {vic: "viewer"}}}
    assert by_action["create"]["changes"]["name"] == {"old": None, "new": "Audited"}
    assert by_action["delete"]["changes"]["name"] == {"old": "Audited", "new": None}
    assert by_action["rotate-code"]["changes"] == {}
    assert all(e["event_id"] == event_id and e["via"] == "api" for e in entries)
    text = http.get(f"{app}/api/manage/audit", headers=ADMIN).text
    assert code not in text and rotated not in text and "code_hash" not in text and ada_key not in text
    # Entries cannot be changed through the product.
    for method in ("POST", "PATCH", "DELETE", "PUT"):
        assert http.request(method, f"{app}/api/manage/audit", headers=ADMIN).status_code in (404, 405)


def test_account_changes_are_audited(http: httpx.Client, app: str) -> None:
    name, key = account(http, app, "viewer", "aud")
    http.post(f"{app}/api/manage/organizers/{name}/reset-key", headers=ADMIN)
    http.delete(f"{app}/api/manage/organizers/{name}", headers=ADMIN)
    entries = [e for e in http.get(f"{app}/api/manage/audit", headers=ADMIN).json()["data"] if e["target"] == name]
    assert [e["action"] for e in reversed(entries)] == ["account-add", "account-reset-key", "account-remove"]
    assert all(e["account"] == "ORGANIZER_KEY" and e["event_id"] is None for e in entries)
    assert key not in str(entries)


def test_concurrent_changes_from_two_processes_one_entry_each_with_its_account(
    http: httpx.Client, app: str, app_process: tuple[Service, str]
) -> None:
    """Two accounts PATCH one event at once, each through its own app process: every change answered 200 has
    exactly one entry naming its account, and the entries' old and new values chain into one history."""
    _, other = app_process
    ada, ada_key = account(http, app, "organizer", "ada")
    bob, bob_key = account(http, app, "organizer", "bob")
    event_id = event_of(http, app, bearer(ada_key))
    http.post(f"{app}/api/manage/events/{event_id}/share", json={"organizer": bob}, headers=bearer(ada_key))
    rounds = 12

    def patch(index: int) -> tuple[str, int]:
        who, url, key = (ada, app, ada_key) if index % 2 == 0 else (bob, other, bob_key)
        value = f"{who}-{index}"
        with httpx.Client(timeout=60) as client:
            answer = client.patch(f"{url}/api/manage/events/{event_id}", json={"description": value},
                                  headers=bearer(key))  # fmt: skip
        return value, answer.status_code

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(patch, range(rounds * 2)))
    landed = {value for value, status in results if status == 200}
    assert landed and all(status in (200, 409) for _, status in results), results
    updates = [e for e in audit_of(http, app, event_id) if e["action"] == "update"]
    assert sorted(e["changes"]["description"]["new"] for e in updates) == sorted(landed)
    assert all(e["account"] == e["changes"]["description"]["new"].rsplit("-", 1)[0] for e in updates)
    # One history: each value replaced the one before it, from the empty description to the last.
    chain = {e["changes"]["description"]["old"]: e["changes"]["description"]["new"] for e in updates}
    assert len(chain) == len(updates)
    value, seen = "", 0
    while value in chain:
        value, seen = chain[value], seen + 1
    assert seen == len(updates)
    assert http.get(f"{app}/api/manage/events/{event_id}", headers=ADMIN).json()["description"] == value


def test_cli_accounts_sharing_and_audit(cli: Cli, http: httpx.Client, app: str) -> None:  # noqa: F811
    name = f"cli-{secrets.token_hex(4)}"
    added = ok(cli("organizers", "add", name, "--role", "organizer", "--json"))
    assert added["name"] == name and added["key"].startswith("ok-")
    listed = cli("organizers", "list")
    assert listed.returncode == 0 and name in listed.stdout and added["key"] not in listed.stdout
    event_id = event_of(http, app, ADMIN)
    assert http.get(f"{app}/api/manage/events/{event_id}", headers=bearer(added["key"])).status_code == 404
    shared = ok(cli("events", "share", event_id, name, "--json"))
    assert shared["shared"] == {name: "organizer"}
    assert http.get(f"{app}/api/manage/events/{event_id}", headers=bearer(added["key"])).status_code == 200
    ok(cli("events", "unshare", event_id, name, "--json"))
    assert http.get(f"{app}/api/manage/events/{event_id}", headers=bearer(added["key"])).status_code == 404
    log = ok(cli("audit", event_id, "--json"))
    assert [(e["action"], e["account"], e["via"]) for e in log["data"]][:2] == [
        ("unshare", "ORGANIZER_KEY", "cli"), ("share", "ORGANIZER_KEY", "cli"),
    ]  # fmt: skip
    readable = cli("audit", event_id)
    assert readable.returncode == 0 and "unshare" in readable.stdout and name in readable.stdout
    reset = ok(cli("organizers", "reset-key", name, "--json"))
    assert reset["key"] != added["key"]
    removed = cli("organizers", "remove", name)
    assert removed.returncode == 0 and reset["key"] not in removed.stdout
    missing = cli("organizers", "remove", name)
    assert missing.returncode == 2 and "No organizer account" in missing.stderr
    viewer = cli("organizers", "add", "v" + name, "--role", "superuser")
    assert viewer.returncode == 2


@pytest.mark.parametrize("header", ["Bearer ok-" + "A" * 32, "Bearer ok-short", "Bearer " + "x" * 5000])
def test_unknown_and_malformed_account_keys_are_401(http: httpx.Client, app: str, header: str) -> None:
    answer = http.get(f"{app}/api/manage/events", headers={"Authorization": header})
    assert answer.status_code == 401 and answer.json()["error"]["code"] == "unauthorized"


async def test_the_page_signs_in_with_an_account_key_and_shows_its_events_and_the_audit(
    app: str,
    browsing: Watched,  # noqa: F811
) -> None:
    async with httpx.AsyncClient(timeout=30) as client:

        async def post(path: str, body: dict[str, Any], headers: dict[str, str]) -> dict[str, Any]:
            answer = await client.post(f"{app}/api/manage{path}", json=body, headers=headers)
            assert answer.status_code in (200, 201), answer.text
            return dict(answer.json())

        ada = await post("/organizers", {"name": f"ada-{secrets.token_hex(3)}", "role": "organizer"}, ADMIN)
        vic = await post("/organizers", {"name": f"vic-{secrets.token_hex(3)}", "role": "viewer"}, ADMIN)
        shared_name, hidden_name = f"Shared {secrets.token_hex(3)}", f"Hidden {secrets.token_hex(3)}"
        event = await post("/events", {"name": shared_name, **window()}, bearer(ada["key"]))
        await post("/events", {"name": hidden_name, **window()}, ADMIN)
        await post(f"/events/{event['id']}/share", {"organizer": vic["name"], "role": "viewer"}, bearer(ada["key"]))

    page = await browsing.page()
    await page.goto(f"{app}/api/manage/portal")
    await page.get_by_label("Organizer key").fill(vic["key"])
    await page.get_by_role("button", name="Sign in").click()
    await expect(page.locator("#events")).to_contain_text(shared_name)
    await expect(page.locator("#events")).not_to_contain_text(hidden_name)
    await page.get_by_role("button", name=f"Manage {shared_name}").click()
    await expect(page.locator("#detail-facts")).to_contain_text(ada["name"])
    audit = page.locator("#audit-table tbody tr")
    await expect(audit).to_have_count(2)  # newest first
    shared, created = audit.nth(0).locator("td"), audit.nth(1).locator("td")
    await expect(shared).to_have_text([re.compile(r"\d\d:\d\d"), ada["name"], "share", event["id"], vic["name"],
                                       f'shared: {{}} → {{"{vic["name"]}":"viewer"}}'])  # fmt: skip
    await expect(created.nth(1)).to_have_text(ada["name"])
    await expect(created.nth(2)).to_have_text("create")
    # A viewer is offered no change (the API refuses them anyway: 403, tested above).
    for button in ("New event", "Edit", "Rotate code", "Disable", "Delete"):
        await expect(page.get_by_role("button", name=button, exact=True)).to_be_hidden()
    await page.get_by_role("button", name="All I can see").click()
    await expect(audit).to_have_count(2)  # the hidden event's creation is not among them
    await screenshots(page, "organizer-audit")
    assert vic["key"] not in await page.content()


@pytest.fixture(scope="module")
def counted(azurite: str, simulator: str) -> Iterator[tuple[StorageRelay, str]]:
    """An app whose storage calls all pass a relay that counts them; events and keys cached for 30 s."""
    port = int(azurite.split("TableEndpoint=http://127.0.0.1:")[1].split("/")[0])
    relay = StorageRelay(port)
    service, url = start_app(app_env(relay.connection_string(azurite), simulator, EVENT_CACHE_SECONDS="30", **LENIENT))
    yield relay, url
    service.stop()
    relay.close()


def test_an_account_costs_one_point_read_per_cache_lifetime(http: httpx.Client, counted: tuple[Any, str]) -> None:
    """The same organizer request with ORGANIZER_KEY and with an account's key: the account's first costs one
    storage call more (its key's point read), the next ones none more; a change with its audit entry costs the
    calls it cost without one (the entry rides in the change's transaction)."""
    relay, app = counted
    name, used = account(http, app, "organizer", "cost")
    event_id = event_of(http, app, bearer(used))
    key = http.post(f"{app}/api/manage/organizers/{name}/reset-key", headers=ADMIN).json()["key"]  # not cached yet

    def calls(method: str, path: str, headers: dict[str, str], body: Any = None) -> list[tuple[str, str]]:
        rule = relay.arm(lambda _method, _path, _body: True, "delay", times=1000)
        answer = http.request(method, f"{app}{path}", json=body, headers=headers)
        assert answer.status_code == 200, answer.text
        rule.times = 0  # disarmed
        return list(rule.seen)

    show = f"/api/manage/events/{event_id}"
    admin = calls("GET", show, ADMIN)
    first = calls("GET", show, bearer(key))
    again = calls("GET", show, bearer(key))
    assert len(first) == len(admin) + 1 and len(again) == len(admin), (admin, first, again)
    assert "organizer" in first[0][1] and "key%7C" in first[0][1]  # the point read of the key's row
    patched = calls("PATCH", show, bearer(key), {"description": "counted"})
    assert [method for method, _ in patched] == ["GET", "POST"] and patched[1][1].endswith("$batch"), patched
    print(f"storage calls: show with ORGANIZER_KEY {len(admin)}, with an account {len(first)} then {len(again)}; "
          f"a PATCH {len(patched)}")  # fmt: skip


def test_an_account_removed_while_its_requests_are_in_flight(http: httpx.Client, app: str) -> None:
    """An account keeps writing while an admin removes it: every write answered 200 has its entry naming the
    account, none is answered 500, and once the removal is answered its key opens nothing on this instance."""
    name, key = account(http, app, "organizer", "gone")
    event_id = event_of(http, app, bearer(key))
    url = f"{app}/api/manage/events/{event_id}"
    stop = threading.Event()

    def keep_writing(worker: int) -> list[tuple[str, int]]:
        done = []
        with httpx.Client(timeout=60) as client:
            for index in range(40):
                if stop.is_set():
                    break
                value = f"w{worker}-{index}"
                done.append((value, client.patch(url, json={"description": value}, headers=bearer(key)).status_code))
        return done

    with ThreadPoolExecutor(4) as pool:
        writers = [pool.submit(keep_writing, worker) for worker in range(3)]
        wait_for(lambda: http.get(url, headers=ADMIN).json()["description"] != "", 30, "a first write")
        removed = http.delete(f"{app}/api/manage/organizers/{name}", headers=ADMIN)
        assert removed.status_code == 200
        after = http.get(url, headers=bearer(key))
        stop.set()
        results = [result for writer in writers for result in writer.result()]
    assert after.status_code == 401
    assert {status for _, status in results} <= {200, 401, 409}, results
    landed = {value for value, status in results if status == 200}
    updates = [e for e in audit_of(http, app, event_id) if e["action"] == "update"]
    assert {e["changes"]["description"]["new"] for e in updates} == landed and len(updates) == len(landed)
    assert all(e["account"] == name for e in updates)


def test_a_change_whose_audit_entry_is_refused_is_not_made(http: httpx.Client, counted: tuple[Any, str]) -> None:
    """The entry rides in the change's transaction: when Table Storage refuses the entry, the change is refused
    with it (503, the event as it was, no entry); the same change then lands with its entry."""
    relay, app = counted
    event_id = event_of(http, app, ADMIN)
    url = f"{app}/api/manage/events/{event_id}"

    def entry_refused(method: str, path: str, body: bytes) -> bool:
        return method == "POST" and path.endswith("$batch") and b'"action": "update"' in body

    # A row key with "#" is one Table Storage refuses (400): the entry is refused, so the batch is.
    rule = relay.arm(entry_refused, "tamper", rewrite=lambda body: body.replace(b"~audit|", b"~audit#"))
    refused = http.patch(url, json={"description": "never"}, headers=ADMIN)
    assert refused.status_code == 503 and rule.fired == 1, refused.text
    assert http.get(url, headers=ADMIN).json()["description"] == ""
    assert [e["action"] for e in audit_of(http, app, event_id)] == ["create"]
    landed = http.patch(url, json={"description": "now"}, headers=ADMIN)
    assert landed.status_code == 200
    assert [e["action"] for e in audit_of(http, app, event_id)] == ["update", "create"]
