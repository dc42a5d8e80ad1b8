"""The organizer CLI as a real process against Azurite, and its agreement with the HTTP API."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from openai import OpenAI

from proxy.config.settings import Settings
from proxy.manage.cli.main import build_parser
from tests.support import CODE_HASH_KEY, ORGANIZER_KEY, ROOT, azurite_connection_string, free_port, wait_for

# Tests here run up to 20 CLI processes one after the other (each starts Python and the Azure SDK): the longest took
# 68 s with two busy loops besides, over half the default 120 s timeout, which only guards against hangs.
pytestmark = pytest.mark.timeout(300)

Cli = Callable[..., subprocess.CompletedProcess[str]]
AUTH = {"Authorization": f"Bearer {ORGANIZER_KEY}"}


@pytest.fixture(scope="session")
def cli(azurite: str, tmp_path_factory: pytest.TempPathFactory) -> Cli:
    """Run ``python -m proxy.manage`` from an empty folder (no local.settings.json) against Azurite."""
    folder = tmp_path_factory.mktemp("cli")
    base = {k: v for k, v in os.environ.items() if not k.startswith(("AZURE_", "STORAGE_", "ORGANIZER_"))}
    base["PYTHONPATH"] = str(ROOT)

    def run(*args: str, connection_string: str = azurite, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        env = {**base, "STORAGE_CONNECTION_STRING": connection_string, "CODE_HASH_KEY": CODE_HASH_KEY}
        return subprocess.run(
            [sys.executable, "-m", "proxy.manage", *args],
            cwd=folder,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )

    return run


def ok(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert result.returncode == 0, result.stderr
    data = orjson.loads(result.stdout)
    assert isinstance(data, dict)
    return data


def window() -> list[str]:
    now = datetime.now(UTC).replace(microsecond=0)
    return ["--start", (now - timedelta(hours=1)).isoformat(), "--end", (now + timedelta(hours=8)).isoformat()]


def test_event_lifecycle(cli: Cli) -> None:
    created = ok(cli("events", "create", "--name", "CLI workshop", "--code", "CliCode1234", *window(),
                     "--models", "gpt-4o-mini", "--daily-requests", "50", "--tpm", "2000",
                     "--time-zone", "Europe/Paris", "--organizer", "Ada", "--json"))  # fmt: skip
    event_id = created["id"]
    assert created["code"] == "CliCode1234" and created["models"] == ["gpt-4o-mini"]
    assert created["daily_requests"] == 50 and created["tpm"] == 2000 and created["organizer"] == "Ada"
    public = {k: v for k, v in created.items() if k != "code"}

    listed = ok(cli("events", "list", "--json"))
    assert listed["object"] == "list" and public in listed["data"]
    assert ok(cli("events", "show", event_id, "--json")) == public

    table = cli("events", "list")
    assert table.returncode == 0 and "CLI workshop" in table.stdout and event_id in table.stdout
    assert "CliCode1234" not in table.stdout
    details = cli("events", "show", event_id)
    assert "Europe/Paris" in details.stdout and "CliCode1234" not in details.stdout

    updated = ok(cli("events", "update", event_id, "--name", "CLI lab", "--tpm", "none", "--daily-tokens", "9000",
                     "--json"))  # fmt: skip
    assert updated["name"] == "CLI lab" and updated["tpm"] is None and updated["daily_tokens"] == 9000
    assert updated["daily_requests"] == 50 and updated["start"] == created["start"]
    assert ok(cli("events", "disable", event_id, "--json"))["active"] is False
    assert ok(cli("events", "update", event_id, "--active", "true", "--json"))["active"] is True

    rotated = ok(cli("events", "rotate-code", event_id, "--json"))
    assert rotated["id"] == event_id and rotated["code"] != "CliCode1234" and len(rotated["code"]) == 16

    refused = cli("events", "delete", event_id)
    assert refused.returncode == 2 and "--yes" in refused.stderr
    assert ok(cli("events", "delete", event_id, "--yes", "--json")) == {"id": event_id, "deleted": True}
    gone = cli("events", "show", event_id)
    assert gone.returncode == 2 and "No event" in gone.stderr


def test_create_prints_the_code_once_with_a_hint(cli: Cli) -> None:
    result = cli("events", "create", "--name", "Readable", *window())
    assert result.returncode == 0, result.stderr
    line = next(line for line in result.stdout.splitlines() if line.startswith("Event code: "))
    code = line.removeprefix("Event code: ")
    assert len(code) == 16 and f"{code}/your-name" in result.stdout and "Readable" in result.stdout
    event_id = next(e["id"] for e in ok(cli("events", "list", "--json"))["data"] if e["name"] == "Readable")
    rotated = cli("events", "rotate-code", event_id, "--code", "Rotated-by-hand")
    assert rotated.returncode == 0 and "Rotated-by-hand/your-name" in rotated.stdout


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--start", "2026-06-02T10:00:00+00:00", "--end", "2026-06-01T10:00:00+00:00"], "'start'"),
        (["--start", "2026-06-01T10:00:00", "--end", "2026-06-02T10:00:00+00:00"], "offset"),
        ([*window(), "--time-zone", "Mars/Olympus"], "time_zone"),
        ([*window(), "--max-tokens", "0"], "max_tokens"),
        ([*window(), "--daily-requests", "lots"], "daily_requests"),
        ([*window(), "--models", ""], "models"),
        ([*window(), "--code", "no spaces!"], "code"),
        (["--end", "2026-06-02T10:00:00+00:00"], "--start"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(cli: Cli, args: list[str], named: str) -> None:
    result = cli("events", "create", "--name", "Bad", *args)
    assert result.returncode == 2
    assert result.stdout == "" and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and named in result.stderr


def test_unknown_events_and_bad_commands(cli: Cli) -> None:
    for args in (["events", "update", "no-such-event", "--name", "x"], ["usage", "no-such-event"]):
        result = cli(*args)
        assert result.returncode == 2 and "No event" in result.stderr and "Traceback" not in result.stderr
    wrong = cli("usage", "x", "--by", "week")
    assert wrong.returncode == 2 and len(wrong.stderr.strip().splitlines()) == 1
    assert cli("events").returncode == 2
    assert "rotate-code" in cli("events", "--help").stdout


def test_storage_unreachable_exits_1_quickly(cli: Cli) -> None:
    closed = azurite_connection_string(free_port())
    for args in (["events", "list"], ["events", "create", "--name", "x", *window()], ["usage", "some-event"]):
        started = time.monotonic()
        result = cli(*args, connection_string=closed, timeout=30)
        assert time.monotonic() - started < 15
        assert result.returncode == 1, result.stderr
        assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
        assert "cannot be reached" in result.stderr


def test_cli_and_api_answer_alike(cli: Cli, app: str, http: httpx.Client) -> None:
    now = datetime.now(UTC)
    body = {
        "name": "Shared",
        "start": (now - timedelta(hours=1)).isoformat(),
        "end": (now + timedelta(hours=2)).isoformat(),
    }
    created = http.post(f"{app}/api/manage/events", json=body, headers=AUTH).json()
    event_id = created["id"]
    with OpenAI(base_url=f"{app}/api/v1", api_key=f"{created['code']}/bob", max_retries=0) as client:
        for user_text in ("one", "two"):
            client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": user_text}])
    usage_url = f"{app}/api/manage/events/{event_id}/usage"
    wait_for(lambda: http.get(usage_url, headers=AUTH).json()["totals"]["requests"] == 2, what="usage")

    assert ok(cli("events", "show", event_id, "--json")) == http.get(f"{app}/api/manage/events/{event_id}",
                                                                     headers=AUTH).json()  # fmt: skip
    cli_list, api_list = ok(cli("events", "list", "--json")), http.get(f"{app}/api/manage/events", headers=AUTH).json()
    assert cli_list.keys() == api_list.keys()
    assert next(e for e in cli_list["data"] if e["id"] == event_id) in api_list["data"]
    for by in ("user", "model", "day"):
        api_report = http.get(usage_url, params={"by": by}, headers=AUTH).json()
        assert ok(cli("usage", event_id, "--by", by, "--json")) == api_report
    csv = cli("usage", event_id, "--csv")
    assert csv.stdout == http.get(usage_url, headers={**AUTH, "Accept": "text/csv"}).text
    readable = cli("usage", event_id)
    assert readable.returncode == 0 and "bob" in readable.stdout and "TOTAL" in readable.stdout

    # The plan: the same figures from both, here with the event's own usage as its typical request.
    plan_url = f"{app}/api/manage/events/{event_id}/plan"
    query = {"attendees": "500", "tpm": ["gpt-4o-mini=50000", "text-embedding-3-small=350000"]}
    api_plan = http.get(plan_url, params=query, headers=AUTH).json()
    assert ok(cli("plan", event_id, "--attendees", "500", "--tpm", "gpt-4o-mini=50000",
                  "--tpm", "text-embedding-3-small=350000", "--json")) == api_plan  # fmt: skip
    chat = api_plan["models"][0]
    assert chat["typical_request"]["from"] == "this event's average over 2 requests"
    assert chat["quota_tpm"] == 50_000 and chat["quota_from"] == "--tpm"
    text = cli("plan", event_id, "--attendees", "500", "--tpm", "gpt-4o-mini=50000").stdout
    assert "gpt-4o-mini:" in text and "change: --tpm 100: no tokens-per-minute cap" in text
    bad = http.get(plan_url, params={"tpm": "gpt-4o-mini"}, headers=AUTH)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tpm"
    assert http.get(plan_url, params={"people": "5"}, headers=AUTH).json()["error"]["param"] == "people"
    no_count = cli("plan", ok(cli("events", "create", "--name", "Empty", *window(), "--json"))["id"])
    assert no_count.returncode == 2 and "--attendees N" in no_count.stderr

    cli_created = ok(cli("events", "create", "--name", "Shapes", *window(), "--json"))
    api_created = http.post(f"{app}/api/manage/events", json={**body, "name": "Shapes"}, headers=AUTH).json()
    assert cli_created.keys() == api_created.keys()


def test_attendees_and_budgets_answer_alike(cli: Cli, app: str, http: httpx.Client) -> None:
    created = ok(cli("events", "create", "--name", "Budgets", *window(), "--event-requests", "50",
                     "--event-tokens", "90000", "--max-attendees", "3", "--json"))  # fmt: skip
    event_id = created["id"]
    assert (created["event_requests"], created["event_tokens"], created["max_attendees"]) == (50, 90000, 3)
    with OpenAI(base_url=f"{app}/api/v1", api_key=f"{created['code']}/bob", max_retries=0) as client:
        client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    api = f"{app}/api/manage/events/{event_id}"
    assert ok(cli("attendees", "list", event_id, "--json")) == http.get(f"{api}/attendees", headers=AUTH).json()
    blocked = ok(cli("attendees", "block", event_id, "eve", "--json"))
    assert blocked == http.patch(f"{api}/attendees/eve", json={"blocked": True}, headers=AUTH).json()
    assert blocked == {"event_id": event_id, "user": "eve", "blocked": True}
    listed = ok(cli("attendees", "list", event_id, "--json"))
    assert [(a["user"], a["requests"], a["blocked"]) for a in listed["data"]] == [("bob", 1, False), ("eve", 0, True)]
    assert listed["count"] == 1 and listed["max_attendees"] == 3
    assert ok(cli("attendees", "unblock", event_id, "eve", "--json"))["blocked"] is False
    readable = cli("attendees", "list", event_id)
    assert readable.returncode == 0 and "bob" in readable.stdout and "of at most 3" in readable.stdout
    assert ok(cli("usage", event_id, "--json")) == http.get(f"{api}/usage", headers=AUTH).json()
    usage = cli("usage", event_id)
    assert "Event budget, requests: 1 used of 50" in usage.stdout
    assert "Event budget, requests: 1 used of 50" in cli("events", "show", event_id).stdout
    switched = cli("events", "disable", event_id)
    assert switched.returncode == 0 and "within a minute" in switched.stdout
    cleared = ok(cli("events", "update", event_id, "--event-tokens", "none", "--json"))
    assert cleared["event_tokens"] is None and cleared["event_requests"] == 50
    weak = cli("events", "create", "--name", "Weak", *window(), "--code", "hackathon2026")
    assert weak.returncode == 2 and "too easy to guess" in weak.stderr


def test_settings_come_from_local_settings_json(azurite: str, tmp_path: Path) -> None:
    values = {"Values": {"STORAGE_CONNECTION_STRING": azurite, "AZURE_OPENAI_ENDPOINT": "http://127.0.0.1:9"}}
    (tmp_path / "local.settings.json").write_bytes(orjson.dumps(values))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AZURE_", "STORAGE_", "ORGANIZER_"))}
    result = subprocess.run(
        [sys.executable, "-m", "proxy.manage", "events", "list", "--json"],
        cwd=tmp_path,
        env={**env, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert ok(result)["object"] == "list"
    (tmp_path / "local.settings.json").unlink()
    missing = subprocess.run(
        [sys.executable, "-m", "proxy.manage", "events", "list"],
        cwd=tmp_path,
        env={**env, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert missing.returncode == 2 and "STORAGE_CONNECTION_STRING" in missing.stderr


def test_an_azure_endpoint_in_the_environment_wins_over_the_files_azurite(
    azurite: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings_file = tmp_path / "local.settings.json"
    settings_file.write_bytes(orjson.dumps({"Values": {"STORAGE_CONNECTION_STRING": azurite}}))
    monkeypatch.delenv("STORAGE_CONNECTION_STRING", raising=False)
    monkeypatch.setenv("STORAGE_TABLE_ENDPOINT", "https://account.table.core.windows.net")
    settings = Settings.for_cli(settings_file)
    assert settings.storage_connection_string is None
    assert settings.table_endpoint == "https://account.table.core.windows.net"
    monkeypatch.delenv("STORAGE_TABLE_ENDPOINT")
    assert Settings.for_cli(settings_file).storage_connection_string == azurite


def test_every_command_prints_its_help(capsys: pytest.CaptureFixture[str]) -> None:
    """``--help`` of every command and action: argparse formats help texts with ``%``, so a bare one crashed
    ``events create --help`` and ``events update --help`` with a TypeError."""

    def commands(parser: argparse.ArgumentParser, path: list[str]) -> Iterator[list[str]]:
        yield path
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from commands(sub, [*path, name])

    seen = list(commands(build_parser(), []))
    assert ["events", "create"] in seen and ["attendees", "reset-key"] in seen and len(seen) > 20
    for path in seen:
        with pytest.raises(SystemExit) as exited:
            build_parser().parse_args([*path, "--help"])
        assert exited.value.code == 0, path
        printed = capsys.readouterr().out
        assert printed.startswith(f"usage: python -m proxy.manage {' '.join(path)}".rstrip()), path
    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["events", "create", "--help"])
    assert "POST budget alerts here at 80 % and 100 % (https)" in " ".join(capsys.readouterr().out.split())
