"""Azure OpenAI's wire format, as the simulator speaks it.

Models, fingerprints and content-filter result shapes; Azure's error texts and error
bodies; the rate-limit headers; token counting; the deterministic completion words and
embedding vectors; and pure functions that build chat completion, stream chunk and
embeddings bodies. Nothing here holds state or does I/O, so the ASGI app in
``devtools.simulator`` only decides which of these to send and when.
"""

from __future__ import annotations

import array
import base64
import hashlib
import math
import sys
import uuid
from functools import lru_cache
from typing import Any

import orjson

CHAT_MODEL = "gpt-4o-mini-2024-07-18"
EMBEDDING_MODEL = "text-embedding-3-small"
SYSTEM_FINGERPRINT = "fp_d54531d9eb"
DEFAULT_DIMENSIONS = 1536
MAX_DIMENSIONS = 3072
TOKENS_PER_MINUTE_UNLIMITED = 10_000_000
REQUESTS_UNLIMITED = 100_000
SSE_DONE = b"data: [DONE]\n\n"

_SAFE = {"filtered": False, "severity": "safe"}
CONTENT_FILTER_RESULTS: dict[str, Any] = {
    "hate": _SAFE,
    "self_harm": _SAFE,
    "sexual": _SAFE,
    "violence": _SAFE,
}
PROMPT_FILTER_RESULTS: list[dict[str, Any]] = [{"prompt_index": 0, "content_filter_results": CONTENT_FILTER_RESULTS}]
WORDS = (
    "lorem",
    "ipsum",
    "dolor",
    "sit",
    "amet",
    "consectetur",
    "adipiscing",
    "elit",
    "sed",
    "do",
    "eiusmod",
    "tempor",
    "incididunt",
    "ut",
    "labore",
    "et",
    "dolore",
    "magna",
    "aliqua",
    "ut",
    "enim",
    "ad",
    "minim",
    "veniam",
    "quis",
    "nostrud",
)

MSG_NOT_FOUND = "Resource not found"
MSG_MISSING_AUTH = (
    "Access denied due to missing subscription key or Bearer token. Make sure to include "
    "subscription key or Bearer token when making requests to an API."
)
MSG_INVALID_AUTH = (
    "Access denied due to invalid subscription key or wrong API endpoint. Make sure to "
    "provide a valid key for an active subscription and use a correct regional API "
    "endpoint for your resource."
)
MSG_DEPLOYMENT_NOT_FOUND = (
    "The API deployment for this resource does not exist. If you created the deployment "
    "within the last 5 minutes, please wait a moment and try again."
)
MSG_CONTENT_FILTER = (
    "The response was filtered due to the prompt triggering Azure OpenAI's content "
    "management policy. Please modify your prompt and retry. To learn more about our "
    "content filtering policies please read our documentation: "
    "https://go.microsoft.com/fwlink/?linkid=2198766"
)
MSG_SERVER_ERROR = "The server had an error while processing your request. Sorry about that!"
MSG_UNPARSEABLE_BODY = (
    "We could not parse the JSON body of your request. (HINT: This likely "
    "means you aren't using your HTTP library correctly. The OpenAI API "
    "expects a JSON payload, but what was sent was not valid JSON."
)


class BadRequest(Exception):
    """A client error to be reported in Azure's ``invalid_request_error`` shape."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


# -- error bodies -------------------------------------------------------------


def error_body(code: str, message: str) -> dict[str, Any]:
    """Azure's own error shape (auth, routing, rate limit, server errors)."""
    return {"error": {"code": code, "message": message}}


def invalid_request_body(message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """OpenAI's ``invalid_request_error`` shape, used for request validation."""
    return {
        "error": {
            "message": message,
            "type": "invalid_request_error",
            "param": param,
            "code": code,
        }
    }


def operation_not_supported_body(operation: str, deployment: str) -> dict[str, Any]:
    """The 400 Azure sends when a chat deployment gets embeddings, or the reverse."""
    return error_body(
        "OperationNotSupported",
        f"The {'chatCompletion' if operation == 'chat' else 'embeddings'} "
        f"operation does not work with the specified model, {deployment}. "
        "Please choose different model and try again. You can learn more "
        "about which models can be used with each operation here: "
        "https://go.microsoft.com/fwlink/?linkid=2197993.",
    )


def rate_limit_body(operation: str, api_version: str, seconds: int) -> dict[str, Any]:
    """The 429 body Azure sends when the per-minute request quota is spent."""
    op_name = "ChatCompletions_Create" if operation == "chat" else "Embeddings_Create"
    return error_body(
        "429",
        f"Requests to the {op_name} Operation under Azure OpenAI API version "
        f"{api_version or 'unknown'} have exceeded call rate limit of your current "
        f"OpenAI S0 pricing tier. Please retry after {seconds} seconds. Please go "
        "here: https://aka.ms/oai/quotaincrease if you would like to further "
        "increase the default rate limit.",
    )


def content_filter_error_body() -> dict[str, Any]:
    """The 400 Azure sends when the prompt trips the content filter."""
    result = dict(CONTENT_FILTER_RESULTS)
    result["violence"] = {"filtered": True, "severity": "medium"}
    result["jailbreak"] = {"filtered": False, "detected": False}
    return {
        "error": {
            "message": MSG_CONTENT_FILTER,
            "type": None,
            "param": "prompt",
            "code": "content_filter",
            "status": 400,
            "innererror": {
                "code": "ResponsibleAIPolicyViolation",
                "content_filter_result": result,
            },
        }
    }


def rate_limit_headers(remaining_requests: int, remaining_tokens: int) -> list[tuple[bytes, bytes]]:
    """The quota and request-id headers Azure puts on every response."""
    request_id = str(uuid.uuid4()).encode()
    return [
        (b"x-ratelimit-remaining-requests", str(remaining_requests).encode()),
        (b"x-ratelimit-remaining-tokens", str(remaining_tokens).encode()),
        (b"apim-request-id", request_id),
        (b"x-request-id", request_id),
    ]


# -- chat -----------------------------------------------------------------------


def text_of(content: Any) -> str:
    """The text of a message's ``content``, whether a string or a list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts: list[str] = []
        for part in content:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                parts.append(part["text"])
            elif isinstance(part, str):
                parts.append(part)
        return " ".join(parts)
    return ""


def count_prompt_tokens(messages: list[Any]) -> int:
    """A cheap, deterministic estimate: four characters a token plus three a message.

    An assistant message's tool calls count their names and arguments.
    """
    chars = 0
    for msg in messages:
        if isinstance(msg, dict):
            chars += len(text_of(msg.get("content")))
            for call in msg.get("tool_calls") or ():
                function = call.get("function") if isinstance(call, dict) else None
                if isinstance(function, dict):
                    chars += sum(
                        len(v) for v in (function.get("name"), function.get("arguments")) if isinstance(v, str)
                    )
    return max(1, chars // 4 + 3 * len(messages))


def last_user_text(messages: list[Any]) -> str:
    """The text of the last ``user`` message, or ``""`` if there is none."""
    for msg in reversed(messages):
        if isinstance(msg, dict) and msg.get("role") == "user":
            return text_of(msg.get("content"))
    return ""


@lru_cache(maxsize=64)
def completion_words(count: int) -> tuple[str, ...]:
    """The ``count`` words of every completion, one token each."""
    return tuple(WORDS[i % len(WORDS)] for i in range(count))


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    """A chat ``usage`` object, with the prompt tokens served from the prompt cache."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"audio_tokens": 0, "cached_tokens": cached_tokens},
    }


class PromptCache:
    """Azure's prompt caching, roughly: a prompt of 1024 tokens or more whose leading messages
    were sent before has those tokens cached, in steps of 128 (the cached prefix is what repeats).

    Remembers the last ``size`` prompts (each of their message prefixes, by hash).
    """

    MIN_TOKENS = 1024
    STEP = 128

    def __init__(self, size: int = 1024) -> None:
        self._seen: dict[bytes, None] = {}
        self._size = size

    def cached_tokens(self, messages: list[Any]) -> int:
        prefixes = [hashlib.sha256(orjson.dumps(messages[:k])).digest() for k in range(1, min(len(messages), 64) + 1)]
        hit = max((k for k, key in enumerate(prefixes, 1) if key in self._seen), default=0)
        for key in prefixes:
            self._seen[key] = None
        while len(self._seen) > self._size * 8:
            del self._seen[next(iter(self._seen))]
        tokens = count_prompt_tokens(messages[:hit]) if hit else 0
        return tokens // self.STEP * self.STEP if tokens >= self.MIN_TOKENS else 0


def chat_completion(
    *,
    completion_id: str,
    created: int,
    message: dict[str, Any],
    n: int,
    finish: str,
    prompt_tokens: int,
    completion_tokens: int,
    cached_tokens: int = 0,
) -> dict[str, Any]:
    """A non-streaming ``chat.completion`` body with ``n`` identical choices.

    Azure filters text only: a choice that calls tools has empty ``content_filter_results``.
    """
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": CHAT_MODEL,
        "system_fingerprint": SYSTEM_FINGERPRINT,
        "prompt_filter_results": PROMPT_FILTER_RESULTS,
        "choices": [
            {
                "index": i,
                "finish_reason": finish,
                "logprobs": None,
                "message": message,
                "content_filter_results": {} if message.get("tool_calls") else CONTENT_FILTER_RESULTS,
            }
            for i in range(n)
        ],
        "usage": usage(prompt_tokens, completion_tokens, cached_tokens),
    }


def prompt_filter_chunk(include_usage: bool) -> dict[str, Any]:
    """The first stream chunk: Azure's prompt filter results and no choices."""
    first: dict[str, Any] = {
        "id": "",
        "object": "",
        "created": 0,
        "model": "",
        "choices": [],
        "prompt_filter_results": PROMPT_FILTER_RESULTS,
    }
    if include_usage:
        first["usage"] = None
    return first


def chunk_base(completion_id: str, created: int, include_usage: bool) -> dict[str, Any]:
    """The fields shared by every ``chat.completion.chunk`` of one stream."""
    base: dict[str, Any] = {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": CHAT_MODEL,
        "system_fingerprint": SYSTEM_FINGERPRINT,
    }
    if include_usage:
        base["usage"] = None
    return base


def stream_chunk(base: dict[str, Any], delta: dict[str, Any], index: int, reason: str | None = None) -> dict[str, Any]:
    """One chunk carrying ``delta`` for choice ``index``; an empty or tool-call delta has no filter results."""
    return {
        **base,
        "choices": [
            {
                "index": index,
                "delta": delta,
                "finish_reason": reason,
                "logprobs": None,
                "content_filter_results": CONTENT_FILTER_RESULTS if delta and "tool_calls" not in delta else {},
            }
        ],
    }


# -- embeddings -------------------------------------------------------------------


@lru_cache(maxsize=4096)
def vector(key: bytes, dims: int) -> tuple[float, ...]:
    """A unit vector of ``dims`` floats derived from ``key``: same input, same vector."""
    raw = hashlib.shake_256(key).digest(dims * 2)
    ints = memoryview(raw).cast("h")
    norm = math.sqrt(sum(v * v for v in ints)) or 1.0
    return tuple(v / norm for v in ints)


def base64_floats(vec: tuple[float, ...]) -> str:
    """``vec`` as little-endian float32s in base64, as ``encoding_format=base64`` returns."""
    packed = array.array("f", vec)
    if sys.byteorder != "little":
        packed.byteswap()
    return base64.b64encode(packed.tobytes()).decode()


def embedding_inputs(value: Any) -> list[tuple[bytes, int]]:
    """Return (hash key, token count) per input item; raise BadRequest if malformed."""
    if isinstance(value, str):
        return [(value.encode(), max(1, len(value) // 4))]
    if isinstance(value, list) and value:
        if all(isinstance(v, str) for v in value):
            return [(v.encode(), max(1, len(v) // 4)) for v in value]
        if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return [(orjson.dumps(value), len(value))]
        if all(isinstance(v, list) and v and all(isinstance(t, int) for t in v) for v in value):
            return [(orjson.dumps(v), len(v)) for v in value]
    raise BadRequest(
        "'input' must be a non-empty string, array of strings, array of tokens, or array of token arrays.",
        "input",
    )


def embeddings_response(data: list[dict[str, Any]], prompt_tokens: int) -> dict[str, Any]:
    """An embeddings ``list`` body."""
    return {
        "object": "list",
        "data": data,
        "model": EMBEDDING_MODEL,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "total_tokens": prompt_tokens,
        },
    }
