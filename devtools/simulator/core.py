"""What one simulator holds, and what its routes share.

Its knobs (``SimulatorConfig``), its counters (``Stats``, what ``/_sim/stats``
shows), the minute's quota window (``--rpm-limit``, ``--tpm-limit``,
``--throttle-fraction``) and the ``x-ratelimit-*`` headers it gives, the
check of ``api-key`` or ``Authorization: Bearer``; and the plumbing of every
route: a JSON answer, a whole body read, the configured latency, and
whether a stream's client has hung up (``Hangup``). The routes are
``devtools.simulator.deployment_routes`` and ``devtools.simulator.response_routes``.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

import orjson

from devtools.simulator import responses as sim_responses
from devtools.simulator.wire import (
    MSG_INVALID_AUTH,
    MSG_MISSING_AUTH,
    REQUESTS_UNLIMITED,
    TOKENS_PER_MINUTE_UNLIMITED,
    PromptCache,
    error_body,
    rate_limit_headers,
)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

SLOW_RE = re.compile(r"SIM_SLOW_MS=(\d+(?:\.\d+)?)")


# A chat deployment of a reasoning model (o-series, gpt-5.x): Azure refuses max_tokens there.
REASONING = "reasoning"
MSG_MAX_TOKENS_UNSUPPORTED = (
    "Unsupported parameter: 'max_tokens' is not supported with this model. Use 'max_completion_tokens' instead."
)


class StreamBreak(RuntimeError):
    """Raised deliberately mid-stream so the server aborts the connection."""


class SuppressStreamBreak(logging.Filter):
    """Hide uvicorn's traceback for the deliberate ``SIM_BREAK_STREAM`` abort."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info
        return not (exc and isinstance(exc[1], StreamBreak))


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
class Stats:
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


class Core:
    """A simulator's state, its quota window and auth check, and the plumbing its routes share."""

    def __init__(self, config: SimulatorConfig) -> None:
        self.config = config
        self.stats = Stats()
        self.responses = sim_responses.ResponseStore()
        self.prompt_cache = PromptCache()
        self._window_start = time.monotonic()
        self._window_count = 0
        self._window_tokens = 0
        self._throttle_credit = 0.0

    def reset(self) -> None:
        """Zero the counters and the quota window (``POST /_sim/reset``)."""
        self.stats = Stats()
        self._window_start = time.monotonic()
        self._window_count = 0
        self._window_tokens = 0

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

    async def _accepted(self, scope: Scope, receive: Receive, send: Send) -> tuple[dict[str, str], bytes] | None:
        """A request's query and body, counted in the stats, once its credentials pass; None once it is
        answered 401."""
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        ok, auth_message = self._check_auth(headers)
        if not ok:
            await self._send_json(send, 401, error_body("401", auth_message))
            return None
        query = dict(parse_qsl(scope["query_string"].decode("latin-1")))
        raw = await self._read_body(receive)
        self.stats.requests += 1
        self.stats.last_headers, self.stats.last_query = headers, query
        return query, raw

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

    async def _start_stream(self, send: Send, extra_ms: float) -> None:
        """After the configured latency (and ``extra_ms``), the head of a 200 event stream."""
        await self._delay(extra_ms)
        headers = [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache"),
            *self._rate_headers(),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})

    async def _delay(self, extra_ms: float = 0) -> None:
        total = self.config.latency_ms + extra_ms
        if total > 0:
            await asyncio.sleep(total / 1000)


class Hangup:
    """Whether the client of a stream has disconnected, watched while the stream is generated."""

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self.gone = False
        self._watch: asyncio.Task[None] | None = None

    def __enter__(self) -> Hangup:
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
