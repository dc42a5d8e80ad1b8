"""The simulator's function calls and structured output, over real HTTP, with the official SDK.

Shapes are checked against Azure captures (tests/data/azure_tool_calls.json); arguments and
structured answers against their schemas with ``jsonschema``; token counts against the bound
the proxy's budget relies on (prompt tokens at most a quarter of the request's bytes,
completion tokens at most ``max_tokens``). A careless client gets Azure's 400, never a crash.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema
import orjson
import pytest
from openai import AzureOpenAI, BadRequestError, OpenAI
from pydantic import BaseModel

from devtools.simulator.schema import FORMATS, instance
from devtools.simulator.tools import CALL_OVERHEAD_TOKENS, pieces
from tests.support import ROOT

API_VERSION = "2024-10-21"
CAPTURE = json.loads((ROOT / "tests" / "data" / "azure_tool_calls.json").read_text())
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "minLength": 2},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "unit", "days"],
    "additionalProperties": False,
}
TIME = {
    "type": "object",
    "properties": {"zone": {"type": "string"}},
    "required": ["zone"],
    "additionalProperties": False,
}
TOOLS: list[Any] = [
    {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER, "strict": True}},
    {"type": "function", "function": {"name": "get_time", "parameters": TIME}},
]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}


@pytest.fixture(scope="module")
def azure(simulator: str) -> Iterator[AzureOpenAI]:
    with AzureOpenAI(azure_endpoint=simulator, api_key="k", api_version=API_VERSION, max_retries=0) as client:
        yield client


@pytest.fixture(scope="module")
def v1(simulator: str) -> Iterator[OpenAI]:
    with OpenAI(base_url=f"{simulator}/openai/v1", api_key="k", max_retries=0) as client:
        yield client


def chat_raw(simulator: str, body: dict[str, Any]) -> httpx.Response:
    url = f"{simulator}/openai/deployments/gpt-4o-mini/chat/completions?api-version={API_VERSION}"
    return httpx.post(url, content=orjson.dumps(body), headers={"api-key": "k", "content-type": "application/json"})


def sse(response: httpx.Response) -> list[dict[str, Any]]:
    lines = [line[6:] for line in response.text.split("\n\n") if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def test_chat_calls_the_tool_with_arguments_its_schema_accepts(azure: AzureOpenAI) -> None:
    messages: Any = [{"role": "user", "content": "What is the weather in Paris?"}]
    answer = azure.chat.completions.create(model="gpt-4o-mini", messages=messages, tools=TOOLS)
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert choice.model_extra == {"content_filter_results": {}}  # Azure filters text, not calls
    calls = choice.message.tool_calls or []
    assert [c.function.name for c in calls] == ["get_weather"]  # type: ignore[union-attr]
    jsonschema.validate(json.loads(calls[0].function.arguments), WEATHER)  # type: ignore[union-attr]
    assert calls[0].id.startswith("call_")
    usage = answer.usage
    assert usage is not None and usage.completion_tokens == CALL_OVERHEAD_TOKENS + len(
        pieces(calls[0].function.arguments)  # type: ignore[union-attr]
    )


def test_chat_stream_of_calls_has_azures_shape(simulator: str) -> None:
    body = {
        "messages": [{"role": "user", "content": "get_weather and get_time, please"}],
        "tools": TOOLS,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    chunks = sse(chat_raw(simulator, body))
    captured = CAPTURE["chat_stream"]["chunks"]
    assert chunks[0].keys() >= captured[0].keys() and chunks[0]["choices"] == []
    deltas = [c["choices"][0] for c in chunks[1:] if c["choices"]]
    header, first_piece, finish = deltas[0], deltas[1], deltas[-1]
    for ours, theirs in ((header, captured[1]["choices"][0]), (first_piece, captured[2]["choices"][0])):
        assert ours.keys() == theirs.keys() and ours["content_filter_results"] == {}
        assert ours["delta"].keys() == theirs["delta"].keys()
        assert ours["delta"]["tool_calls"][0].keys() == theirs["delta"]["tool_calls"][0].keys()
        assert ours["delta"]["tool_calls"][0]["function"].keys() == theirs["delta"]["tool_calls"][0]["function"].keys()
    assert finish == {**captured[3]["choices"][0], "logprobs": None}
    assert chunks[1].keys() >= captured[1].keys() - {"obfuscation"}
    # Two tools named in the message, parallel calls allowed: two calls, each assembled from its pieces.
    assembled: dict[int, dict[str, str]] = {}
    for delta in deltas[:-1]:
        for call in delta["delta"]["tool_calls"]:
            kept = assembled.setdefault(call["index"], {"name": "", "arguments": ""})
            kept["name"] += call["function"].get("name") or ""
            kept["arguments"] += call["function"]["arguments"]
    assert [c["name"] for c in assembled.values()] == ["get_weather", "get_time"]
    for call in assembled.values():
        jsonschema.validate(json.loads(call["arguments"]), SCHEMAS[call["name"]])
    pieces_streamed = sum(1 for d in deltas[:-1] if d["delta"]["tool_calls"][0]["function"]["arguments"])
    assert chunks[-1]["usage"]["completion_tokens"] == pieces_streamed + 2 * CALL_OVERHEAD_TOKENS


def test_arguments_are_cut_into_pieces_as_azure_cuts_them() -> None:
    captured = CAPTURE["responses_stream"]["events"]
    deltas = tuple(e["delta"] for e in captured if e["type"] == "response.function_call_arguments.delta")
    arguments = next(e["arguments"] for e in captured if e["type"] == "response.function_call_arguments.done")
    assert pieces(arguments) == deltas


@pytest.mark.parametrize(
    ("extra", "text", "called"),
    [
        ({}, "get_weather and get_time", ["get_weather", "get_time"]),
        ({"parallel_tool_calls": False}, "get_weather and get_time", ["get_weather"]),
        ({"tool_choice": {"type": "function", "function": {"name": "get_time"}}}, "weather?", ["get_time"]),
        ({"tool_choice": "required"}, "anything", ["get_weather"]),
        ({"tool_choice": "none"}, "get_weather", []),
    ],
)
def test_tool_choice_and_parallel_calls(
    azure: AzureOpenAI, extra: dict[str, Any], text: str, called: list[str]
) -> None:
    messages: Any = [{"role": "user", "content": text}]
    answer = azure.chat.completions.create(model="gpt-4o-mini", messages=messages, tools=TOOLS, **extra)
    calls = answer.choices[0].message.tool_calls or []
    assert [c.function.name for c in calls] == called  # type: ignore[union-attr]
    assert answer.choices[0].finish_reason == ("tool_calls" if called else "stop")


def test_after_the_tool_results_the_answer_uses_them(azure: AzureOpenAI) -> None:
    messages: Any = [{"role": "user", "content": "get_weather and get_time"}]
    first = azure.chat.completions.create(model="gpt-4o-mini", messages=messages, tools=TOOLS)
    message = first.choices[0].message
    outputs = {"get_weather": "Sunny, 21 C", "get_time": "09:00 in Paris"}
    messages += [message.model_dump(exclude_none=True)]
    messages += [
        {"role": "tool", "tool_call_id": c.id, "content": outputs[c.function.name]}  # type: ignore[union-attr]
        for c in message.tool_calls or []
    ]
    second = azure.chat.completions.create(model="gpt-4o-mini", messages=messages, tools=TOOLS)
    text = second.choices[0].message.content or ""
    assert "Sunny, 21 C" in text and "09:00 in Paris" in text and second.choices[0].finish_reason == "stop"
    assert second.usage is not None and first.usage is not None
    assert second.usage.prompt_tokens > first.usage.prompt_tokens  # the calls and results are part of the prompt


def test_token_counts_stay_within_what_the_proxy_estimates(simulator: str) -> None:
    big = {**WEATHER, "description": "x" * 4000}
    body: dict[str, Any] = {
        "messages": [{"role": "user", "content": "weather"}],
        "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": big}}],
    }
    small = chat_raw(simulator, body).json()
    # Tool definitions count: 4,000 more bytes of them, about 1,000 more prompt tokens.
    plain = chat_raw(simulator, {**body, "tools": TOOLS[:1]}).json()
    assert 900 < small["usage"]["prompt_tokens"] - plain["usage"]["prompt_tokens"] <= 1000
    assert small["usage"]["prompt_tokens"] <= len(orjson.dumps(body)) // 4
    cut = chat_raw(simulator, {**body, "max_tokens": CALL_OVERHEAD_TOKENS + 3}).json()
    arguments = cut["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"]
    assert cut["choices"][0]["finish_reason"] == "length" and len(pieces(arguments)) == 3
    assert cut["usage"]["completion_tokens"] == CALL_OVERHEAD_TOKENS + 3


class Step(BaseModel):
    explanation: str
    output: str


class Solution(BaseModel):
    steps: list[Step]
    final_answer: str
    confidence: float | None


def test_structured_output_parses_into_the_pydantic_model(azure: AzureOpenAI, v1: OpenAI) -> None:
    messages: Any = [{"role": "user", "content": "solve 8x + 7 = -23"}]
    parsed = azure.beta.chat.completions.parse(model="gpt-4o-mini", messages=messages, response_format=Solution)
    solution = parsed.choices[0].message.parsed
    assert isinstance(solution, Solution) and solution.steps and solution.final_answer
    streamed = v1.responses.parse(model="gpt-4o-mini", input="solve 8x + 7 = -23", text_format=Solution)
    assert isinstance(streamed.output_parsed, Solution)


def test_json_object_needs_the_word_json(azure: AzureOpenAI) -> None:
    with pytest.raises(BadRequestError) as refused:
        azure.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], response_format={"type": "json_object"}
        )
    assert "must contain the word 'json'" in str(refused.value)
    answer = azure.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "Answer in JSON"}],
        response_format={"type": "json_object"},
    )
    assert isinstance(json.loads(answer.choices[0].message.content or ""), dict)


def test_responses_call_chain_and_stream(v1: OpenAI) -> None:
    tools: Any = [{"type": "function", "name": "weather", "parameters": WEATHER, "strict": True}]
    first = v1.responses.create(model="gpt-4o-mini", input="Weather in Lyon?", tools=tools)
    call = first.output[0]
    assert call.type == "function_call" and call.name == "weather" and call.status == "completed"
    jsonschema.validate(json.loads(call.arguments), WEATHER)
    output: Any = [{"type": "function_call_output", "call_id": call.call_id, "output": "Rain, 12 C"}]
    second = v1.responses.create(model="gpt-4o-mini", previous_response_id=first.id, input=output, tools=tools)
    assert "Rain, 12 C" in second.output_text
    with pytest.raises(BadRequestError) as refused:
        v1.responses.create(model="gpt-4o-mini", input=[{**output[0], "call_id": "call_nope"}], tools=tools)
    assert "No tool call found for function call output with call_id call_nope" in str(refused.value)

    with v1.responses.stream(model="gpt-4o-mini", input="Weather in Lyon?", tools=tools) as stream:
        events = [e.model_dump() for e in stream]
    captured = CAPTURE["responses_stream"]["events"]
    assert [e["type"] for e in events if "arguments" not in e["type"]] == [
        e["type"] for e in captured if "arguments" not in e["type"]
    ]
    for kind in ("response.output_item.added", "response.function_call_arguments.delta", "response.output_item.done"):
        ours = next(e for e in events if e["type"] == kind)
        theirs = next(e for e in captured if e["type"] == kind)
        assert {k for k, v in ours.items() if v is not None} >= theirs.keys() - {"obfuscation"}
        if "item" in theirs:
            assert {k for k, v in ours["item"].items() if v is not None} == theirs["item"].keys()
    done = next(e for e in events if e["type"] == "response.function_call_arguments.done")
    deltas = "".join(e["delta"] for e in events if e["type"] == "response.function_call_arguments.delta")
    assert done["arguments"] == deltas == events[-1]["response"]["output"][0]["arguments"]


def random_schema(rng: random.Random, defs: dict[str, Any], depth: int = 0) -> dict[str, Any]:
    """A random schema of the kinds function definitions and pydantic models use."""
    kinds = ["string", "integer", "number", "boolean", "null", "enum", "const"]
    if depth < 3:
        kinds += ["object", "object", "array", "anyOf", "ref", "nullable"]
    kind = rng.choice(kinds)
    if kind == "string":
        schema: dict[str, Any] = {"type": "string"}
        if rng.random() < 0.3:
            schema["format"] = rng.choice(sorted(FORMATS))
        elif rng.random() < 0.5:
            low = rng.randint(0, 30)
            schema.update(minLength=low, maxLength=low + rng.randint(0, 10))
        return schema
    if kind in ("integer", "number"):
        schema = {"type": kind}
        low = rng.randint(-50, 50)
        if rng.random() < 0.5:
            schema["exclusiveMinimum" if rng.random() < 0.5 else "minimum"] = low
        if rng.random() < 0.5:
            schema["exclusiveMaximum" if rng.random() < 0.5 else "maximum"] = low + rng.randint(12, 40)
        if kind == "integer" and rng.random() < 0.3:
            schema["multipleOf"] = rng.randint(2, 5)
        return schema
    if kind in ("boolean", "null"):
        return {"type": kind}
    if kind == "enum":
        return {"type": "string", "enum": rng.sample(["red", "green", "blue", "amber"], rng.randint(1, 4))}
    if kind == "const":
        return {"const": rng.choice([1, "fixed", True, None])}
    if kind == "object":
        properties = {f"p{i}": random_schema(rng, defs, depth + 1) for i in range(rng.randint(0, 4))}
        required = [p for p in properties if rng.random() < 0.7]
        return {"type": "object", "properties": properties, "required": required, "additionalProperties": False}
    if kind == "array":
        items = random_schema(rng, defs, depth + 1)
        low = rng.randint(0, 3)
        schema = {"type": "array", "items": items, "minItems": low, "maxItems": low + rng.randint(0, 3)}
        if items.get("type") == "string" and not {"format", "enum"} & items.keys() and items.get("maxLength", 9) > 8:
            schema["uniqueItems"] = True
        return schema
    if kind == "anyOf":
        return {"anyOf": [random_schema(rng, defs, depth + 1) for _ in range(rng.randint(1, 3))]}
    if kind == "nullable":
        return {"type": [rng.choice(["string", "integer", "number", "boolean"]), "null"]}
    name = f"D{len(defs)}"
    defs[name] = {}  # taken before it is built: a definition may refer to itself through anyOf
    node = random_schema(rng, defs, depth + 1)
    if node.get("type") == "object" and rng.random() < 0.5:
        node["properties"]["next"] = {"anyOf": [{"$ref": f"#/$defs/{name}"}, {"type": "null"}]}
        node["required"].append("next")
    defs[name] = node
    return {"$ref": f"#/$defs/{name}", "description": "as pydantic writes it"}


def random_schemas(count: int) -> Iterator[dict[str, Any]]:
    rng = random.Random(24)
    for _ in range(count):
        defs: dict[str, Any] = {}
        root = random_schema(rng, defs, 1)
        root = root if root.get("type") == "object" else {"type": "object", "properties": {"value": root}}
        yield {**root, "$defs": defs} if defs else root


def test_random_schemas_get_valid_instances() -> None:
    checked = 0
    for schema in random_schemas(400):
        validator = jsonschema.Draft202012Validator(
            schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
        )
        value = instance(schema)
        errors = [e.message for e in validator.iter_errors(value)]
        assert not errors, f"{schema}\n{value}\n{errors}"
        checked += 1
    assert checked == 400


def test_random_schemas_over_http(simulator: str) -> None:
    for index, schema in enumerate(random_schemas(30)):
        response_format = {"type": "json_schema", "json_schema": {"name": f"s{index}", "schema": schema}}
        body = {"messages": [{"role": "user", "content": "go"}], "response_format": response_format}
        answer = chat_raw(simulator, body).json()
        jsonschema.validate(json.loads(answer["choices"][0]["message"]["content"]), schema)
        tools = [{"type": "function", "function": {"name": f"t{index}", "parameters": schema}}]
        called = chat_raw(simulator, {**body, "response_format": None, "tools": tools}).json()
        arguments = called["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"]
        jsonschema.validate(json.loads(arguments), schema)


WORD = [{"role": "user", "content": "hi"}]
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}
HOSTILE: list[tuple[dict[str, Any], str, str]] = [
    ({"tools": {"type": "function"}}, "tools", "Invalid type for 'tools': expected an array, but got an object"),
    ({"tools": []}, "tools", "empty array"),
    ({"tools": ["get_time"]}, "tools[0]", "expected an object, but got a string"),
    ({"tools": [{"type": "function"}]}, "tools[0].function", "Missing required parameter: 'tools[0].function'"),
    ({"tools": [{"type": "browser", "function": {}}]}, "tools[0].type", "Invalid value: 'browser'"),
    ({"tools": [{"type": "function", "function": {"name": "get time"}}]}, "tools[0].function.name", "pattern"),
    ({"tools": [{"type": "function", "function": {"name": "x" * 65}}]}, "tools[0].function.name", "pattern"),
    (
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": "{}"}}]},
        "tools[0].function.parameters",
        "expected an object",
    ),
    (
        {
            "tools": [
                {
                    "type": "function",
                    "function": {
                        "name": "f",
                        "parameters": {"type": "object", "properties": {"a": {}}},
                        "strict": True,
                    },
                }
            ]
        },
        "tools[0].function.parameters",
        "Invalid schema for function 'f': In context=(), 'additionalProperties' is required to be supplied and to be "
        "false.",
    ),
    (
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"$ref": "#/$defs/Missing"}}}]},
        "tools[0].function.parameters",
        "reference to component '#/$defs/Missing' which was not found",
    ),
    (
        {
            "tools": [
                {
                    "type": "function",
                    "function": {
                        "name": "f",
                        "parameters": {"type": "object", "properties": {"me": {"$ref": "#"}}, "required": ["me"]},
                    },
                }
            ]
        },
        "tools[0].function.parameters",
        "recurses with no way to stop",
    ),
    ({"tool_choice": "auto"}, "tool_choice", "'tool_choice' is only allowed when 'tools' are specified"),
    ({"tools": TOOLS, "tool_choice": "always"}, "tool_choice", "Supported values are: 'none', 'auto', and 'required'"),
    (
        {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
        "tool_choice.function.name",
        "no function named 'nope'",
    ),
    ({"tools": TOOLS, "parallel_tool_calls": "yes"}, "parallel_tool_calls", "expected a boolean"),
    ({"response_format": "json"}, "response_format", "expected an object, but got a string"),
    ({"response_format": {"type": "yaml"}}, "response_format.type", "Invalid value: 'yaml'"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", "Missing required parameter"),
    (
        {"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}},
        "response_format.json_schema.name",
        "Missing required parameter",
    ),
    (
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "a", "strict": True, "schema": {"type": "array"}},
            }
        },
        "response_format",
        "Invalid schema for response_format 'a': schema must be a JSON Schema of 'type: \"object\"'",
    ),
    (
        {"messages": [*WORD, {"role": "tool", "tool_call_id": "call_1", "content": "x"}]},
        "messages.[1].role",
        "preceeding message with 'tool_calls'",
    ),
    (
        {"messages": [*WORD, {"role": "assistant", "tool_calls": [CALL]}]},
        "messages.[2].role",
        "did not have response messages: call_1",
    ),
    (
        {"messages": [*WORD, {"role": "assistant", "tool_calls": [CALL]}, *WORD]},
        "messages.[2].role",
        "did not have response messages",
    ),
    (
        {"messages": [*WORD, {"role": "assistant", "tool_calls": "call_1"}]},
        "messages[1].tool_calls",
        "expected an array",
    ),
    (
        {"messages": [*WORD, {"role": "assistant", "tool_calls": [{"id": "c"}]}]},
        "messages[1].tool_calls[0].function.name",
        "Missing",
    ),
    (
        {"messages": [*WORD, {"role": "assistant", "tool_calls": [CALL]}, {"role": "tool", "content": "x"}]},
        "messages[2].tool_call_id",
        "Missing",
    ),
]


@pytest.mark.parametrize(("change", "param", "message"), HOSTILE, ids=[h[1] + ":" + h[2][:30] for h in HOSTILE])
def test_malformed_tools_and_formats_get_azures_400(
    simulator: str, change: dict[str, Any], param: str, message: str
) -> None:
    response = chat_raw(simulator, {"messages": WORD, **change})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert message in error["message"]


def test_malformed_responses_tools_get_400(simulator: str) -> None:
    url = f"{simulator}/openai/v1/responses"
    bad = [
        ({"tools": [{"type": "function"}]}, "tools[0].name"),
        (
            {"tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}, "strict": True}]},
            "tools[0].parameters",
        ),
        ({"text": {"format": {"type": "json_schema", "schema": {}}}}, "text.format.name"),
        (
            {
                "text": {
                    "format": {
                        "type": "json_schema",
                        "name": "a",
                        "strict": True,
                        "schema": {"type": "object", "properties": {"x": {}}},
                    }
                }
            },
            "text.format.schema",
        ),
        ({"input": [{"type": "function_call", "call_id": 3}]}, "input"),
    ]
    for change, param in bad:
        response = httpx.post(url, json={"model": "gpt-4o-mini", "input": "hi", **change}, headers={"api-key": "k"})
        assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text
    # Hosted tools are not simulated: the model answers in text instead of refusing.
    hosted = {"model": "gpt-4o-mini", "input": "hi", "tools": [{"type": "web_search_preview"}]}
    assert httpx.post(url, json=hosted, headers={"api-key": "k"}).json()["output"][0]["type"] == "message"
