"""JavaScript clients with a tool through the proxy, run by ``node`` (packages pinned in package.json).

The official ``openai`` package and Vercel's AI SDK (``ai`` with ``@ai-sdk/openai``) each call
a tool and answer with its result, on chat completions and the Responses API, streamed and not;
each model call is recorded once, with the tokens the client saw.
"""

from __future__ import annotations

import json
import os
import subprocess
from typing import Any

from proxy.ledger.reports import request_log
from proxy.storage.tables import Tables
from tests.conftest import MakeEvent
from tests.support import ROOT


def run_node(script: str, app: str, key: str) -> dict[str, Any]:
    env = {**os.environ, "PROXY_URL": f"{app}/api/v1", "PROXY_KEY": key}
    done = subprocess.run(
        ["node", str(ROOT / "tests" / "js" / script)], capture_output=True, text=True, timeout=60, env=env, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


async def logged(tables: Tables, event_id: str) -> list[tuple[str, bool, int, int]]:
    log = await request_log(tables, event_id)
    assert {e["status"] for e in log} == {200}
    return sorted((e["kind"], e["stream"], e["prompt_tokens"], e["completion_tokens"]) for e in log)


async def test_openai_node_sdk_with_a_tool(app: str, make_event: MakeEvent, tables: Tables) -> None:
    created = await make_event()
    out = run_node("openai_tools.mjs", app, created.key())
    assert out["finish"] == "tool_calls"
    assert "Sunny and 21 C in" in out["chatText"] and "Sunny and 21 C in" in out["responsesText"]
    (call, answer), (asked, answered) = out["usage"], out["responsesUsage"]
    expected = [
        ("chat", False, *call),
        ("chat", True, *answer),
        ("responses", False, *asked),
        ("responses", False, *answered),
    ]
    assert await logged(tables, created.event.id) == sorted(expected)


async def test_vercel_ai_sdk_with_a_tool(app: str, make_event: MakeEvent, tables: Tables) -> None:
    created = await make_event()
    out = run_node("ai_sdk_tools.mjs", app, created.key())
    assert out["generatedSteps"] == ["tool-calls", "stop"] and out["streamedSteps"] == ["tool-calls", "stop"]
    assert "Sunny and 21 C in" in out["generatedText"] and "Sunny and 21 C in" in out["streamedText"]
    expected = [("responses", False, *u) for u in out["generatedUsage"]] + [
        ("chat", True, *u) for u in out["streamedUsage"]
    ]
    assert await logged(tables, created.event.id) == sorted(expected)
