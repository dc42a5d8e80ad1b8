"""The organizer HTTP API over real HTTP: auth, every route, validation, rotation, usage."""

from __future__ import annotations

import csv
import io
import re
import secrets
import time
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import unquote

import httpx
import orjson
import pytest
from openai import OpenAI

from proxy.admission.requestlog import PREFIX as LOG_PREFIX
from proxy.config.settings import Settings
from proxy.ledger.reports import COLUMNS, report
from proxy.storage.tables import USAGE_TABLE, Tables
from tests.relay import StorageRelay
from tests.support import CACHE_SECONDS, ORGANIZER_KEY, app_env, seen_within, start_app, wait_for

AUTH = {"Authorization": f"Bearer {ORGANIZER_KEY}"}


def window(before: timedelta = timedelta(hours=1), after: timedelta = timedelta(hours=8)) -> dict[str, str]:
    now = datetime.now(UTC).replace(microsecond=0)
    return {"start": (now - before).isoformat(), "end": (now + after).isoformat()}


def new_event(http: httpx.Client, app: str, **fields: Any) -> dict[str, Any]:
    response = http.post(f"{app}/api/manage/events", json={"name": "API test", **window(), **fields}, headers=AUTH)
    assert response.status_code == 201, response.text
    return dict(response.json())


def models_status(app: str, key: str) -> int:
    return httpx.get(f"{app}/api/v1/models", headers={"api-key": key}).status_code


def chat(app: str, key: str, text: str = "hello") -> None:
    with OpenAI(base_url=f"{app}/api/v1", api_key=key, max_retries=0) as client:
        client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": text}])


def test_event_routes_round_trip(http: httpx.Client, app: str) -> None:
    code = "Api" + secrets.token_hex(6)
    created = new_event(http, app, code=code, time_zone="Europe/Paris", tpm=5000, organizer="Ada")
    assert created["code"] == code
    assert created["tpm"] == 5000 and created["time_zone"] == "Europe/Paris" and created["active"] is True
    event_id = created["id"]
    public = {k: v for k, v in created.items() if k != "code"}

    listed = http.get(f"{app}/api/manage/events", headers=AUTH).json()
    assert listed["object"] == "list"
    assert public in listed["data"]
    assert all("code" not in e and "code_hash" not in e for e in listed["data"])

    shown = http.get(f"{app}/api/manage/events/{event_id}", headers=AUTH)
    assert shown.status_code == 200 and shown.json() == public

    patched = http.patch(
        f"{app}/api/manage/events/{event_id}",
        json={"name": "Renamed", "tpm": None, "daily_tokens": 9000, "models": ["gpt-4o-mini"]},
        headers=AUTH,
    ).json()
    assert patched["name"] == "Renamed" and patched["tpm"] is None and patched["daily_tokens"] == 9000
    assert patched["models"] == ["gpt-4o-mini"] and patched["start"] == public["start"]
    assert http.get(f"{app}/api/manage/events/{event_id}", headers=AUTH).json() == patched

    deleted = http.delete(f"{app}/api/manage/events/{event_id}", headers=AUTH)
    assert deleted.status_code == 200 and deleted.json() == {"id": event_id, "deleted": True}
    gone = http.get(f"{app}/api/manage/events/{event_id}", headers=AUTH)
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "not_found"
    assert models_status(app, f"{code}/alice") == 401


def test_generated_code_opens_the_event(http: httpx.Client, app: str) -> None:
    created = new_event(http, app)
    assert len(created["code"]) == 16
    assert models_status(app, f"{created['code']}/alice") == 200
    assert created["models"] == ["gpt-4o-mini", "text-embedding-3-small"]
    assert created["daily_requests"] == 1000 and created["max_tokens"] == 4096


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong-key"},
        {"Authorization": f"Basic {ORGANIZER_KEY}"},
        {"api-key": ORGANIZER_KEY},
    ],
)
def test_organizer_key_is_required(http: httpx.Client, app: str, headers: dict[str, str]) -> None:
    for method, path in [("GET", "events"), ("POST", "events"), ("DELETE", "events/x"), ("GET", "events/x/usage")]:
        response = http.request(method, f"{app}/api/manage/{path}", headers=headers, json={})
        assert response.status_code == 401, (method, path)
        assert response.json()["error"]["code"] == "unauthorized"
        assert ORGANIZER_KEY not in response.text


def test_api_is_off_without_an_organizer_key(azurite: str, simulator: str) -> None:
    service, url = start_app(app_env(azurite, simulator, ORGANIZER_KEY=""))
    try:
        response = httpx.get(f"{url}/api/manage/events", headers=AUTH)
    finally:
        service.stop()
    assert response.status_code == 503
    error = response.json()["error"]
    assert error["code"] == "organizer_api_disabled" and "ORGANIZER_KEY" in error["message"]


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"start": "2026-06-02T10:00:00+00:00", "end": "2026-06-01T10:00:00+00:00"}, "start"),
        ({"start": "2026-06-01T10:00:00"}, "start"),
        ({"end": "tomorrow"}, "end"),
        ({"time_zone": "Mars/Olympus"}, "time_zone"),
        ({"code": "no spaces!"}, "code"),
        ({"code": "abc"}, "code"),
        ({"daily_requests": 0}, "daily_requests"),
        ({"max_tokens": -5}, "max_tokens"),
        ({"tpm": "fast"}, "tpm"),
        ({"models": []}, "models"),
        ({"active": "yes"}, "active"),
        ({"name": "  "}, "name"),
        ({"colour": "blue"}, "colour"),
    ],
)
def test_create_rejects_bad_fields(http: httpx.Client, app: str, fields: dict[str, Any], param: str) -> None:
    body = {"name": "Bad", **window(), **fields}
    response = http.post(f"{app}/api/manage/events", json=body, headers=AUTH)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_request" and error["param"] == param
    assert param in error["message"]


def test_malformed_bodies_and_updates(http: httpx.Client, app: str) -> None:
    not_json = http.post(f"{app}/api/manage/events", content=b"{name:", headers=AUTH)
    assert not_json.status_code == 400 and "JSON" in not_json.json()["error"]["message"]
    not_object = http.post(f"{app}/api/manage/events", json=["a"], headers=AUTH)
    assert not_object.status_code == 400

    event_id = new_event(http, app)["id"]
    url = f"{app}/api/manage/events/{event_id}"
    code_change = http.patch(url, json={"code": "NewCode123"}, headers=AUTH).json()["error"]
    assert code_change["param"] == "code" and "rotate-code" in code_change["message"]
    reversed_window = http.patch(url, json={"end": "2000-01-01T00:00:00Z"}, headers=AUTH).json()["error"]
    assert reversed_window["param"] == "start"
    assert http.patch(url, json={"max_tokens": None}, headers=AUTH).json()["error"]["param"] == "max_tokens"
    assert http.patch(f"{app}/api/manage/events/no-such-event", json={"name": "x"}, headers=AUTH).status_code == 404
    assert http.get(f"{app}/api/manage/events/BAD%20ID", headers=AUTH).status_code == 404


def test_rotation_retires_the_old_code(http: httpx.Client, app: str) -> None:
    created = new_event(http, app)
    old_key = f"{created['code']}/alice"
    assert models_status(app, old_key) == 200

    rotated = http.post(f"{app}/api/manage/events/{created['id']}/rotate-code", headers=AUTH)
    assert rotated.status_code == 200
    new_code = rotated.json()["code"]
    assert rotated.json() == {"id": created["id"], "code": new_code} and new_code != created["code"]
    seen_within(CACHE_SECONDS, lambda: models_status(app, old_key), lambda code: code == 401, "the old code retired")
    assert models_status(app, f"{new_code}/alice") == 200

    chosen = "Chosen" + secrets.token_hex(4)
    url = f"{app}/api/manage/events/{created['id']}/rotate-code"
    assert http.post(url, json={"code": chosen}, headers=AUTH).json()["code"] == chosen
    seen_within(CACHE_SECONDS, lambda: models_status(app, f"{chosen}/bob"), lambda code: code == 200, "the chosen code")
    assert models_status(app, f"{new_code}/bob") == 401

    other = new_event(http, app)
    taken = http.post(url, json={"code": other["code"]}, headers=AUTH)
    assert taken.status_code == 400 and taken.json()["error"]["param"] == "code"
    assert other["code"] not in taken.text
    assert http.post(url, json={"colour": "x"}, headers=AUTH).json()["error"]["param"] == "colour"


def test_disable_closes_and_enable_reopens(http: httpx.Client, app: str) -> None:
    created = new_event(http, app)
    key, url = f"{created['code']}/alice", f"{app}/api/manage/events/{created['id']}"
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}

    def chat_status() -> httpx.Response:
        return httpx.post(f"{app}/api/v1/chat/completions", json=body, headers={"api-key": key}, timeout=30)

    assert chat_status().status_code == 200
    assert http.patch(url, json={"active": False}, headers=AUTH).json()["active"] is False
    seen_within(CACHE_SECONDS, chat_status, lambda answer: answer.status_code == 403, "the event closed")
    assert chat_status().json()["error"]["code"] == "event_disabled"
    assert http.patch(url, json={"active": True}, headers=AUTH).json()["active"] is True
    seen_within(CACHE_SECONDS, chat_status, lambda answer: answer.status_code == 200, "the event reopened")


def test_usage_reports_and_survives_deletion(http: httpx.Client, app: str) -> None:
    created = new_event(http, app)
    event_id, code = created["id"], created["code"]
    for _ in range(3):
        chat(app, f"{code}/bob")
    chat(app, f"{code}/carol")
    url = f"{app}/api/manage/events/{event_id}/usage"

    def by_user() -> dict[str, Any]:
        return dict(http.get(url, headers=AUTH).json())

    wait_for(lambda: by_user()["totals"]["requests"] == 4, what="usage to be recorded")
    report_by_user = by_user()
    assert report_by_user["event_id"] == event_id and report_by_user["by"] == "user"
    assert [(r["key"], r["requests"]) for r in report_by_user["rows"]] == [("bob", 3), ("carol", 1)]
    totals = report_by_user["totals"]
    assert totals["total_tokens"] == totals["prompt_tokens"] + totals["completion_tokens"] > 0
    assert sum(r["total_tokens"] for r in report_by_user["rows"]) == totals["total_tokens"]

    by_model = http.get(url, params={"by": "model"}, headers=AUTH).json()
    assert [r["key"] for r in by_model["rows"]] == ["gpt-4o-mini"] and by_model["totals"] == totals
    by_day = http.get(url, params={"by": "day"}, headers=AUTH).json()
    assert [r["key"] for r in by_day["rows"]] == [datetime.now(UTC).strftime("%Y-%m-%d")]

    csv = http.get(url, headers={**AUTH, "Accept": "text/csv"})
    assert csv.headers["content-type"].startswith("text/csv")
    lines = csv.text.splitlines()
    assert lines[0] == "user,requests,prompt_tokens,completion_tokens,total_tokens,cached_tokens,cost,unpriced_requests"
    assert lines[1].startswith("bob,3,") and lines[2].startswith("carol,1,")
    assert lines[-1] == "TOTAL," + ",".join(f"{totals[f]:.9f}" if f == "cost" else str(totals[f]) for f in COLUMNS)

    bad_by = http.get(url, params={"by": "week"}, headers=AUTH)
    assert bad_by.status_code == 400 and bad_by.json()["error"]["param"] == "by"

    assert http.delete(f"{app}/api/manage/events/{event_id}", headers=AUTH).status_code == 200
    assert http.get(url, headers=AUTH).json() == report_by_user
    unknown = http.get(f"{app}/api/manage/events/never-existed-0/usage", headers=AUTH)
    assert unknown.status_code == 404


def test_csv_cells_cannot_become_formulas(http: httpx.Client, app: str) -> None:
    """Attendee names may start with + - @, which a spreadsheet reads as a formula (OWASP CSV injection)."""
    created = new_event(http, app)
    names = ["-2+3", "@SUM", "+1"]
    for name in names:
        chat(app, f"{created['code']}/{name}")
    url = f"{app}/api/manage/events/{created['id']}/usage"
    wait_for(lambda: http.get(url, headers=AUTH).json()["totals"]["requests"] == 3, what="usage")
    assert sorted(r["key"] for r in http.get(url, headers=AUTH).json()["rows"]) == sorted(names)  # JSON as is
    rows = list(csv.reader(io.StringIO(http.get(url, headers={**AUTH, "Accept": "text/csv"}).text)))
    assert sorted(row[0] for row in rows[1:-1]) == sorted("'" + name for name in names)
    numbers = re.compile(r"\d+(\.\d{9})?")  # counts, and the cost in USD
    assert rows[-1][0] == "TOTAL" and all(numbers.fullmatch(cell) for row in rows[1:] for cell in row[1:])


async def test_report_of_500_attendees_is_one_query(tables: Tables, azurite: str) -> None:
    """The report reads the event's day entities in one range query, whatever the number of attendees: its speed
    is counted in storage round trips (through a relay), not timed (a busy machine's seconds say nothing of it)."""
    speed_event = "speed-" + secrets.token_hex(4)
    day, per_user = "2026-03-14", (50, 50 * 100, 50 * 20, 50 * 120)
    entities = [
        {
            "PartitionKey": speed_event,
            "RowKey": f"{day}|user{i:03d}",
            "user": f"user{i:03d}",
            "day": day,
            "reserved": 50,
            "requests": per_user[0],
            "failed": 0,
            "prompt_tokens": per_user[1],
            "completion_tokens": per_user[2],
            "total_tokens": per_user[3],
            "models": orjson.dumps({"gpt-4o-mini": list(per_user)}).decode(),
        }
        for i in range(500)
    ]
    for batch in range(0, 500, 100):
        await tables.usage.submit_transaction([("upsert", e) for e in entities[batch : batch + 100]])

    port = int(azurite.split("TableEndpoint=http://127.0.0.1:")[1].split("/")[0])
    relay = StorageRelay(port)
    settings = Settings.from_env({"STORAGE_CONNECTION_STRING": relay.connection_string(azurite)}, need_upstream=False)
    relayed = Tables.create(settings, None)
    try:
        calls = relay.arm(lambda method, path, body: True, "delay", times=1_000_000)  # passes each one on, counted
        started = time.perf_counter()
        data = await report(relayed, speed_event, "user")
        elapsed = time.perf_counter() - started
        print(f"usage report of 500 attendees x 1 day: {elapsed * 1000:.0f} ms, {len(calls.seen)} storage calls")
    finally:
        await relayed.aclose()
        relay.close()
    [(method, path)] = calls.seen
    query = unquote(path)
    assert method == "GET" and f"/{USAGE_TABLE}()?" in query and f"RowKey lt '{LOG_PREFIX}'" in query, query

    assert len(data["rows"]) == 500 and data["rows"][0]["key"] == "user000"
    assert all(row["requests"] == 50 and row["total_tokens"] == 6000 for row in data["rows"])
    assert data["totals"] == {
        "requests": 25_000,
        "prompt_tokens": 2_500_000,
        "completion_tokens": 500_000,
        "total_tokens": 3_000_000,
        # Days stored before costs were tracked: their per-model rows have 4 figures.
        "cached_tokens": 0,
        "cost": 0.0,
        "unpriced_requests": 0,
    }
    by_model = await report(tables, speed_event, "model")
    assert by_model["rows"] == [{"key": "gpt-4o-mini", **by_model["totals"]}]


def test_budget_fields_round_trip_and_are_strict(http: httpx.Client, app: str) -> None:
    created = new_event(http, app, event_requests=500, event_tokens=200_000, max_attendees=40)
    assert (created["event_requests"], created["event_tokens"], created["max_attendees"]) == (500, 200_000, 40)
    url = f"{app}/api/manage/events/{created['id']}"
    patched = http.patch(url, json={"event_tokens": None, "max_attendees": 60}, headers=AUTH).json()
    assert patched["event_tokens"] is None and patched["max_attendees"] == 60 and patched["event_requests"] == 500
    for fields, param in (
        ({"event_requests": "5"}, "event_requests"),  # strict: a string is not a number
        ({"max_attendees": 0}, "max_attendees"),
        ({"event_tokens": 1.5}, "event_tokens"),
        ({"active": 1}, "active"),
        ({"name": None}, "name"),
    ):
        refused = http.patch(url, json=fields, headers=AUTH)
        assert refused.status_code == 400, fields
        assert refused.json()["error"]["param"] == param and param in refused.json()["error"]["message"]
    past = {"start": "2020-01-01T09:00:00+00:00", "end": "2020-01-01T17:00:00+00:00"}
    ended = http.post(f"{app}/api/manage/events", json={"name": "Past", **past}, headers=AUTH)
    assert ended.status_code == 400 and ended.json()["error"]["param"] == "end"
    assert "already past" in ended.json()["error"]["message"]


def test_openapi_schema_describes_the_answers(http: httpx.Client, app: str) -> None:
    from proxy.manage.models import AttendeeList, EventCreated, EventList, EventOut, UsageReport

    assert http.get(f"{app}/api/manage/openapi.json").status_code == 401
    schema = http.get(f"{app}/api/manage/openapi.json", headers=AUTH).json()
    assert schema["openapi"].startswith("3.1")
    assert set(schema["paths"]) >= {"/events", "/events/{event_id}", "/events/{event_id}/attendees/{user}"}
    create = schema["components"]["schemas"]["EventCreate"]
    assert create["additionalProperties"] is False and set(create["required"]) == {"name", "start", "end"}
    assert "event_tokens" in create["properties"] and "max_attendees" in create["properties"]
    # Every answer matches the model the schema publishes for it.
    created = new_event(http, app, event_requests=10)
    EventCreated.model_validate(created)
    EventOut.model_validate(http.get(f"{app}/api/manage/events/{created['id']}", headers=AUTH).json())
    EventList.model_validate(http.get(f"{app}/api/manage/events", headers=AUTH).json())
    chat(app, f"{created['code']}/ada")
    usage = http.get(f"{app}/api/manage/events/{created['id']}/usage", headers=AUTH).json()
    assert UsageReport.model_validate(usage).budget is not None and usage["budget"]["requests"]["used"] == 1
    attendees = http.get(f"{app}/api/manage/events/{created['id']}/attendees", headers=AUTH).json()
    assert AttendeeList.model_validate(attendees).count == 1
