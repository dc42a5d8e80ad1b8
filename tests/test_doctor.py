"""``python -m proxy.manage doctor`` and the probe behind it, against the real stack.

The app runs under the real worker behind the host emulator, over Azurite and the simulator (tests/conftest.py); the
doctor runs as the organizer would run it, as a separate process.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from proxy.manage.doctor import capping_field, diagnose
from tests.conftest import MakeEvent
from tests.support import ORGANIZER_KEY, ROOT, app_env, sim_stats, start_app, start_azurite, start_simulator


def doctor(app: str, *args: str, key: str = ORGANIZER_KEY, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "ORGANIZER_KEY": key, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "proxy.manage", "doctor", "--url", app, *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=120, check=False)


def problems(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("PROBLEM")]


async def test_healthy_stack_every_model_answers(app: str, make_event: MakeEvent, tmp_path: Path) -> None:
    created = await make_event(models=("gpt-4o-mini", "text-embedding-3-small"), name="Doctor day")
    result = doctor(app, "--event", created.event.id, cwd=tmp_path)
    print(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"doctor: {app}"
    assert any(line.startswith("ok") and "reaches its Table Storage" in line for line in lines)
    assert any(line.startswith("ok") and "organizer key accepted" in line for line in lines)
    summary = next(line for line in lines if line.startswith("info") and created.event.id in line)
    assert "'Doctor day': open now" in summary and "models gpt-4o-mini, text-embedding-3-small" in summary
    assert "max_tokens 4096" in summary and "requests/attendee/day 1000" in summary
    assert any("gpt-4o-mini answers (chat" in line for line in lines)
    assert any("text-embedding-3-small answers (embeddings" in line for line in lines)
    assert lines[-1] == "All good." and not problems(result.stdout)


async def test_probe_does_not_open_the_event_to_attendees(
    app: str, simulator: str, make_event: MakeEvent, http: httpx.Client
) -> None:
    tomorrow = datetime.now(UTC) + timedelta(days=1)
    created = await make_event(models=("gpt-4o-mini",), starts_at=tomorrow, ends_at=tomorrow + timedelta(hours=8))
    before = sim_stats(simulator)["by_deployment"].get("gpt-4o-mini", 0)  # type: ignore[union-attr]  # none yet
    headers = {"authorization": f"Bearer {ORGANIZER_KEY}"}
    answer = http.post(f"{app}/api/manage/probe", headers=headers, json={"event": created.event.id})
    assert answer.status_code == 200, answer.text
    (result,) = answer.json()["results"]
    assert result["model"] == "gpt-4o-mini" and result["ok"] and result["operation"] == "chat"
    assert result["refuses_max_tokens"] is False
    # One request with max_completion_tokens, one with max_tokens, both a single token.
    assert sim_stats(simulator)["by_deployment"]["gpt-4o-mini"] == before + 2  # type: ignore[index]
    assert sim_stats(simulator)["last_body"]["max_tokens"] == 1  # type: ignore[index]
    # Attendees still get the event's own answer, and nothing was counted for anyone.
    chat = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    refused = http.post(f"{app}/api/v1/chat/completions", headers={"api-key": created.key()}, json=chat)
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "event_not_started"
    usage = http.get(f"{app}/api/manage/events/{created.event.id}/usage", headers=headers).json()
    assert usage["totals"]["requests"] == 0


def test_probe_needs_the_organizer_key_and_a_well_formed_body(app: str, simulator: str, http: httpx.Client) -> None:
    assert http.post(f"{app}/api/manage/probe", json={"models": ["gpt-4o-mini"]}).status_code == 401
    headers = {"authorization": f"Bearer {ORGANIZER_KEY}"}
    before = sim_stats(simulator)["requests"]
    # A name is a path segment of the upstream URL: one that leaves it must not reach upstream.
    leaving = ["../deployments/gpt-4o-mini", "..", "gpt-4o-mini/chat", "gpt-4o-mini?x=1", "gpt-4o-mini#", "a" * 65]
    malformed: list[dict[str, Any]] = [{}, {"models": []}, {"models": "gpt-4o-mini"}, {"event": "x", "models": ["a"]}]
    for body in [*malformed, {"model": "a"}, *({"models": [name]} for name in leaving)]:
        answer = http.post(f"{app}/api/manage/probe", headers=headers, json=body)
        assert answer.status_code == 400, body
        assert answer.json()["error"]["code"] == "invalid_request"
    assert sim_stats(simulator)["requests"] == before


async def test_missing_deployment_is_one_problem_with_what_to_do(
    app: str, make_event: MakeEvent, tmp_path: Path
) -> None:
    created = await make_event(models=("gpt-4o-mini", "gpt-5.2"))
    result = doctor(app, "--event", created.event.id, cwd=tmp_path)
    print(result.stdout)
    assert result.returncode == 1
    (problem,) = problems(result.stdout)
    assert f"event {created.event.id}: gpt-5.2 does not answer: 404 DeploymentNotFound" in problem
    assert "modelDeployments in infra/main.bicepparam" in problem
    assert f"events update {created.event.id} --models" in problem
    assert any(line.startswith("ok") and "gpt-4o-mini answers" in line for line in result.stdout.splitlines())
    assert result.stdout.splitlines()[-1] == "1 problem(s)."


def test_wrong_organizer_key(app: str, tmp_path: Path) -> None:
    result = doctor(app, key="not-the-organizer-key", cwd=tmp_path)
    print(result.stdout)
    assert result.returncode == 1
    (problem,) = problems(result.stdout)
    assert f"the organizer key is refused by {app}" in problem and "appsettings list" in problem
    assert "not-the-organizer-key" not in result.stdout


def test_unknown_event_and_no_url(app: str, tmp_path: Path) -> None:
    result = doctor(app, "--event", "no-such-event", cwd=tmp_path)
    assert result.returncode == 1 and "no event with id 'no-such-event'" in result.stdout
    result = doctor("http://127.0.0.1:9", cwd=tmp_path)
    assert result.returncode == 1
    (problem,) = problems(result.stdout)
    assert "does not answer at http://127.0.0.1:9" in problem and "make run" in problem


@pytest.fixture
def app_without_storage(simulator: str) -> str:
    """An app whose Azurite has been stopped."""
    azurite, connection_string = start_azurite()
    service, url = start_app(app_env(connection_string, simulator))
    azurite.stop()
    yield url  # type: ignore[misc]
    service.stop()


def test_storage_down(app_without_storage: str, tmp_path: Path) -> None:
    with httpx.Client(timeout=60) as client:
        findings = diagnose(client, app_without_storage, ORGANIZER_KEY)
    lines = [finding.line() for finding in findings]
    print("\n".join(lines))
    (problem,) = lines
    assert problem.startswith("PROBLEM") and "cannot reach its Table Storage" in problem
    assert "Azurite" in problem and "Storage Table Data Contributor" in problem


@pytest.fixture(scope="module")
def reasoning_app(azurite: str) -> Iterator[str]:
    """An app whose upstream serves gpt-5.4 as Azure serves a reasoning model: max_tokens refused."""
    simulator, upstream = start_simulator("--deployment=gpt-5.4=reasoning", "--deployment=gpt-4o-mini=chat")
    service, url = start_app(app_env(azurite, upstream))
    yield url
    service.stop()
    simulator.stop()


async def test_a_reasoning_model_is_healthy_because_the_proxy_never_sends_max_tokens(
    reasoning_app: str, make_event: MakeEvent, tmp_path: Path
) -> None:
    """The probe finds that gpt-5.4 refuses max_tokens; the proxy caps with max_completion_tokens, so it is a note."""
    result = doctor(reasoning_app, "--models", "gpt-5.4,gpt-4o-mini", cwd=tmp_path)
    print(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert any(line.startswith("ok") and "deployment: gpt-5.4 answers (chat" in line for line in lines)
    (note,) = [line for line in lines if "refuses" in line]
    assert (
        note.startswith("info")
        and "gpt-5.4 refuses max_tokens; the proxy caps requests with max_completion_tokens" in note
    )
    assert lines[-1] == "All good."
    # The note is true: an attendee's request that names neither field reaches the model capped and answered.
    created = await make_event(models=("gpt-5.4",))
    chat = {"model": "gpt-5.4", "messages": [{"role": "user", "content": "hi"}]}
    with httpx.Client(timeout=60) as client:
        answer = client.post(f"{reasoning_app}/api/v1/chat/completions", headers={"api-key": created.key()}, json=chat)
        assert answer.status_code == 200, answer.text
        chat["max_tokens"] = 16  # sent by the attendee: Azure's own refusal, passed on
        refused = client.post(f"{reasoning_app}/api/v1/chat/completions", headers={"api-key": created.key()}, json=chat)
    assert refused.status_code == 400 and "max_completion_tokens" in refused.text


def test_a_model_that_refuses_the_field_the_proxy_sets_is_a_problem() -> None:
    """The doctor's reading of a probe result (stood in for: no simulator model refuses max_completion_tokens)."""
    field = capping_field()
    health = {"status": "ok", "storage": "ok"}
    probe = {"results": [{"model": "old-model", "ok": True, "operation": "chat", "status": 200, "latency_ms": 380,
                          "error": None, "error_code": None, f"refuses_{field}": True}]}  # fmt: skip

    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/api/health":
            return httpx.Response(200, json=health)
        if request.url.path == "/api/manage/events":
            return httpx.Response(200, json={"object": "list", "data": []})
        return httpx.Response(200, json=probe)

    with httpx.Client(transport=httpx.MockTransport(answer)) as client:
        findings = diagnose(client, "https://app.example", ORGANIZER_KEY, models=["old-model"])
    lines = [finding.line() for finding in findings]
    assert lines[-2].startswith("ok") and "old-model answers (chat, 380 ms)" in lines[-2]
    assert lines[-1].startswith("PROBLEM") and f"old-model refuses {field}, which the proxy sets" in lines[-1]
