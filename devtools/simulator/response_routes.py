"""The Responses API on Azure's v1 routes: ``POST /openai/v1/responses``, ``GET|DELETE
/openai/v1/responses/{id}``, ``GET /openai/v1/responses/{id}/input_items``, whole or streamed
(what a response holds is ``devtools.simulator.responses``'s)."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import orjson

from devtools.simulator import responses as sim_responses
from devtools.simulator.core import REASONING, SLOW_RE, Core, Hangup, Receive, Scope, Send, StreamBreak
from devtools.simulator.wire import (
    MSG_DEPLOYMENT_NOT_FOUND,
    MSG_NOT_FOUND,
    MSG_SERVER_ERROR,
    MSG_UNPARSEABLE_BODY,
    BadRequest,
    content_filter_error_body,
    error_body,
    invalid_request_body,
    rate_limit_body,
)


class ResponseRoutes(Core):
    """The Responses API: create (whole or streamed), retrieve, delete, input items."""

    async def _responses_http(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The Responses API on Azure's v1 routes (``devtools.simulator.responses``)."""
        rest = scope["path"].strip("/").split("/")[3:]
        method: str = scope["method"]
        accepted = await self._accepted(scope, receive, send)
        if accepted is None:
            return
        query, raw = accepted
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
        slow = SLOW_RE.search(exchange.last_text)
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
            with Hangup(receive) as hangup:
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
        hangup: Hangup,
    ) -> None:
        cfg = self.config
        await self._start_stream(send, extra_ms)
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
                    raise StreamBreak("SIM_BREAK_STREAM: aborting the connection mid-stream")
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
