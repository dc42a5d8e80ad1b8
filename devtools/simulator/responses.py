"""The Responses API of the Azure OpenAI simulator: its wire format and its stored responses.

Azure serves the Responses API on its v1 API, which takes no dated
``api-version`` (absent, ``v1`` or ``preview``), with the deployment named by
``model`` in the body:

    POST   /openai/v1/responses                          create (``stream`` or not)
    GET    /openai/v1/responses/{id}                     retrieve a stored response
    DELETE /openai/v1/responses/{id}                     delete it
    GET    /openai/v1/responses/{id}/input_items         its input items (``limit``, ``order``, ``after``)

Sources: https://learn.microsoft.com/en-us/azure/foundry/openai/how-to/responses
(routes, ``previous_response_id``, retrieve, delete, input items),
https://learn.microsoft.com/en-us/azure/foundry/openai/api-version-lifecycle (the v1 API)
and https://developers.openai.com/api/reference/resources/responses/streaming-events
(the stream). A stream is a sequence of ``event: <type>`` / ``data: <json>``
pairs, each with a ``sequence_number``: ``response.created``,
``response.in_progress``, ``response.output_item.added``,
``response.content_part.added``, one ``response.output_text.delta`` per token,
``response.output_text.done``, ``response.content_part.done``,
``response.output_item.done``, then ``response.completed`` carrying the whole
response and its ``usage`` (``response.incomplete`` when ``max_output_tokens``
cut it short). There is no ``data: [DONE]``.

Responses are stored (``store`` defaults to true) in this process's memory;
``previous_response_id`` prepends the stored conversation (its inputs and
outputs) to the new input, and its tokens count as input tokens, as upstream
bills them.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from devtools.simulator.tools import (
    Call,
    fit,
    json_tokens,
    pieces,
    responses_format,
    responses_tool_results,
    results_text,
    tool_use,
)
from devtools.simulator.wire import BadRequest, completion_words, count_prompt_tokens, text_of

MAX_INPUT_ITEMS_LIMIT = 100


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}{uuid.uuid4().hex[:16]}"


def not_found_body(response_id: str) -> dict[str, Any]:
    return {
        "error": {
            "message": f"Response with id '{response_id}' not found.",
            "type": "invalid_request_error",
            "param": None,
            "code": None,
        }
    }


def previous_not_found_body(response_id: str) -> dict[str, Any]:
    return {
        "error": {
            "message": f"Previous response with id '{response_id}' not found.",
            "type": "invalid_request_error",
            "param": "previous_response_id",
            "code": "previous_response_not_found",
        }
    }


class PreviousNotFound(Exception):
    def __init__(self, response_id: str) -> None:
        super().__init__(response_id)
        self.response_id = response_id


@dataclass
class Stored:
    """A stored response, the input items of its request, and the conversation it ends."""

    response: dict[str, Any]
    input_items: list[dict[str, Any]]
    conversation: list[dict[str, Any]]


@dataclass
class Exchange:
    """One create request, worked out before any byte is sent."""

    response: dict[str, Any]
    input_items: list[dict[str, Any]]
    conversation: list[dict[str, Any]]
    deltas: dict[str, tuple[str, ...]]  # by output item id: the text or arguments, in streamed pieces
    input_tokens: int
    output_tokens: int
    last_text: str
    store: bool


@dataclass
class ResponseStore:
    """The simulator's stored responses, by id."""

    responses: dict[str, Stored] = field(default_factory=dict)

    def get(self, response_id: str) -> Stored | None:
        return self.responses.get(response_id)

    def delete(self, response_id: str) -> bool:
        return self.responses.pop(response_id, None) is not None

    def prepare(self, body: dict[str, Any], completion_tokens: int) -> Exchange:
        """Validate a create body and work out its answer (raises ``BadRequest``, ``PreviousNotFound``)."""
        items = input_items(body.get("input"))
        previous_id = body.get("previous_response_id")
        history: list[dict[str, Any]] = []
        if previous_id is not None:
            if not isinstance(previous_id, str):
                raise BadRequest("'previous_response_id' must be a string.", "previous_response_id")
            previous = self.responses.get(previous_id)
            if previous is None:
                raise PreviousNotFound(previous_id)
            history = previous.conversation
        instructions = body.get("instructions")
        if instructions is not None and not isinstance(instructions, str):
            raise BadRequest("'instructions' must be a string.", "instructions")
        cap = body.get("max_output_tokens")
        if cap is not None and (not isinstance(cap, int) or isinstance(cap, bool) or cap < 1):
            raise BadRequest("'max_output_tokens' must be a positive integer.", "max_output_tokens")
        store = body.get("store", True) is not False
        use = tool_use(body, responses=True)
        conversation = [*history, *items]
        results = responses_tool_results(conversation)
        texts = [instructions or "", *(item_text(i) for i in conversation if i.get("type", "message") == "message")]
        fmt = responses_format(body.get("text"), texts)
        # The answers it made count again as input, token for token as they were output (one a word),
        # as a real tokenizer reads its own output; the rest, four characters a token.
        answers = [i for i in history if i.get("role") == "assistant"]
        written = [i for i in conversation if i.get("role") != "assistant"]
        counted = [{"content": instructions or ""}, *({"content": item_text(i)} for i in written)]
        input_tokens = count_prompt_tokens(counted) + sum(len(item_text(i).split()) + 3 for i in answers)
        input_tokens += json_tokens(body.get("tools")) + json_tokens(body.get("text"))
        user_texts = [item_text(i) for i in items if i.get("role") == "user"]
        last_text = user_texts[-1] if user_texts else ""
        calls = [] if results else use.calls(last_text)
        if calls:
            output, deltas, output_tokens, cut = call_items(calls, cap)
        else:
            if results or fmt:
                hint = results_text(results) if results else " ".join(completion_words(completion_tokens))
                parts = pieces(fmt.text(hint) if fmt else hint)
            else:
                parts = tuple(w if i == 0 else " " + w for i, w in enumerate(completion_words(completion_tokens)))
            cut = cap is not None and cap < len(parts)
            parts = parts[:cap] if cut else parts
            message = output_message(new_id("msg"), "".join(parts), "completed")
            output, deltas, output_tokens = [message], {message["id"]: parts}, len(parts)
        finished = {
            **base_response(body, store, instructions, cap),
            "status": "incomplete" if cut else "completed",
            "incomplete_details": {"reason": "max_output_tokens"} if cut else None,
            "output": output,
            "usage": responses_usage(input_tokens, output_tokens),
        }
        return Exchange(
            response=finished,
            input_items=items,
            conversation=[*conversation, *output],
            deltas=deltas,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            last_text=last_text,
            store=store,
        )

    def keep(self, exchange: Exchange) -> None:
        if exchange.store:
            self.responses[exchange.response["id"]] = Stored(
                exchange.response, exchange.input_items, exchange.conversation
            )

    def input_item_list(self, stored: Stored, query: dict[str, str]) -> dict[str, Any]:
        """The list shape of ``GET .../input_items`` (newest first unless ``order=asc``)."""
        try:
            limit = int(query.get("limit", "20"))
        except ValueError:
            raise BadRequest("'limit' must be an integer.", "limit") from None
        if not 1 <= limit <= MAX_INPUT_ITEMS_LIMIT:
            raise BadRequest(f"'limit' must be between 1 and {MAX_INPUT_ITEMS_LIMIT}.", "limit")
        order = query.get("order", "desc")
        if order not in ("asc", "desc"):
            raise BadRequest("'order' must be 'asc' or 'desc'.", "order")
        items = stored.input_items if order == "asc" else list(reversed(stored.input_items))
        after = query.get("after")
        if after:
            ids = [item["id"] for item in items]
            items = items[ids.index(after) + 1 :] if after in ids else []
        page = items[:limit]
        return {
            "object": "list",
            "data": page,
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None,
            "has_more": len(items) > limit,
        }


def input_items(value: Any) -> list[dict[str, Any]]:
    """``input`` (a string, or a list of items or messages) as stored input items, each with an id."""
    if isinstance(value, str):
        value = [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise BadRequest("'input' must be a string or a non-empty array of input items.", "input")
    items: list[dict[str, Any]] = []
    for index, item in enumerate(value):
        if not isinstance(item, dict):
            raise BadRequest(f"'input[{index}]' must be an object.", "input")
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise BadRequest(f"'input[{index}].role' must be user, assistant, system or developer.", "input")
            content = item.get("content")
            if isinstance(content, str):
                part_type = "output_text" if role == "assistant" else "input_text"
                content = [{"type": part_type, "text": content}]
            if not isinstance(content, list):
                raise BadRequest(f"'input[{index}].content' must be a string or an array.", "input")
            items.append(
                {
                    "type": "message",
                    "id": item.get("id") or new_id("msg"),
                    "status": "completed",
                    "role": role,
                    "content": content,
                }
            )
        else:
            items.append({**item, "id": item.get("id") or new_id("item")})
    return items


def item_text(item: dict[str, Any]) -> str:
    """The text an input or output item carries, for counting tokens."""
    if item.get("type", "message") == "message":
        return text_of(item.get("content"))
    output = item.get("output") or item.get("arguments") or ""
    return output if isinstance(output, str) else ""


def call_items(
    calls: list[Call], cap: int | None
) -> tuple[list[dict[str, Any]], dict[str, tuple[str, ...]], int, bool]:
    """``function_call`` output items, their arguments in pieces, the output tokens, and whether ``cap`` cut them."""
    kept, tokens, cut = fit(calls, cap)
    items: list[dict[str, Any]] = []
    deltas: dict[str, tuple[str, ...]] = {}
    for call, parts in kept:
        item = function_call_item(new_id("fc"), call.call_id, call.name, "".join(parts), "completed")
        items.append(item)
        deltas[item["id"]] = parts
    return items, deltas, tokens, cut


def function_call_item(item_id: str, call_id: str, name: str, arguments: str, status: str) -> dict[str, Any]:
    return {
        "id": item_id,
        "type": "function_call",
        "status": status,
        "arguments": arguments,
        "call_id": call_id,
        "name": name,
    }


def responses_usage(input_tokens: int, output_tokens: int) -> dict[str, Any]:
    return {
        "input_tokens": input_tokens,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": input_tokens + output_tokens,
    }


def output_message(message_id: str, text: str, status: str) -> dict[str, Any]:
    content = [] if status == "in_progress" else [output_text_part(text)]
    return {"type": "message", "id": message_id, "status": status, "role": "assistant", "content": content}


def output_text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def base_response(body: dict[str, Any], store: bool, instructions: str | None, cap: int | None) -> dict[str, Any]:
    """A response as created: ``in_progress``, no output yet."""
    return {
        "id": new_id("resp"),
        "object": "response",
        "created_at": int(time.time()),
        "status": "in_progress",
        "background": False,
        "error": None,
        "incomplete_details": None,
        "instructions": instructions,
        "max_output_tokens": cap,
        "model": body.get("model"),
        "output": [],
        "parallel_tool_calls": body.get("parallel_tool_calls", True),
        "previous_response_id": body.get("previous_response_id"),
        "reasoning": {"effort": None, "summary": None},
        "store": store,
        "temperature": body.get("temperature", 1.0),
        "text": body.get("text") or {"format": {"type": "text"}},
        "tool_choice": body.get("tool_choice", "auto"),
        "tools": body.get("tools") or [],
        "top_p": body.get("top_p", 1.0),
        "truncation": body.get("truncation", "disabled"),
        "usage": None,
        "user": body.get("user"),
        "metadata": body.get("metadata") or {},
    }


def stream_events(exchange: Exchange) -> list[tuple[str, dict[str, Any]]]:
    """The events of a streamed response, in order, without their sequence numbers."""
    final = exchange.response
    created = {**final, "status": "in_progress", "output": [], "usage": None, "incomplete_details": None}
    events: list[tuple[str, dict[str, Any]]] = [
        ("response.created", {"response": created}),
        ("response.in_progress", {"response": created}),
    ]
    for index, item in enumerate(final["output"]):
        parts = exchange.deltas[item["id"]]
        if item["type"] == "function_call":
            events += call_events(index, item, parts)
        else:
            events += message_events(index, item, parts)
    events.append((f"response.{final['status']}", {"response": final}))
    return events


def message_events(index: int, message: dict[str, Any], parts: tuple[str, ...]) -> list[tuple[str, dict[str, Any]]]:
    text = message["content"][0]["text"]
    where = {"item_id": message["id"], "output_index": index, "content_index": 0}
    return [
        (
            "response.output_item.added",
            {"output_index": index, "item": output_message(message["id"], "", "in_progress")},
        ),
        ("response.content_part.added", {**where, "part": output_text_part("")}),
        *(("response.output_text.delta", {**where, "delta": part, "logprobs": []}) for part in parts),
        ("response.output_text.done", {**where, "text": text, "logprobs": []}),
        ("response.content_part.done", {**where, "part": output_text_part(text)}),
        ("response.output_item.done", {"output_index": index, "item": message}),
    ]


def call_events(index: int, item: dict[str, Any], parts: tuple[str, ...]) -> list[tuple[str, dict[str, Any]]]:
    """As Azure streams a function call (tests/data/azure_tool_calls.json)."""
    where = {"item_id": item["id"], "output_index": index}
    started = function_call_item(item["id"], item["call_id"], item["name"], "", "in_progress")
    return [
        ("response.output_item.added", {"output_index": index, "item": started}),
        *(("response.function_call_arguments.delta", {**where, "delta": part}) for part in parts),
        ("response.function_call_arguments.done", {**where, "arguments": item["arguments"]}),
        ("response.output_item.done", {"output_index": index, "item": item}),
    ]
