"""Agents through the proxy against ``make run``'s simulator: the OpenAI Agents SDK runs an agent
with a function tool on the Responses API and on chat completions, streamed and not, and
every model call it makes is recorded once with the tokens the SDK saw; LangChain's tool loop
and structured output; a chat session that carries tool calls.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from agents import (
    Agent,
    ModelSettings,
    OpenAIChatCompletionsModel,
    OpenAIResponsesModel,
    Runner,
    ToolCallItem,
    ToolCallOutputItem,
    function_tool,
    set_tracing_disabled,
)
from langchain_core.messages import HumanMessage, ToolMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from openai import AsyncOpenAI
from pydantic import BaseModel

from proxy.ledger.reports import request_log
from proxy.storage.tables import Tables
from tests.conftest import MakeEvent

set_tracing_disabled(True)  # the SDK would otherwise send traces to OpenAI's servers


@function_tool
def get_weather(city: str) -> str:
    """The weather in a city."""
    return f"Sunny and 21 C in {city}"


@tool("get_weather")
def langchain_weather(city: str) -> str:
    """The weather in a city."""
    return f"Sunny and 21 C in {city}"


class Report(BaseModel):
    city: str
    summary: str


def agent(client: AsyncOpenAI, api: str, **extra: Any) -> Agent[Any]:
    model = (
        OpenAIResponsesModel("gpt-4o-mini", client)
        if api == "responses"
        else OpenAIChatCompletionsModel("gpt-4o-mini", client)
    )
    settings = ModelSettings(include_usage=True)  # chat streams carry usage only when asked
    return Agent(
        name="Weather",
        instructions="Answer with get_weather.",
        tools=[get_weather],
        model=model,
        model_settings=settings,
        **extra,
    )


@pytest.mark.parametrize("stream", [False, True], ids=["run", "streamed"])
@pytest.mark.parametrize("api", ["responses", "chat"])
async def test_agent_calls_its_tool_through_the_proxy(
    app: str, make_event: MakeEvent, tables: Tables, api: str, stream: bool
) -> None:
    created = await make_event()
    async with AsyncOpenAI(base_url=f"{app}/api/v1", api_key=created.key(), max_retries=0) as client:
        weather = agent(client, api)
        if stream:
            result: Any = Runner.run_streamed(weather, "What is the weather in Paris?")
            events = [event.type async for event in result.stream_events()]
            assert "raw_response_event" in events and "run_item_stream_event" in events
        else:
            result = await Runner.run(weather, "What is the weather in Paris?")
    assert "Sunny and 21 C in" in result.final_output
    assert [type(i) for i in result.new_items][:2] == [ToolCallItem, ToolCallOutputItem]
    assert len(result.raw_responses) == 2  # the call, then the answer

    log = await request_log(tables, created.event.id)
    assert len(log) == 2 and {e["kind"] for e in log} == {api} and {e["status"] for e in log} == {200}
    assert {e["stream"] for e in log} == {stream}
    seen = sorted((r.usage.input_tokens, r.usage.output_tokens) for r in result.raw_responses)
    assert sorted((e["prompt_tokens"], e["completion_tokens"]) for e in log) == seen
    assert all(output > 0 for _, output in seen)


@pytest.mark.parametrize("api", ["responses", "chat"])
async def test_agent_with_a_tool_and_a_structured_output(app: str, make_event: MakeEvent, api: str) -> None:
    created = await make_event()
    async with AsyncOpenAI(base_url=f"{app}/api/v1", api_key=created.key(), max_retries=0) as client:
        result = await Runner.run(agent(client, api, output_type=Report), "Report on the weather in Oslo")
    report = result.final_output
    assert isinstance(report, Report) and "Sunny and 21 C in" in report.summary


async def test_malformed_tools_get_upstreams_400_through_the_proxy(app: str, make_event: MakeEvent) -> None:
    key = (await make_event()).key()
    bad = {"type": "function", "function": {"name": "get weather", "parameters": {"type": "object"}}}
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "tools": [bad]}
    with httpx.Client(timeout=30) as http:
        for stream in (False, True):
            response = http.post(
                f"{app}/api/v1/chat/completions", json={**body, "stream": stream}, headers={"api-key": key}
            )
            assert response.status_code == 400, response.text
            error = response.json()["error"]
            assert error["param"] == "tools[0].function.name" and "does not match pattern" in error["message"]
        body = {"model": "gpt-4o-mini", "input": "hi", "tools": [{"type": "function", "name": 7}]}
        response = http.post(f"{app}/api/v1/responses", json=body, headers={"api-key": key})
        assert response.status_code == 400 and response.json()["error"]["param"] == "tools[0].name", response.text


async def test_a_session_whose_tool_call_turn_is_dropped_keeps_working(app: str, make_event: MakeEvent) -> None:
    """A session keeps one turn here: the turn of the results goes with the turn of their calls."""
    created = await make_event(session_turns=1)
    tools: Any = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    session = {"session_id": "trip"}
    async with AsyncOpenAI(base_url=f"{app}/api/v1", api_key=created.key(), max_retries=0) as client:
        asked = await client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "weather?"}], tools=tools, extra_body=session
        )
        call = (asked.choices[0].message.tool_calls or [])[0]
        result: Any = [{"role": "tool", "tool_call_id": call.id, "content": "Sunny"}]
        answered = await client.chat.completions.create(
            model="gpt-4o-mini", messages=result, tools=tools, extra_body=session
        )
        assert "Sunny" in (answered.choices[0].message.content or "")
        # Upstream would refuse the kept tool result without its call: 400 before the fix.
        again = await client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "and tomorrow?"}],
            tools=tools,
            extra_body=session,
        )
    assert again.choices[0].finish_reason == "tool_calls"


async def test_langchain_tool_loop_and_structured_output(app: str, make_event: MakeEvent) -> None:
    """LangChain's ChatOpenAI with bind_tools (streamed) and with_structured_output, through the proxy."""
    key = (await make_event()).key()
    model = ChatOpenAI(base_url=f"{app}/api/v1", api_key=key, model="gpt-4o-mini", max_retries=0)
    with_tools = model.bind_tools([langchain_weather])
    messages: list[Any] = [HumanMessage("What is the weather in Paris?")]
    chunks = list(with_tools.stream(messages))
    called = chunks[0]
    for chunk in chunks[1:]:
        called += chunk
    assert [c["name"] for c in called.tool_calls] == ["get_weather"]  # type: ignore[attr-defined]
    messages.append(called)
    for call in called.tool_calls:  # type: ignore[attr-defined]
        messages.append(ToolMessage(langchain_weather.invoke(call["args"]), tool_call_id=call["id"]))
    assert "Sunny and 21 C in" in str(with_tools.invoke(messages).content)
    report = model.with_structured_output(Report).invoke("Report on the weather in Oslo")
    assert isinstance(report, Report) and report.city


async def test_structured_output_parses_through_the_proxy(app: str, make_event: MakeEvent) -> None:
    """The SDK's parse helpers send a strict JSON schema made from the model; the answer fills it."""
    created = await make_event()
    async with AsyncOpenAI(base_url=f"{app}/api/v1", api_key=created.key(), max_retries=0) as client:
        chat = await client.beta.chat.completions.parse(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "Report on Oslo"}], response_format=Report
        )
        response = await client.responses.parse(model="gpt-4o-mini", input="Report on Oslo", text_format=Report)
    assert isinstance(chat.choices[0].message.parsed, Report) and isinstance(response.output_parsed, Report)
