"""Function calling and structured output for the simulator, chat completions and Responses alike.

What the simulated model does:

* With ``tools`` and a ``tool_choice`` other than ``none``, unless the conversation ends with
  tool results, it calls tools: the one ``tool_choice`` names; else every tool whose name the
  last user message mentions (only the first of them when ``parallel_tool_calls`` is false);
  else the first tool. Arguments satisfy the tool's JSON schema (``devtools.simulator.schema``).
* When the conversation ends with tool results (chat ``tool`` messages, Responses
  ``function_call_output`` items), it answers in text that quotes them: "The get_weather tool
  returned: Sunny".
* With ``response_format`` (chat) or ``text.format`` (Responses) of type ``json_schema`` the
  answer is a JSON value valid under the schema; with ``json_object`` it is
  ``{"answer": "..."}``, and, as upstream, the messages must say "json".

Requests that OpenAI and Azure refuse are refused here with their 400 and wording: a
malformed tool, a tool name that does not match ``^[a-zA-Z0-9_-]{1,64}$``, ``tool_choice``
naming a tool that is not there or sent without tools, a schema strict mode does not take, a
``tool`` message that answers no call, a call left without its answer.

Tokens: tool definitions and schemas count as prompt tokens (a quarter token a byte of their
JSON, never more than the request's own bytes, as the proxy's budget estimate assumes); a call
costs ``CALL_OVERHEAD_TOKENS`` plus one token per streamed piece of its arguments.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from typing import Any

import orjson

from devtools.simulator.schema import SchemaError, check, instance
from devtools.simulator.wire import BadRequest, text_of

CALL_OVERHEAD_TOKENS = 8
TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
# Token-sized pieces: a word (up to 10 letters), up to 3 digits, or up to 3 other characters,
# with the white space before it. Azure streams '{"location":"San Francisco"}' as '{"',
# 'location', '":"', 'San', ' Francisco', '"}', which this splits the same way.
_PIECE = re.compile(r"\s*(?:[A-Za-z]{1,10}|\d{1,3}|[^\sA-Za-z\d]{1,3})|\s+$")
MODES = ("none", "auto", "required")


def pieces(text: str) -> tuple[str, ...]:
    """``text`` cut into token-sized pieces that join back into it."""
    return tuple(_PIECE.findall(text))


def json_tokens(value: Any) -> int:
    """Prompt tokens for a JSON part of the request: a quarter of its compact bytes."""
    return len(orjson.dumps(value)) // 4 if value is not None else 0


def _kind(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number"
    )


def _type_error(param: str, expected: str, value: Any) -> BadRequest:
    return BadRequest(f"Invalid type for '{param}': expected {expected}, but got {_kind(value)} instead.", param)


def _missing(param: str) -> BadRequest:
    return BadRequest(f"Missing required parameter: '{param}'.", param)


@dataclass(frozen=True)
class Tool:
    name: str
    parameters: dict[str, Any]


@dataclass(frozen=True)
class Call:
    call_id: str
    name: str
    arguments: str

    @property
    def pieces(self) -> tuple[str, ...]:
        return pieces(self.arguments)

    @property
    def tokens(self) -> int:
        return CALL_OVERHEAD_TOKENS + len(self.pieces)


@dataclass(frozen=True)
class Format:
    """A structured answer: ``json_object``, or ``json_schema`` with its schema."""

    kind: str
    schema: Any = None

    def text(self, hint: str) -> str:
        value = {"answer": hint} if self.kind == "json_object" else instance(self.schema, hint)
        return orjson.dumps(value).decode()


@dataclass(frozen=True)
class ToolUse:
    """What a request allows: its tools, ``tool_choice`` (mode and named tool), ``parallel_tool_calls``."""

    tools: tuple[Tool, ...] = ()
    mode: str = "none"
    named: str | None = None
    parallel: bool = True

    def calls(self, text: str) -> list[Call]:
        """The calls to make now, after a last user message ``text``."""
        if self.mode == "none" or not self.tools:
            return []
        if self.named is not None:
            chosen = [t for t in self.tools if t.name == self.named]
        else:
            lowered = text.lower()
            chosen = [t for t in self.tools if t.name.lower() in lowered] or [self.tools[0]]
            if not self.parallel:
                chosen = chosen[:1]
        return [
            Call("call_" + uuid.uuid4().hex[:24], t.name, orjson.dumps(instance(t.parameters)).decode()) for t in chosen
        ]


def fit(calls: list[Call], cap: int | None) -> tuple[list[tuple[Call, tuple[str, ...]]], int, bool]:
    """The calls within ``cap`` completion tokens, each with the pieces of its arguments that fit;
    the tokens they take; whether ``cap`` cut them short."""
    needed = sum(c.tokens for c in calls)
    budget = needed if cap is None else min(cap, needed)
    kept: list[tuple[Call, tuple[str, ...]]] = []
    tokens = 0
    for call in calls:
        if tokens >= budget:
            break
        parts = call.pieces[: max(0, budget - tokens - CALL_OVERHEAD_TOKENS)]
        tokens += min(budget - tokens, CALL_OVERHEAD_TOKENS + len(parts))
        kept.append((call, parts))
    return kept, tokens, tokens < needed


def tool_use(body: dict[str, Any], responses: bool) -> ToolUse:
    """Validate ``tools``, ``tool_choice`` and ``parallel_tool_calls`` (raises ``BadRequest``)."""
    raw, choice, parallel = body.get("tools"), body.get("tool_choice"), body.get("parallel_tool_calls")
    if raw is None or (responses and raw == []):
        if not responses and choice is not None:
            message = "Invalid value for 'tool_choice': 'tool_choice' is only allowed when 'tools' are specified."
            raise BadRequest(message, "tool_choice")
        if not responses and parallel is not None:
            message = (
                "Invalid value for 'parallel_tool_calls': "
                "'parallel_tool_calls' is only allowed when 'tools' are specified."
            )
            raise BadRequest(message, "parallel_tool_calls")
        return ToolUse()
    if not isinstance(raw, list):
        raise _type_error("tools", "an array", raw)
    if not raw:
        raise BadRequest(
            "Invalid 'tools': empty array. Expected an array with minimum length 1, but got an empty array instead.",
            "tools",
        )
    tools = tuple(t for i, item in enumerate(raw) if (t := _tool(item, i, responses)) is not None)
    if parallel is not None and not isinstance(parallel, bool):
        raise _type_error("parallel_tool_calls", "a boolean", parallel)
    mode, named = _choice(choice, tools, responses)
    return ToolUse(tools, mode, named, parallel is not False)


def _tool(item: Any, index: int, responses: bool) -> Tool | None:
    where = f"tools[{index}]"
    if not isinstance(item, dict):
        raise _type_error(where, "an object", item)
    kind = item.get("type")
    if kind is None:
        raise _missing(f"{where}.type")
    if kind != "function":
        if responses:  # hosted tools (web search, file search...): the simulator never calls them
            return None
        raise BadRequest(f"Invalid value: '{kind}'. Supported values are: 'function' and 'custom'.", f"{where}.type")
    if not responses:
        item = item.get("function")
        where += ".function"
        if item is None:
            raise _missing(where)
        if not isinstance(item, dict):
            raise _type_error(where, "an object", item)
    name = item.get("name")
    if name is None:
        raise _missing(f"{where}.name")
    if not isinstance(name, str):
        raise _type_error(f"{where}.name", "a string", name)
    if not TOOL_NAME.match(name):
        message = (
            f"Invalid '{where}.name': string does not match pattern. "
            "Expected a string that matches the pattern '^[a-zA-Z0-9_-]{1,64}$'."
        )
        raise BadRequest(message, f"{where}.name")
    parameters = item.get("parameters", {"type": "object", "properties": {}})
    if not isinstance(parameters, dict):
        raise _type_error(f"{where}.parameters", "an object", parameters)
    strict = item.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise _type_error(f"{where}.strict", "a boolean", strict)
    try:
        check(parameters, name, strict is True, "function")
    except SchemaError as exc:
        raise BadRequest(str(exc), f"{where}.parameters") from None
    return Tool(name, parameters)


def _choice(choice: Any, tools: tuple[Tool, ...], responses: bool) -> tuple[str, str | None]:
    if choice is None:
        return "auto", None
    if isinstance(choice, str):
        if choice not in MODES:
            raise BadRequest(
                f"Invalid value: '{choice}'. Supported values are: 'none', 'auto', and 'required'.", "tool_choice"
            )
        return choice, None
    if not isinstance(choice, dict):
        raise _type_error("tool_choice", "a string or an object", choice)
    if choice.get("type") != "function":
        raise BadRequest("Invalid value for 'tool_choice.type': only 'function' is supported.", "tool_choice.type")
    holder = choice if responses else choice.get("function")
    param = "tool_choice.name" if responses else "tool_choice.function.name"
    name = holder.get("name") if isinstance(holder, dict) else None
    if not isinstance(name, str):
        raise _missing(param)
    if name not in {t.name for t in tools}:
        raise BadRequest(f"Invalid value for '{param}': no function named '{name}' was specified in 'tools'.", param)
    return "required", name


def chat_format(value: Any, messages: list[Any]) -> Format | None:
    """The structured answer ``response_format`` asks for, if any (raises ``BadRequest``)."""
    if value is None:
        return None
    return _format(value, "response_format", [text_of(m.get("content")) for m in messages if isinstance(m, dict)])


def responses_format(text: Any, texts: list[str]) -> Format | None:
    """The structured answer ``text.format`` asks for, if any (raises ``BadRequest``)."""
    if text is None:
        return None
    if not isinstance(text, dict):
        raise _type_error("text", "an object", text)
    fmt = text.get("format")
    return None if fmt is None else _format(fmt, "text.format", texts)


JSON_WORD = {
    "response_format": "'messages' must contain the word 'json' in some form, to use 'response_format' of type "
    "'json_object'.",
    "text.format": "Response input messages must contain the word 'json' in some form to use 'text.format' of type "
    "'json_object'.",
}


def _format(value: Any, where: str, texts: list[str]) -> Format | None:
    """Chat nests the schema (``response_format.json_schema``), Responses does not (``text.format``)."""
    if not isinstance(value, dict):
        raise _type_error(where, "an object", value)
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        if not any("json" in t.lower() for t in texts):
            raise BadRequest(JSON_WORD[where], "messages" if where == "response_format" else where)
        return Format("json_object")
    if kind != "json_schema":
        message = f"Invalid value: '{kind}'. Supported values are: 'text', 'json_object', and 'json_schema'."
        raise BadRequest(message, f"{where}.type")
    if where == "text.format":
        return _schema_format(value, where, f"{where}.schema", code="invalid_json_schema")
    spec = value.get("json_schema")
    if spec is None:
        raise _missing(f"{where}.json_schema")
    if not isinstance(spec, dict):
        raise _type_error(f"{where}.json_schema", "an object", spec)
    return _schema_format(spec, f"{where}.json_schema", where)


def _schema_format(spec: dict[str, Any], where: str, schema_param: str, code: str | None = None) -> Format:
    name = spec.get("name")
    if name is None:
        raise _missing(f"{where}.name")
    if not isinstance(name, str) or not TOOL_NAME.match(name):
        message = (
            f"Invalid '{where}.name': string does not match pattern. "
            "Expected a string that matches the pattern '^[a-zA-Z0-9_-]{1,64}$'."
        )
        raise BadRequest(message, f"{where}.name")
    schema = spec.get("schema", {"type": "object"})
    strict = spec.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise _type_error(f"{where}.strict", "a boolean", strict)
    try:
        check(schema, name, strict is True)
    except SchemaError as exc:
        raise BadRequest(str(exc), schema_param, code) from None
    return Format("json_schema", schema)


def chat_tool_results(messages: list[Any]) -> list[tuple[str, str]]:
    """Check every call is answered and every ``tool`` message answers one; the results the conversation ends with."""
    pending: dict[str, str] = {}
    names: dict[str, str] = {}
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            continue
        role = message.get("role")
        if pending and role != "tool":
            raise _unanswered(pending, index)
        if role == "assistant" and message.get("tool_calls") is not None:
            pending = _assistant_calls(message["tool_calls"], index)
            names.update(pending)
        elif role == "tool":
            call_id = message.get("tool_call_id")
            if call_id is None:
                raise _missing(f"messages[{index}].tool_call_id")
            if call_id not in pending:
                message_text = (
                    "Invalid parameter: messages with role 'tool' must be a response "
                    "to a preceeding message with 'tool_calls'."  # sic: OpenAI's spelling
                )
                raise BadRequest(message_text, f"messages.[{index}].role")
            pending.pop(call_id)
    if pending:
        raise _unanswered(pending, len(messages))
    results: list[tuple[str, str]] = []
    for message in reversed(messages):
        if not isinstance(message, dict) or message.get("role") != "tool":
            break
        results.insert(0, (names[message["tool_call_id"]], text_of(message.get("content"))))
    return results


def _assistant_calls(calls: Any, index: int) -> dict[str, str]:
    where = f"messages[{index}].tool_calls"
    if not isinstance(calls, list):
        raise _type_error(where, "an array", calls)
    pending: dict[str, str] = {}
    for number, call in enumerate(calls):
        here = f"{where}[{number}]"
        if not isinstance(call, dict):
            raise _type_error(here, "an object", call)
        function = call.get("function")
        if not isinstance(call.get("id"), str):
            raise _missing(f"{here}.id")
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise _missing(f"{here}.function.name")
        if not isinstance(function.get("arguments"), str):
            raise _missing(f"{here}.function.arguments")
        pending[call["id"]] = function["name"]
    return pending


def _unanswered(pending: dict[str, str], index: int) -> BadRequest:
    message = (
        "An assistant message with 'tool_calls' must be followed by tool messages responding to each "
        f"'tool_call_id'. The following tool_call_ids did not have response messages: {', '.join(pending)}"
    )
    return BadRequest(message, f"messages.[{index}].role")


def responses_tool_results(conversation: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """Check every ``function_call_output`` answers a ``function_call``; the outputs the conversation ends with."""
    names: dict[str, str] = {}
    for item in conversation:
        kind = item.get("type")
        if kind == "function_call":
            call_id, name = item.get("call_id"), item.get("name")
            if not isinstance(call_id, str) or not isinstance(name, str):
                raise BadRequest("A 'function_call' input item needs 'call_id' and 'name' strings.", "input")
            names[call_id] = name
        elif kind == "function_call_output":
            call_id = item.get("call_id")
            if call_id not in names:
                raise BadRequest(f"No tool call found for function call output with call_id {call_id}.", "input")
    results: list[tuple[str, str]] = []
    for item in reversed(conversation):
        if item.get("type") != "function_call_output":
            break
        output = item.get("output")
        results.insert(0, (names[item["call_id"]], output if isinstance(output, str) else text_of(output)))
    return results


def results_text(results: list[tuple[str, str]]) -> str:
    """An answer that uses the tools' results."""
    return " ".join(f"The {name} tool returned: {output.strip()}" for name, output in results)
