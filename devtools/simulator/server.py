"""Azure OpenAI simulator: a fast, deterministic fake of the Azure OpenAI data plane.

It speaks Azure OpenAI's wire format over real HTTP so tests and benchmarks can use
it as the upstream of an OpenAI-compatible proxy. It is a raw ASGI app (no framework
routing) that serialises with orjson and is served by uvicorn.

Routes::

    POST /openai/deployments/{deployment}/chat/completions?api-version=...
    POST /openai/deployments/{deployment}/embeddings?api-version=...
    POST /openai/v1/responses, GET|DELETE /openai/v1/responses/{id},
    GET /openai/v1/responses/{id}/input_items   (the Responses API, ``devtools.simulator.responses``)
    GET  /_sim/stats     inspection counters (not Azure): requests, model calls by ``user``
                         (``by_user``), streams whose client left before their end (``abandoned``)
    POST /_sim/reset     zero the counters

Magic words in the last user message (chat and responses):

* ``SIM_CONTENT_FILTER``  -> 400 Azure content-filter error
* ``SIM_SERVER_ERROR``    -> 500 InternalServerError
* ``SIM_BREAK_STREAM``    -> streams abort the connection after 2 token chunks
* ``SIM_SLOW_MS=<n>``     -> extra n ms latency before responding

A stream whose client disconnects stops being generated, as Azure OpenAI's
does: only the tokens sent until then count in the usage figures.

Agents run against it: ``tools`` are called, tool results answered, ``response_format`` and
``text.format`` honoured, malformed ones refused with Azure's 400 (``devtools.simulator.tools``;
the answer worked out in ``devtools.simulator.chat`` and ``devtools.simulator.responses``).

Quotas, so that several instances can stand for backends in different regions
(``AZURE_OPENAI_BACKENDS``): ``--rpm-limit`` and ``--tpm-limit`` answer 429 with
``retry-after``, ``retry-after-ms`` and ``x-ratelimit-remaining-*`` once a
minute's requests or tokens are used; ``--throttle-fraction F`` answers that
share of chat and embeddings requests 429 whatever the quota, evenly spread
(0.5: every second one), asking for ``--throttle-retry-ms``; ``--fail-status
503`` answers every one with that status, a backend that is down.

CLI::

    python -m devtools.simulator --host 127.0.0.1 --port 0 [--latency-ms N] [--ttft-ms N]
        [--tokens-per-second N] [--rpm-limit N] [--tpm-limit N] [--throttle-fraction F]
        [--throttle-retry-ms N] [--fail-status S] [--api-key K] [--bearer-token T] [--completion-tokens N]

Options may also come from ``SIM_LATENCY_MS``, ``SIM_TTFT_MS``, ``SIM_TOKENS_PER_SECOND``,
``SIM_RPM_LIMIT``, ``SIM_API_KEY``, ``SIM_BEARER_TOKEN`` (the CLI wins).

The Azure wire format itself (bodies, error texts, vectors) lives in ``devtools.simulator.wire``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
import re
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

import orjson

from devtools.simulator import chat as sim_chat
from devtools.simulator import responses as sim_responses
from devtools.simulator.wire import (
    DEFAULT_DIMENSIONS,
    MAX_DIMENSIONS,
    MSG_DEPLOYMENT_NOT_FOUND,
    MSG_INVALID_AUTH,
    MSG_MISSING_AUTH,
    MSG_NOT_FOUND,
    MSG_SERVER_ERROR,
    MSG_UNPARSEABLE_BODY,
    REQUESTS_UNLIMITED,
    SSE_DONE,
    TOKENS_PER_MINUTE_UNLIMITED,
    BadRequest,
    PromptCache,
    base64_floats,
    chat_completion,
    chunk_base,
    content_filter_error_body,
    embedding_inputs,
    embeddings_response,
    error_body,
    invalid_request_body,
    last_user_text,
    operation_not_supported_body,
    prompt_filter_chunk,
    rate_limit_body,
    rate_limit_headers,
    stream_chunk,
    usage,
    vector,
)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_SLOW_RE = re.compile(r"SIM_SLOW_MS=(\d+(?:\.\d+)?)")


# A chat deployment of a reasoning model (o-series, gpt-5.x): Azure refuses max_tokens there.
REASONING = "reasoning"
MSG_MAX_TOKENS_UNSUPPORTED = (
    "Unsupported parameter: 'max_tokens' is not supported with this model. Use 'max_completion_tokens' instead."
)


class _StreamBreak(RuntimeError):
    """Raised deliberately mid-stream so the server aborts the connection."""


class _SuppressStreamBreak(logging.Filter):
    """Hide uvicorn's traceback for the deliberate ``SIM_BREAK_STREAM`` abort."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info
        return not (exc and isinstance(exc[1], _StreamBreak))


@dataclass
class SimulatorConfig:
    """Behaviour knobs for the simulator."""

    deployments: dict[str, str] = field(
        default_factory=lambda: {
            "gpt-4o-mini": "chat",
            "text-embedding-3-small": "embeddings",
        }
    )
    api_key: str | None = None
    bearer_token: str | None = None
    latency_ms: float = 0
    ttft_ms: float = 0
    tokens_per_second: float = 0
    completion_tokens: int = 12
    rpm_limit: int = 0
    tpm_limit: int = 0
    throttle_fraction: float = 0.0
    throttle_retry_ms: float = 1000.0
    fail_status: int = 0


@dataclass
class _Stats:
    requests: int = 0
    throttled: int = 0
    by_deployment: dict[str, int] = field(default_factory=dict)
    by_user: dict[str, int] = field(default_factory=dict)  # model calls by the body's ``user``
    abandoned: int = 0  # streams whose client left before their end
    authorizations: set[str] = field(default_factory=set)
    last_body: Any = None
    last_headers: dict[str, str] = field(default_factory=dict)
    last_query: dict[str, str] = field(default_factory=dict)
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def model_call(self, body: dict[str, Any]) -> None:
        user = body.get("user")
        if isinstance(user, str):
            self.by_user[user] = self.by_user.get(user, 0) + 1

    def add_usage(self, prompt: int, completion: int) -> None:
        self.prompt_tokens += prompt
        self.completion_tokens += completion

    def as_json(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "throttled": self.throttled,
            "by_deployment": self.by_deployment,
            "by_user": self.by_user,
            "abandoned": self.abandoned,
            "authorizations": sorted(self.authorizations),
            "last_body": self.last_body,
            "last_headers": self.last_headers,
            "last_query": self.last_query,
            "usage": {
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
            },
        }


class Simulator:
    """The ASGI application; one instance holds its own counters and rate window."""

    def __init__(self, config: SimulatorConfig) -> None:
        self.config = config
        self.stats = _Stats()
        self.responses = sim_responses.ResponseStore()
        self.prompt_cache = PromptCache()
        self._window_start = time.monotonic()
        self._window_count = 0
        self._window_tokens = 0
        self._throttle_credit = 0.0

    # -- ASGI entry point -------------------------------------------------
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return

    # -- helpers ------------------------------------------------------------
    def _rate_headers(self) -> list[tuple[bytes, bytes]]:
        limit = self.config.rpm_limit
        if limit > 0:
            remaining_req = max(0, limit - self._window_count)
            remaining_tok = max(0, limit * 1000 - self._window_tokens)
        else:
            remaining_req = REQUESTS_UNLIMITED
            remaining_tok = max(0, TOKENS_PER_MINUTE_UNLIMITED - self._window_tokens)
        if self.config.tpm_limit > 0:
            remaining_tok = max(0, self.config.tpm_limit - self._window_tokens)
        return rate_limit_headers(remaining_req, remaining_tok)

    async def _send_json(
        self,
        send: Send,
        status: int,
        payload: Any,
        extra_headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        body = orjson.dumps(payload)
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            *self._rate_headers(),
        ]
        if extra_headers:
            headers.extend(extra_headers)
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})

    @staticmethod
    async def _read_body(receive: Receive) -> bytes:
        chunks: list[bytes] = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        return b"".join(chunks)

    def _check_auth(self, headers: dict[str, str]) -> tuple[bool, str]:
        """Return (ok, failure message) and record the auth values seen."""
        api_key = headers.get("api-key", "")
        authz = headers.get("authorization", "")
        bearer = authz[7:].strip() if authz[:7].lower() == "bearer " else ""
        if api_key:
            self.stats.authorizations.add(f"api-key:{api_key}")
        if bearer:
            self.stats.authorizations.add(f"Bearer {bearer}")
        if not api_key and not bearer:
            return False, MSG_MISSING_AUTH
        cfg = self.config
        if cfg.api_key is None and cfg.bearer_token is None:
            return True, ""
        if cfg.api_key is not None and api_key == cfg.api_key:
            return True, ""
        if bearer:
            if cfg.bearer_token is not None:
                if bearer == cfg.bearer_token:
                    return True, ""
            elif cfg.api_key is not None:
                # api_key configured, no bearer configured: any Entra token is accepted.
                return True, ""
        return False, MSG_INVALID_AUTH

    def _rate_limited(self) -> float | None:
        """Count this request in the window; return seconds to wait if over the limit."""
        now = time.monotonic()
        if now - self._window_start >= 60:
            self._window_start = now
            self._window_count = 0
            self._window_tokens = 0
        wait = self._throttle() or self._over_quota(now)
        if wait is not None:
            self.stats.throttled += 1
        return wait

    def _throttle(self) -> float | None:
        """Every request that brings the share of throttled ones up to ``throttle_fraction``."""
        self._throttle_credit += self.config.throttle_fraction
        if self._throttle_credit < 1:
            return None
        self._throttle_credit -= 1
        return self.config.throttle_retry_ms / 1000

    def _over_quota(self, now: float) -> float | None:
        """The wait until the minute's window ends, when its requests or tokens are used up."""
        cfg = self.config
        tokens_out = cfg.tpm_limit > 0 and self._window_tokens >= cfg.tpm_limit
        if tokens_out or (cfg.rpm_limit > 0 and self._window_count >= cfg.rpm_limit):
            return max(0.001, self._window_start + 60 - now)
        self._window_count += 1
        return None

    # -- request handling -----------------------------------------------------
    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        method: str = scope["method"]
        if path.startswith("/_sim/"):
            if path == "/_sim/stats" and method == "GET":
                await self._send_json(send, 200, self.stats.as_json())
                return
            if path == "/_sim/reset" and method == "POST":
                self.stats = _Stats()
                self._window_start = time.monotonic()
                self._window_count = 0
                self._window_tokens = 0
                await self._send_json(send, 200, {"ok": True})
                return
            await self._send_json(send, 404, error_body("404", MSG_NOT_FOUND))
            return

        if path == "/openai/v1/responses" or path.startswith("/openai/v1/responses/"):
            await self._responses_http(scope, receive, send)
            return
        parts = path.strip("/").split("/")
        operation = ""
        deployment = ""
        if len(parts) >= 4 and parts[0] == "openai" and parts[1] == "deployments":
            deployment = parts[2]
            rest = "/".join(parts[3:])
            if rest == "chat/completions":
                operation = "chat"
            elif rest == "embeddings":
                operation = "embeddings"
        if not operation or method != "POST":
            await self._send_json(send, 404, error_body("404", MSG_NOT_FOUND))
            return

        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        ok, auth_message = self._check_auth(headers)
        if not ok:
            await self._send_json(send, 401, error_body("401", auth_message))
            return

        query = dict(parse_qsl(scope["query_string"].decode("latin-1")))
        raw = await self._read_body(receive)
        stats = self.stats
        stats.requests += 1
        stats.by_deployment[deployment] = stats.by_deployment.get(deployment, 0) + 1
        stats.last_headers = headers
        stats.last_query = query
        try:
            body: Any = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            body = None
            stats.last_body = None
            parse_failed = True
        else:
            stats.last_body = body
            parse_failed = False

        api_version = query.get("api-version", "")
        if self.config.fail_status:
            failed = self.config.fail_status
            await self._send_json(send, failed, error_body(str(failed), MSG_SERVER_ERROR))
            return
        wait = self._rate_limited()
        if wait is not None:
            seconds = math.ceil(wait)
            extra = [
                (b"retry-after", str(seconds).encode()),
                (b"retry-after-ms", str(math.ceil(wait * 1000)).encode()),
            ]
            await self._send_json(send, 429, rate_limit_body(operation, api_version, seconds), extra)
            return

        if not api_version:
            await self._send_json(send, 404, error_body("404", MSG_NOT_FOUND))
            return
        dep_kind = self.config.deployments.get(deployment)
        if dep_kind is None:
            await self._send_json(send, 404, error_body("DeploymentNotFound", MSG_DEPLOYMENT_NOT_FOUND))
            return
        if ("chat" if dep_kind == REASONING else dep_kind) != operation:
            await self._send_json(send, 400, operation_not_supported_body(operation, deployment))
            return
        if parse_failed or not isinstance(body, dict):
            await self._send_json(send, 400, invalid_request_body(MSG_UNPARSEABLE_BODY))
            return
        if dep_kind == REASONING and "max_tokens" in body:
            await self._send_json(send, 400, invalid_request_body(MSG_MAX_TOKENS_UNSUPPORTED, "max_tokens"))
            return
        stats.model_call(body)
        try:
            if operation == "chat":
                await self._chat(body, send, receive)
            else:
                await self._embeddings(body, send)
        except BadRequest as exc:
            await self._send_json(send, 400, invalid_request_body(exc.message, exc.param, exc.code))

    async def _responses_http(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The Responses API on Azure's v1 routes (``devtools.simulator.responses``)."""
        rest = scope["path"].strip("/").split("/")[3:]
        method: str = scope["method"]
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        ok, auth_message = self._check_auth(headers)
        if not ok:
            await self._send_json(send, 401, error_body("401", auth_message))
            return
        query = dict(parse_qsl(scope["query_string"].decode("latin-1")))
        raw = await self._read_body(receive)
        stats = self.stats
        stats.requests += 1
        stats.last_headers, stats.last_query = headers, query
        if query.get("api-version", "v1") not in ("v1", "preview"):
            message = "The v1 API takes api-version 'v1' or 'preview' (or none), not a dated version."
            await self._send_json(send, 400, invalid_request_body(message, "api-version"))
            return
        try:
            if not rest and method == "POST":
                await self._create_response(raw, send, receive)
                return
            stored = self.responses.get(rest[0]) if rest else None
            if len(rest) == 1 and method in ("GET", "DELETE"):
                if stored is None:
                    await self._send_json(send, 404, sim_responses.not_found_body(rest[0]))
                elif method == "DELETE":
                    self.responses.delete(rest[0])
                    await self._send_json(send, 200, {"id": rest[0], "object": "response.deleted", "deleted": True})
                else:
                    await self._send_json(send, 200, stored.response)
            elif len(rest) == 2 and rest[1] == "input_items" and method == "GET":
                if stored is None:
                    await self._send_json(send, 404, sim_responses.not_found_body(rest[0]))
                else:
                    await self._send_json(send, 200, self.responses.input_item_list(stored, query))
            else:
                await self._send_json(send, 404, error_body("404", MSG_NOT_FOUND))
        except BadRequest as exc:
            await self._send_json(send, 400, invalid_request_body(exc.message, exc.param, exc.code))

    async def _create_response(self, raw: bytes, send: Send, receive: Receive) -> None:
        try:
            body: Any = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            body = None
        self.stats.last_body = body
        if not isinstance(body, dict):
            await self._send_json(send, 400, invalid_request_body(MSG_UNPARSEABLE_BODY))
            return
        deployment = body.get("model")
        if not isinstance(deployment, str) or not deployment:
            raise BadRequest("Missing required parameter: 'model'.", "model")
        self.stats.by_deployment[deployment] = self.stats.by_deployment.get(deployment, 0) + 1
        self.stats.model_call(body)
        wait = self._rate_limited()
        if wait is not None:
            seconds = math.ceil(wait)
            extra = [(b"retry-after", str(seconds).encode()), (b"retry-after-ms", str(math.ceil(wait * 1000)).encode())]
            await self._send_json(send, 429, rate_limit_body("responses", "v1", seconds), extra)
            return
        dep_kind = self.config.deployments.get(deployment)
        if dep_kind is None:
            await self._send_json(send, 404, error_body("DeploymentNotFound", MSG_DEPLOYMENT_NOT_FOUND))
            return
        if dep_kind not in ("chat", REASONING):
            message = f"The responses operation does not work with the specified model, {deployment}."
            await self._send_json(send, 400, invalid_request_body(message, "model"))
            return
        try:
            exchange = self.responses.prepare(body, self.config.completion_tokens)
        except sim_responses.PreviousNotFound as missing:
            await self._send_json(send, 400, sim_responses.previous_not_found_body(missing.response_id))
            return
        slow = _SLOW_RE.search(exchange.last_text)
        extra_ms = float(slow.group(1)) if slow else 0.0
        if "SIM_CONTENT_FILTER" in exchange.last_text:
            await self._delay(extra_ms)
            await self._send_json(send, 400, content_filter_error_body())
            return
        if "SIM_SERVER_ERROR" in exchange.last_text:
            await self._delay(extra_ms)
            await self._send_json(send, 500, error_body("InternalServerError", MSG_SERVER_ERROR))
            return
        if body.get("stream"):
            with _Hangup(receive) as hangup:
                await self._stream_response(send, exchange, extra_ms, "SIM_BREAK_STREAM" in exchange.last_text, hangup)
            return
        await self._delay(extra_ms)
        self._window_tokens += exchange.input_tokens + exchange.output_tokens
        self.stats.add_usage(exchange.input_tokens, exchange.output_tokens)
        self.responses.keep(exchange)
        await self._send_json(send, 200, exchange.response)

    async def _stream_response(
        self,
        send: Send,
        exchange: sim_responses.Exchange,
        extra_ms: float,
        break_stream: bool,
        hangup: _Hangup,
    ) -> None:
        cfg = self.config
        await self._delay(extra_ms)
        headers = [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache"),
            *self._rate_headers(),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        gap = 1.0 / cfg.tokens_per_second if cfg.tokens_per_second > 0 else 0.0
        deltas = 0
        events = sim_responses.stream_events(exchange)
        for sequence, (kind, payload) in enumerate(events):
            if kind in ("response.output_text.delta", "response.function_call_arguments.delta"):
                if deltas == 0 and cfg.ttft_ms > 0:
                    await asyncio.sleep(cfg.ttft_ms / 1000)
                elif deltas and gap:
                    await asyncio.sleep(gap)
                if break_stream and deltas == 2:
                    self.stats.add_usage(exchange.input_tokens, deltas)
                    raise _StreamBreak("SIM_BREAK_STREAM: aborting the connection mid-stream")
                if hangup.gone:  # the client left: generation stops, what was sent is billed
                    self.stats.abandoned += 1
                    self.stats.add_usage(exchange.input_tokens, deltas)
                    return
                deltas += 1
            if sequence == len(events) - 1:  # stored and counted before its last event leaves
                self._window_tokens += exchange.input_tokens + exchange.output_tokens
                self.stats.add_usage(exchange.input_tokens, exchange.output_tokens)
                self.responses.keep(exchange)
            event = {"type": kind, "sequence_number": sequence, **payload}
            data = b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(event) + b"\n\n"
            await send({"type": "http.response.body", "body": data, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _delay(self, extra_ms: float = 0) -> None:
        total = self.config.latency_ms + extra_ms
        if total > 0:
            await asyncio.sleep(total / 1000)

    async def _embeddings(self, body: dict[str, Any], send: Send) -> None:
        items = embedding_inputs(body.get("input"))
        dims = body.get("dimensions", DEFAULT_DIMENSIONS)
        if dims is None:
            dims = DEFAULT_DIMENSIONS
        if not isinstance(dims, int) or isinstance(dims, bool) or not 1 <= dims <= MAX_DIMENSIONS:
            raise BadRequest(f"'dimensions' must be an integer between 1 and {MAX_DIMENSIONS}.", "dimensions")
        fmt = body.get("encoding_format") or "float"
        if fmt not in ("float", "base64"):
            raise BadRequest("'encoding_format' must be 'float' or 'base64'.", "encoding_format")
        data: list[dict[str, Any]] = []
        prompt_tokens = 0
        for index, (key, tokens) in enumerate(items):
            prompt_tokens += tokens
            vec = vector(key, dims)
            embedding: Any = base64_floats(vec) if fmt == "base64" else vec
            data.append({"object": "embedding", "index": index, "embedding": embedding})
        await self._delay()
        self._window_tokens += prompt_tokens
        self.stats.add_usage(prompt_tokens, 0)
        await self._send_json(send, 200, embeddings_response(data, prompt_tokens))

    async def _chat(self, body: dict[str, Any], send: Send, receive: Receive) -> None:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest(
                "'messages' is a required property and must be a non-empty array.",
                "messages",
            )
        last_user = last_user_text(messages)
        slow = _SLOW_RE.search(last_user)
        extra_ms = float(slow.group(1)) if slow else 0.0
        if "SIM_CONTENT_FILTER" in last_user:
            await self._delay(extra_ms)
            await self._send_json(send, 400, content_filter_error_body())
            return
        if "SIM_SERVER_ERROR" in last_user:
            await self._delay(extra_ms)
            await self._send_json(send, 500, error_body("InternalServerError", MSG_SERVER_ERROR))
            return

        cap = body.get("max_completion_tokens")
        if cap is None:
            cap = body.get("max_tokens")
        if cap is not None and (not isinstance(cap, int) or isinstance(cap, bool) or cap < 1):
            raise BadRequest("'max_tokens' must be a positive integer.", "max_tokens")
        n = body.get("n") or 1
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 128:
            raise BadRequest("'n' must be an integer between 1 and 128.", "n")
        planned = sim_chat.answer(body, messages, self.config.completion_tokens, cap)
        cached_tokens = self.prompt_cache.cached_tokens(messages)
        completion_id = "chatcmpl-" + uuid.uuid4().hex[:29]
        created = int(time.time())

        if body.get("stream"):
            options = body.get("stream_options")
            include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
            with _Hangup(receive) as hangup:
                await self._stream(
                    send,
                    planned,
                    base=chunk_base(completion_id, created, include_usage),
                    n=n,
                    cached_tokens=cached_tokens,
                    include_usage=include_usage,
                    extra_ms=extra_ms,
                    break_stream="SIM_BREAK_STREAM" in last_user,
                    hangup=hangup,
                )
            return

        prompt_tokens, completion_tokens = planned.prompt_tokens, planned.completion_tokens * n
        await self._delay(extra_ms)
        self._window_tokens += prompt_tokens + completion_tokens
        self.stats.add_usage(prompt_tokens, completion_tokens)
        await self._send_json(
            send,
            200,
            chat_completion(
                completion_id=completion_id,
                created=created,
                message=planned.message,
                n=n,
                finish=planned.finish,
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
                cached_tokens=cached_tokens,
            ),
        )

    async def _stream(
        self,
        send: Send,
        planned: sim_chat.ChatAnswer,
        *,
        base: dict[str, Any],
        n: int,
        include_usage: bool,
        extra_ms: float,
        break_stream: bool,
        hangup: _Hangup,
        cached_tokens: int = 0,
    ) -> None:
        cfg = self.config
        await self._delay(extra_ms)
        headers = [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache"),
            *self._rate_headers(),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})

        async def emit(payload: Any) -> None:
            await send(
                {
                    "type": "http.response.body",
                    "body": b"data: " + orjson.dumps(payload) + b"\n\n",
                    "more_body": True,
                }
            )

        await emit(prompt_filter_chunk(include_usage))
        if cfg.ttft_ms > 0:
            await asyncio.sleep(cfg.ttft_ms / 1000)
        gap = 1.0 / cfg.tokens_per_second if cfg.tokens_per_second > 0 else 0.0
        prompt_tokens = planned.prompt_tokens
        first, *rest = planned.deltas
        for i in range(n):
            await emit(stream_chunk(base, first, i))
        sent_tokens = 0
        for pos, delta in enumerate(rest):
            if gap and pos:
                await asyncio.sleep(gap)
            if hangup.gone:  # the client left: generation stops, what was sent is billed
                self.stats.abandoned += 1
                self.stats.add_usage(prompt_tokens, sent_tokens)
                return
            for i in range(n):
                await emit(stream_chunk(base, delta, i))
            sent_tokens += n
            if break_stream and pos == 1:
                self.stats.add_usage(prompt_tokens, sent_tokens)
                raise _StreamBreak("SIM_BREAK_STREAM: aborting the connection mid-stream")
        if break_stream:
            self.stats.add_usage(prompt_tokens, sent_tokens)
            raise _StreamBreak("SIM_BREAK_STREAM: aborting the connection mid-stream")
        for i in range(n):
            await emit(stream_chunk(base, {}, i, planned.finish))
        completion_tokens = planned.completion_tokens * n
        if include_usage:
            await emit({**base, "choices": [], "usage": usage(prompt_tokens, completion_tokens, cached_tokens)})
        self._window_tokens += prompt_tokens + completion_tokens
        self.stats.add_usage(prompt_tokens, completion_tokens)
        await send({"type": "http.response.body", "body": SSE_DONE, "more_body": False})


class _Hangup:
    """Whether the client of a stream has disconnected, watched while the stream is generated."""

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self.gone = False
        self._watch: asyncio.Task[None] | None = None

    def __enter__(self) -> _Hangup:
        self._watch = asyncio.ensure_future(self._wait())
        return self

    def __exit__(self, *exc: object) -> None:
        if self._watch is not None:
            self._watch.cancel()

    async def _wait(self) -> None:
        # The body is read: the next message is the disconnect (or the end of the response).
        while (await self._receive())["type"] != "http.disconnect":
            pass
        self.gone = True


def create_app(config: SimulatorConfig | None = None) -> Simulator:
    """Build the simulator ASGI app (``config`` defaults to ``SimulatorConfig()``)."""
    logger = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _SuppressStreamBreak) for f in logger.filters):
        logger.addFilter(_SuppressStreamBreak())
    return Simulator(config or SimulatorConfig())


def _env(name: str) -> str | None:
    value = os.environ.get(name)
    return value if value else None


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m devtools.simulator", description="Azure OpenAI simulator")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080, help="0 picks a free port")
    parser.add_argument("--latency-ms", type=float, default=float(_env("SIM_LATENCY_MS") or 0))
    parser.add_argument("--ttft-ms", type=float, default=float(_env("SIM_TTFT_MS") or 0))
    parser.add_argument(
        "--tokens-per-second",
        type=float,
        default=float(_env("SIM_TOKENS_PER_SECOND") or 0),
    )
    parser.add_argument("--rpm-limit", type=int, default=int(_env("SIM_RPM_LIMIT") or 0))
    parser.add_argument("--tpm-limit", type=int, default=int(_env("SIM_TPM_LIMIT") or 0))
    parser.add_argument("--throttle-fraction", type=float, default=0.0, help="share of requests answered 429")
    parser.add_argument("--throttle-retry-ms", type=float, default=1000.0, help="the wait those 429s ask for")
    parser.add_argument("--fail-status", type=int, default=0, help="answer every request with this status")
    parser.add_argument("--api-key", default=_env("SIM_API_KEY"))
    parser.add_argument("--bearer-token", default=_env("SIM_BEARER_TOKEN"))
    parser.add_argument("--completion-tokens", type=int, default=12)
    parser.add_argument(
        "--deployment",
        action="append",
        default=[],
        metavar="NAME=KIND",
        help="serve this deployment instead of the defaults (repeatable); KIND: chat, embeddings or reasoning "
        "(chat that refuses max_tokens)",
    )
    return parser.parse_args(argv)


def _serve(app: Simulator, host: str, port: int) -> None:
    import uvicorn

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    # Listening before uvicorn starts: connections made once the line is printed wait in the backlog.
    sock.listen(2048)
    shown = f"[{host}]" if family == socket.AF_INET6 else host
    print(f"simulator listening on http://{shown}:{sock.getsockname()[1]}", flush=True)
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")
    uvicorn.Server(config).run(sockets=[sock])


def main(argv: list[str] | None = None) -> None:
    """Run the simulator from the command line."""
    args = _parse_args(argv)
    config = SimulatorConfig(
        api_key=args.api_key,
        bearer_token=args.bearer_token,
        latency_ms=args.latency_ms,
        ttft_ms=args.ttft_ms,
        tokens_per_second=args.tokens_per_second,
        completion_tokens=args.completion_tokens,
        rpm_limit=args.rpm_limit,
        tpm_limit=args.tpm_limit,
        throttle_fraction=args.throttle_fraction,
        throttle_retry_ms=args.throttle_retry_ms,
        fail_status=args.fail_status,
    )
    if args.deployment:
        config.deployments = dict(item.split("=", 1) for item in args.deployment)
    _serve(create_app(config), args.host, args.port)


if __name__ == "__main__":
    main()
