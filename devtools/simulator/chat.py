"""The simulator's chat answer, worked out before a byte is sent: as a message and as stream deltas.

Three kinds (``devtools.simulator.tools`` says when each is given): the deterministic words of
``devtools.simulator.wire``; tool calls; or a text that quotes tool results or is structured JSON.
``max_tokens`` cuts any of them short with ``finish_reason: "length"`` (a call's arguments too).

Stream deltas follow a capture of Azure OpenAI's chat stream (a gpt-5.2-chat deployment,
2026): the first delta of a tool call carries the role, ``content: null``, ``refusal: null``
and the call's ``id``, ``type`` and ``name`` with empty ``arguments``; the following deltas
carry only ``index`` and a piece of ``arguments``; then ``finish_reason: "tool_calls"`` with an
empty delta (see tests/data/azure_tool_calls.json).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from devtools.simulator.tools import (
    Call,
    chat_format,
    chat_tool_results,
    fit,
    json_tokens,
    pieces,
    results_text,
    tool_use,
)
from devtools.simulator.wire import completion_words, count_prompt_tokens, last_user_text


@dataclass(frozen=True)
class ChatAnswer:
    message: dict[str, Any]
    deltas: list[dict[str, Any]]  # the first carries the role
    finish: str
    completion_tokens: int  # for one choice
    prompt_tokens: int


def answer(body: dict[str, Any], messages: list[Any], default_count: int, cap: int | None) -> ChatAnswer:
    """The answer to a chat request (raises ``BadRequest`` for what upstream refuses)."""
    use = tool_use(body, responses=False)
    fmt = chat_format(body.get("response_format"), messages)
    results = chat_tool_results(messages)
    prompt_tokens = (
        count_prompt_tokens(messages) + json_tokens(body.get("tools")) + json_tokens(body.get("response_format"))
    )
    calls = [] if results else use.calls(last_user_text(messages))
    if calls:
        return _calls(calls, cap, prompt_tokens)
    if results or fmt:
        hint = results_text(results) if results else " ".join(completion_words(default_count))
        return _text(pieces(fmt.text(hint) if fmt else hint), cap, prompt_tokens)
    count = default_count if cap is None else min(cap, default_count)
    words = completion_words(count)
    return _text(
        tuple(w if i == 0 else " " + w for i, w in enumerate(words)), None, prompt_tokens, count < default_count
    )


def _text(parts: tuple[str, ...], cap: int | None, prompt_tokens: int, cut: bool = False) -> ChatAnswer:
    if cap is not None and len(parts) > cap:
        parts, cut = parts[:cap], True
    role = {"role": "assistant", "content": "", "refusal": None}
    return ChatAnswer(
        message={"role": "assistant", "content": "".join(parts), "refusal": None},
        deltas=[role, *({"content": p} for p in parts)],
        finish="length" if cut else "stop",
        completion_tokens=len(parts),
        prompt_tokens=prompt_tokens,
    )


def _calls(calls: list[Call], cap: int | None, prompt_tokens: int) -> ChatAnswer:
    kept, tokens, cut = fit(calls, cap)
    made: list[dict[str, Any]] = []
    deltas: list[dict[str, Any]] = []
    for index, (call, parts) in enumerate(kept):
        made.append(
            {"id": call.call_id, "type": "function", "function": {"name": call.name, "arguments": "".join(parts)}}
        )
        header = {
            "index": index,
            "id": call.call_id,
            "type": "function",
            "function": {"name": call.name, "arguments": ""},
        }
        first = {"role": "assistant", "content": None, "refusal": None} if index == 0 else {}
        deltas.append({**first, "tool_calls": [header]})
        deltas += [{"tool_calls": [{"index": index, "function": {"arguments": p}}]} for p in parts]
    return ChatAnswer(
        message={"role": "assistant", "content": None, "refusal": None, "tool_calls": made},
        deltas=deltas,
        finish="length" if cut else "tool_calls",
        completion_tokens=tokens,
        prompt_tokens=prompt_tokens,
    )
