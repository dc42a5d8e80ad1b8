"""End-to-end tests for the Azure OpenAI simulator, run as a real subprocess."""

from __future__ import annotations

import math
import os
import queue
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import orjson
import pytest
from openai import AzureOpenAI

ROOT = Path(__file__).resolve().parents[1]
API_VERSION = "2024-10-21"
START_TIMEOUT_S = 10.0


class SimProcess:
    """A running simulator subprocess and its base URL."""

    def __init__(self, *extra_args: str) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SIM_")}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "devtools.simulator", "--port", "0", *extra_args],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        lines: queue.Queue[str] = queue.Queue()

        def pump() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                lines.put(line)

        self._clients: list[AzureOpenAI] = []
        self._pump = threading.Thread(target=pump, daemon=True)
        self._pump.start()
        prefix = "simulator listening on "
        try:
            while True:
                line = lines.get(timeout=START_TIMEOUT_S)
                if line.startswith(prefix):
                    self.url = line[len(prefix) :].strip()
                    break
        except queue.Empty:
            self.stop()
            pytest.fail("simulator did not report its port in time")

    def client(self, api_key: str = "k") -> AzureOpenAI:
        """Return an SDK client; it is closed when the simulator stops."""
        client = AzureOpenAI(
            azure_endpoint=self.url,
            api_key=api_key,
            api_version=API_VERSION,
            max_retries=0,
        )
        self._clients.append(client)
        return client

    def stop(self) -> None:
        for client in self._clients:
            client.close()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)
        self._pump.join(timeout=5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture(scope="module")
def sim() -> Iterator[SimProcess]:
    process = SimProcess()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def limited_sim() -> Iterator[SimProcess]:
    process = SimProcess("--rpm-limit", "2", "--api-key", "secret")
    yield process
    process.stop()


def _chat_url(
    base: str,
    deployment: str = "gpt-4o-mini",
    query: str = f"?api-version={API_VERSION}",
) -> str:
    return f"{base}/openai/deployments/{deployment}/chat/completions{query}"


def test_chat_non_stream(sim: SimProcess) -> None:
    resp = sim.client().chat.completions.with_raw_response.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "hello there"}],
        max_tokens=5,
    )
    assert resp.headers["x-ratelimit-remaining-requests"]
    assert resp.headers["apim-request-id"]
    completion = resp.parse()
    assert completion.id.startswith("chatcmpl-")
    assert completion.model == "gpt-4o-mini-2024-07-18"
    choice = completion.choices[0]
    assert choice.finish_reason == "length"
    assert choice.message.content is not None
    assert len(choice.message.content.split()) == 5
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 5
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + 5

    full = sim.client().chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], n=2)
    assert [c.finish_reason for c in full.choices] == ["stop", "stop"]
    assert full.usage is not None and full.usage.completion_tokens == 24


def test_chat_stream_with_usage(sim: SimProcess) -> None:
    stream = sim.client().chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "stream please"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices == []
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(text.split()) == 12
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop"
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 12

    with httpx.stream(
        "POST",
        _chat_url(sim.url),
        headers={"api-key": "k"},
        json={
            "messages": [{"role": "user", "content": "x"}],
            "stream": True,
            "stream_options": {"include_usage": True},
        },
        timeout=5,
    ) as raw:
        assert raw.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in raw.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    first = orjson.loads(events[0])
    assert first["choices"] == [] and first["model"] == ""
    assert first["prompt_filter_results"][0]["content_filter_results"]["hate"]["filtered"] is False
    role_chunk = orjson.loads(events[1])
    assert role_chunk["choices"][0]["delta"] == {
        "role": "assistant",
        "content": "",
        "refusal": None,
    }
    assert role_chunk["usage"] is None
    assert orjson.loads(events[-2])["usage"]["completion_tokens"] == 12


def test_break_stream_aborts_connection(sim: SimProcess) -> None:
    body = {
        "messages": [{"role": "user", "content": "SIM_BREAK_STREAM"}],
        "stream": True,
    }
    seen: list[str] = []
    with (
        pytest.raises(httpx.TransportError),
        httpx.stream("POST", _chat_url(sim.url), headers={"api-key": "k"}, json=body, timeout=5) as raw,
    ):
        seen.extend(line for line in raw.iter_lines() if line.startswith("data: "))
    assert "data: [DONE]" not in seen


def test_embeddings(sim: SimProcess) -> None:
    client = sim.client()
    result = client.embeddings.create(model="text-embedding-3-small", input=["a", "b"])
    assert len(result.data) == 2
    vec = result.data[0].embedding
    assert len(vec) == 1536 and all(isinstance(v, float) for v in vec)
    assert math.isclose(math.fsum(v * v for v in vec), 1.0, rel_tol=1e-4)
    again = client.embeddings.create(model="text-embedding-3-small", input="a", dimensions=256)
    assert len(again.data[0].embedding) == 256
    floats = client.embeddings.create(model="text-embedding-3-small", input="a", encoding_format="float")
    assert floats.data[0].embedding == pytest.approx(vec, abs=1e-6)
    tokens = client.embeddings.create(model="text-embedding-3-small", input=[[1, 2, 3], [4, 5]])
    assert tokens.usage.prompt_tokens == 5


def test_wrong_operation_and_unknown_deployment(sim: SimProcess) -> None:
    with pytest.raises(openai.BadRequestError) as bad:
        sim.client().embeddings.create(model="gpt-4o-mini", input="x")
    assert bad.value.code == "OperationNotSupported"
    with pytest.raises(openai.NotFoundError) as missing:
        sim.client().chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert missing.value.code == "DeploymentNotFound"


def test_content_filter_and_server_error(sim: SimProcess) -> None:
    with pytest.raises(openai.BadRequestError) as excinfo:
        sim.client().chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "SIM_CONTENT_FILTER"}],
        )
    assert excinfo.value.code == "content_filter"
    body = excinfo.value.body
    assert isinstance(body, dict)
    assert body["innererror"]["code"] == "ResponsibleAIPolicyViolation"
    with pytest.raises(openai.InternalServerError):
        sim.client().chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "SIM_SERVER_ERROR"}],
        )


def test_missing_api_version_and_auth(sim: SimProcess) -> None:
    body = {"messages": [{"role": "user", "content": "x"}]}
    resp = httpx.post(_chat_url(sim.url, query=""), headers={"api-key": "k"}, json=body)
    assert resp.status_code == 404
    assert resp.json() == {"error": {"code": "404", "message": "Resource not found"}}
    resp = httpx.post(_chat_url(sim.url), json=body)
    assert resp.status_code == 401
    assert resp.json()["error"]["code"] == "401"
    assert resp.json()["error"]["message"].startswith("Access denied due to missing")
    resp = httpx.post(_chat_url(sim.url), headers={"api-key": "k"}, content=b"{not json")
    assert resp.status_code == 400
    assert httpx.get(f"{sim.url}/whatever").status_code == 404


def test_rate_limit_and_key(limited_sim: SimProcess) -> None:
    with pytest.raises(openai.AuthenticationError):
        limited_sim.client(api_key="wrong").chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}]
        )
    body = {"messages": [{"role": "user", "content": "x"}]}
    headers = {"api-key": "secret"}
    statuses = [httpx.post(_chat_url(limited_sim.url), headers=headers, json=body).status_code for _ in range(2)]
    assert statuses == [200, 200]
    resp = httpx.post(_chat_url(limited_sim.url), headers=headers, json=body)
    assert resp.status_code == 429
    assert int(resp.headers["retry-after"]) >= 1
    assert int(resp.headers["retry-after-ms"]) > 0
    assert resp.headers["x-ratelimit-remaining-requests"] == "0"
    assert "exceeded call rate limit" in resp.json()["error"]["message"]
    # Bearer tokens are accepted (any token, since no --bearer-token was configured).
    resp = httpx.post(_chat_url(limited_sim.url), headers={"Authorization": "Bearer tok"}, json=body)
    assert resp.status_code == 429


def test_stats(sim: SimProcess) -> None:
    assert httpx.post(f"{sim.url}/_sim/reset").status_code == 200
    client = sim.client(api_key="stats-key")
    client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "count me"}],
        max_tokens=4,
    )
    client.embeddings.create(model="text-embedding-3-small", input="abcdefgh")
    stats = httpx.get(f"{sim.url}/_sim/stats").json()
    assert stats["requests"] == 2
    assert stats["by_deployment"] == {"gpt-4o-mini": 1, "text-embedding-3-small": 1}
    assert stats["authorizations"] == ["api-key:stats-key"]
    assert stats["last_body"]["input"] == "abcdefgh"
    assert stats["last_headers"]["api-key"] == "stats-key"
    assert stats["last_query"] == {"api-version": API_VERSION}
    assert stats["usage"]["completion_tokens"] == 4
    assert stats["usage"]["total_tokens"] == stats["usage"]["prompt_tokens"] + 4
    httpx.post(f"{sim.url}/_sim/reset")
    assert httpx.get(f"{sim.url}/_sim/stats").json()["requests"] == 0
