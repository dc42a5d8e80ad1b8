"""Bugs inside the app reach clients OpenAI-shaped, with a request id, never as a bare 500.

The app runs as everywhere else in the suite (the real worker behind the host
emulator), with faults injected by ``tests/faults/sitecustomize.py``: in the
event lookup, in the upstream call, and in the middle of a stream.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import UTC, datetime

import httpx
import openai
import pytest
from openai import OpenAI

from proxy.storage.tables import Tables
from tests.conftest import MakeEvent
from tests.support import ROOT, Service, app_env, eventually, start_app

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(scope="module")
def faulty_app(azurite: str, simulator: str) -> Iterator[tuple[Service, str]]:
    # The project too: sitecustomize runs before the current directory is on sys.path.
    parts = (str(ROOT / "tests" / "faults"), str(ROOT), os.environ.get("PYTHONPATH"))
    path = os.pathsep.join(p for p in parts if p)
    service, url = start_app(app_env(azurite, simulator, PYTHONPATH=path))
    yield service, url
    service.stop()


def assert_internal_error(response: httpx.Response, service: Service, fault: str) -> str:
    assert response.status_code == 500 and response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    request_id = response.headers["x-request-id"]
    assert error["code"] == "internal_error" and request_id in error["message"]
    service.wait_for_output(request_id)
    assert fault in service.text  # the traceback is logged
    return request_id


def test_a_fault_in_the_event_lookup(faulty_app: tuple[Service, str]) -> None:
    service, url = faulty_app
    response = httpx.post(f"{url}/api/v1/chat/completions", json=CHAT, headers={"api-key": "FAULTY-LOOKUP/alice"})
    assert_internal_error(response, service, "injected fault in the event lookup")
    assert "FAULTY-LOOKUP" not in service.text  # the code is a secret, even in a traceback


async def test_a_fault_in_the_upstream_call(
    faulty_app: tuple[Service, str], make_event: MakeEvent, tables: Tables
) -> None:
    service, url = faulty_app
    created = await make_event(daily_requests=3)
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "FAULT-UPSTREAM"}]}
    response = httpx.post(f"{url}/api/v1/chat/completions", json=body, headers={"api-key": created.key()})
    assert_internal_error(response, service, "injected fault in the upstream call")
    client = OpenAI(base_url=f"{url}/api/v1", api_key=created.key(), max_retries=0)
    with pytest.raises(openai.InternalServerError) as raised:
        client.chat.completions.create(**body)  # type: ignore[call-overload]
    assert raised.value.code == "internal_error"
    # Neither request reached upstream: both slots are given back.
    day = datetime.now(UTC).strftime("%Y-%m-%d")

    async def reserved() -> int:
        return int((await tables.usage.get_entity(created.event.id, f"{day}|alice"))["reserved"])

    assert await eventually(reserved, lambda n: n == 0) == 0
    assert created.code not in service.text


async def test_a_fault_in_the_middle_of_a_stream(faulty_app: tuple[Service, str], make_event: MakeEvent) -> None:
    service, url = faulty_app
    created = await make_event()
    body = {**CHAT, "stream": True}
    with httpx.stream(
        "POST", f"{url}/api/v1/chat/completions", json=body, headers={"api-key": created.key("faulty-stream")}
    ) as response:
        assert response.status_code == 200
        events = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert "data: [DONE]" not in events and '"code":"internal_error"' in events[-1]
    request_id = response.headers["x-request-id"]
    assert request_id in events[-1]
    service.wait_for_output(request_id)
    assert "injected fault in the middle of a stream" in service.text
    client = OpenAI(base_url=f"{url}/api/v1", api_key=created.key("faulty-stream"), max_retries=0)
    with pytest.raises(openai.APIError, match="request id"):
        list(client.chat.completions.create(**body))  # type: ignore[call-overload]
    assert created.code not in service.text
