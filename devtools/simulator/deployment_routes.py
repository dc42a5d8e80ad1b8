"""The deployment routes, ``/openai/deployments/{deployment}/chat/completions`` and ``.../embeddings``:
auth, the quota, Azure's checks of the deployment and the body, then the answer, whole or streamed
(the chat answer itself is worked out in ``devtools.simulator.chat``)."""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from typing import Any

import orjson

from devtools.simulator import chat as sim_chat
from devtools.simulator.core import (
    MSG_MAX_TOKENS_UNSUPPORTED,
    REASONING,
    SLOW_RE,
    Core,
    Hangup,
    Receive,
    Scope,
    Send,
    StreamBreak,
)
from devtools.simulator.wire import (
    DEFAULT_DIMENSIONS,
    MAX_DIMENSIONS,
    MSG_DEPLOYMENT_NOT_FOUND,
    MSG_NOT_FOUND,
    MSG_SERVER_ERROR,
    MSG_UNPARSEABLE_BODY,
    SSE_DONE,
    BadRequest,
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
    stream_chunk,
    usage,
    vector,
)


class DeploymentRoutes(Core):
    """Chat completions and embeddings on a deployment's route."""

    async def _deployment_http(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        method: str = scope["method"]
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

        accepted = await self._accepted(scope, receive, send)
        if accepted is None:
            return
        query, raw = accepted
        stats = self.stats
        stats.by_deployment[deployment] = stats.by_deployment.get(deployment, 0) + 1
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
        slow = SLOW_RE.search(last_user)
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
            with Hangup(receive) as hangup:
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
        hangup: Hangup,
        cached_tokens: int = 0,
    ) -> None:
        cfg = self.config
        await self._start_stream(send, extra_ms)

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
                raise StreamBreak("SIM_BREAK_STREAM: aborting the connection mid-stream")
        if break_stream:
            self.stats.add_usage(prompt_tokens, sent_tokens)
            raise StreamBreak("SIM_BREAK_STREAM: aborting the connection mid-stream")
        for i in range(n):
            await emit(stream_chunk(base, {}, i, planned.finish))
        completion_tokens = planned.completion_tokens * n
        if include_usage:
            await emit({**base, "choices": [], "usage": usage(prompt_tokens, completion_tokens, cached_tokens)})
        self._window_tokens += prompt_tokens + completion_tokens
        self.stats.add_usage(prompt_tokens, completion_tokens)
        await send({"type": "http.response.body", "body": SSE_DONE, "more_body": False})
