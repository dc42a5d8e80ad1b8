"""Chat sessions: the conversation the proxy keeps for a chat completion's ``session_id``.

A chat completion may carry ``session_id`` (1 to 128 of ``A-Z a-z 0-9 . _ -``).
The proxy takes it out of the body (it is never sent upstream), prepends the
conversation kept under that id, and keeps the new turn once the answer is in.
The client sends only its new message; upstream sees the whole conversation,
and its tokens count against the caps like any prompt (they are in the body
the cap reservation estimates, and in upstream's ``usage``).

Storage: the ``proxyrequests`` table, by key, ``PartitionKey=<event id>``,
``RowKey="session|<attendee>|<session id>"``: the same id from another
attendee, or in another event, is another session. The turns are JSON, UTF-8,
in binary properties ``turns0``, ``turns1``... of at most 60,000 bytes each
(Table Storage allows 64 KiB per property and 1 MiB per entity), with
``expires_at``.

What upstream receives: the request's own ``system``/``developer`` messages
first (so instructions are not repeated turn after turn), then the kept turns,
oldest first, then the request's other messages. A turn is the request's
non-system messages and the assistant's answer (choice 0; for a stream, its
content and tool calls put together from the deltas).

Bounds: at most the event's ``session_turns`` turns and ``session_chars``
characters of their JSON, which organizers set per event; when an event leaves
them unset, ``SESSION_MAX_TURNS`` (20) and ``SESSION_MAX_CHARS`` (60,000) of
``proxy.config.settings``. The oldest turns are dropped first (a single turn larger
than the whole bound is not kept), and with them the tool results whose calls they held. A session is forgotten
``SESSION_TTL_SECONDS`` (24 h) after its last turn.

The turn is stored before the answer ends (before the body is released, or a
stream's ``data: [DONE]``), so the next request sees it; two turns finishing
at once on one session are both kept (conditional writes on the ETag, merged on
conflict). If storage refuses, the answer is withheld like one whose usage
cannot be recorded (``storage_unavailable``). Saving the turn and
committing the usage record are one step that a client leaving cannot cut
short (``proxy.ledger.ending``): a turn whose answer upstream completed is kept, and
its request recorded, even if the client is gone before the end.
``DELETE /api/v1/sessions/{id}`` forgets one (under the ETag it read, like every
write of a session), and a timer (``purge_expired``,
hourly) deletes those past their time to live, so a forgotten conversation is
gone from storage too.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from azure.core import MatchConditions
from azure.core.exceptions import ResourceExistsError, ResourceModifiedError, ResourceNotFoundError
from azure.data.tables import UpdateMode

from proxy.errors import InvalidRequest, StorageUnavailable
from proxy.policy.events import Event
from proxy.storage.tables import Tables, gathered, guarded
from proxy.upstream.payload import chat_messages

SESSION_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")
ROW_PREFIX = "session|"
CHUNK_BYTES = 60_000
MAX_BYTES = 15 * CHUNK_BYTES  # under the 1 MiB entity limit, whatever SESSION_MAX_CHARS says
SYSTEM_ROLES = frozenset({"system", "developer"})
SAVE_ATTEMPTS = 5

Turns = list[list[dict[str, Any]]]


@dataclass(frozen=True, slots=True)
class SessionLimits:
    max_turns: int
    max_chars: int
    ttl_seconds: float


def check_session_id(value: Any) -> str:
    if not isinstance(value, str) or not SESSION_ID.fullmatch(value):
        raise InvalidRequest("'session_id' must be 1 to 128 of A-Z a-z 0-9 . _ -", param="session_id")
    return value


def bounded(turns: Turns, limits: SessionLimits) -> Turns:
    """The newest turns within the bounds, oldest dropped first (and within what one entity holds)."""
    encoded = [orjson.dumps(turn) for turn in turns]
    chars = [len(raw.decode()) for raw in encoded]
    start, total, size = 0, sum(chars), sum(len(raw) + 1 for raw in encoded)
    while start < len(turns) and (
        len(turns) - start > limits.max_turns or total > limits.max_chars or size > MAX_BYTES
    ):
        total -= chars[start]
        size -= len(encoded[start]) + 1
        start += 1
    # A turn that opens with tool results answers calls made in a turn dropped above: upstream
    # refuses results without their call (400), so they go too.
    while 0 < start < len(turns) and turns[start] and turns[start][0].get("role") == "tool":
        start += 1
    return turns[start:]


class Sessions:
    """Loads, prepends and stores the attendees' chat sessions."""

    def __init__(
        self, tables: Tables, limits: SessionLimits, clock: Callable[[], datetime] = lambda: datetime.now(UTC)
    ) -> None:
        self._tables = tables
        self.limits = limits
        self._clock = clock

    def limits_for(self, event: Event) -> SessionLimits:
        """The event's own bounds, or the proxy's defaults where it sets none."""
        return SessionLimits(
            max_turns=self.limits.max_turns if event.session_turns is None else event.session_turns,
            max_chars=self.limits.max_chars if event.session_chars is None else event.session_chars,
            ttl_seconds=self.limits.ttl_seconds,
        )

    async def open(self, payload: dict[str, Any], event: Event, user: str) -> Turn | None:
        """Take ``session_id`` out of a chat body and prepend its conversation; None without one."""
        if "session_id" not in payload:
            return None
        session_id = check_session_id(payload.pop("session_id"))
        messages = chat_messages(payload)
        key = (event.id, f"{ROW_PREFIX}{user}|{session_id}")
        limits = self.limits_for(event)
        etag, history = await self._load(key)
        history = bounded(history, limits)  # the event's bound may have shrunk since
        system = [m for m in messages if _is_system(m)]
        sent = [m for m in messages if not _is_system(m)]
        payload["messages"] = [*system, *(m for turn in history for m in turn), *sent]
        return Turn(self, key, etag, history, sent, limits)

    async def forget(self, event_id: str, user: str, session_id: str) -> bool:
        """Delete one session; False if there was none.

        The delete is conditional on the ETag read (``delete_entity`` does not say whether there was one,
        so the read answers that): a turn saved in between fails it, and the session is read and deleted
        again, that turn with it. A delete answered with success leaves no session behind, and a turn
        answered after it starts a new one (``save``)."""
        key = f"{ROW_PREFIX}{user}|{check_session_id(session_id)}"
        table = self._tables.requests
        for _ in range(SAVE_ATTEMPTS):
            try:
                found = await guarded(table.get_entity(event_id, key, select=["PartitionKey"]))
            except ResourceNotFoundError:
                return False
            with contextlib.suppress(ResourceModifiedError):
                await guarded(
                    table.delete_entity(
                        event_id, key, etag=found.metadata["etag"], match_condition=MatchConditions.IfNotModified
                    )
                )
                return True
        raise StorageUnavailable("The chat session is being written by many requests at once; try again.")

    async def history(self, event_id: str, user: str, session_id: str) -> Turns:
        """The turns kept for a session (empty if none or expired)."""
        return (await self._load((event_id, f"{ROW_PREFIX}{user}|{check_session_id(session_id)}")))[1]

    async def _load(self, key: tuple[str, str]) -> tuple[str | None, Turns]:
        try:
            entity = await guarded(self._tables.requests.get_entity(*key))
        except ResourceNotFoundError:
            return None, []
        etag = str(entity.metadata["etag"])
        expires = entity.get("expires_at")
        if isinstance(expires, datetime) and expires <= self._clock():
            return etag, []
        raw = b"".join(bytes(entity[f"turns{i}"]) for i in range(int(entity.get("chunks", 0))))
        turns = orjson.loads(raw) if raw else []
        return etag, turns if isinstance(turns, list) else []

    async def save(self, turn: Turn, answer: dict[str, Any]) -> None:
        """Append a turn, within the bounds; merged with a concurrent turn rather than overwriting it."""
        new = [*turn.sent, answer]
        etag, history = turn.etag, turn.history
        table = self._tables.requests
        for _ in range(SAVE_ATTEMPTS):
            entity = self._entity(turn.key, bounded([*history, new], turn.limits), turn.limits)
            try:
                if etag is None:
                    await self._tables.insert(table, entity)
                else:
                    await guarded(
                        table.update_entity(
                            entity, mode=UpdateMode.REPLACE, etag=etag, match_condition=MatchConditions.IfNotModified
                        )
                    )
                return
            except (ResourceExistsError, ResourceModifiedError, ResourceNotFoundError):
                # Written meanwhile, or forgotten (or purged) since it was read: a forgotten session starts
                # afresh with this turn, never with the history it had.
                etag, history = await self._load(turn.key)
        raise StorageUnavailable("The chat session is being written by many requests at once; try again.")

    def _entity(self, key: tuple[str, str], turns: Turns, limits: SessionLimits) -> dict[str, Any]:
        raw = orjson.dumps(turns)
        chunks = [raw[i : i + CHUNK_BYTES] for i in range(0, len(raw), CHUNK_BYTES)]
        entity: dict[str, Any] = {
            "PartitionKey": key[0],
            "RowKey": key[1],
            "chunks": len(chunks),
            "turn_count": len(turns),
            "expires_at": self._clock() + timedelta(seconds=limits.ttl_seconds),
        }
        entity.update({f"turns{i}": chunk for i, chunk in enumerate(chunks)})
        return entity


@dataclass
class Turn:
    """One request's turn in a session: what it sent, and the answer as it arrives."""

    sessions: Sessions
    key: tuple[str, str]
    etag: str | None
    history: Turns
    sent: list[dict[str, Any]]
    limits: SessionLimits
    _content: list[str] = field(default_factory=list)
    _tool_calls: dict[int, dict[str, Any]] = field(default_factory=dict)
    _streamed: bool = False

    def observe(self, complete: bytes) -> None:
        """Read the answer's deltas from complete stream events (choice 0)."""
        self._streamed = True
        for event in complete.split(b"\n\n"):
            if not event.startswith(b"data: {"):
                continue
            try:
                chunk = orjson.loads(event[6:])
            except orjson.JSONDecodeError:
                continue
            for choice in chunk.get("choices") or ():
                if isinstance(choice, dict) and choice.get("index", 0) == 0:
                    self._take_delta(choice.get("delta") or {})

    def _take_delta(self, delta: dict[str, Any]) -> None:
        if isinstance(delta.get("content"), str):
            self._content.append(delta["content"])
        for call in delta.get("tool_calls") or ():
            if not isinstance(call, dict):
                continue
            kept = self._tool_calls.setdefault(
                int(call.get("index", 0)), {"id": "", "type": "function", "function": {"name": "", "arguments": ""}}
            )
            kept["id"] = call.get("id") or kept["id"]
            kept["type"] = call.get("type") or kept["type"]
            function = call.get("function") or {}
            kept["function"]["name"] += function.get("name") or ""
            kept["function"]["arguments"] += function.get("arguments") or ""

    def answer(self, body: bytes | None) -> dict[str, Any] | None:
        """The assistant message to keep: from a non-streamed body, or the deltas seen."""
        if body is not None:
            try:
                message = orjson.loads(body)["choices"][0]["message"]
            except (orjson.JSONDecodeError, KeyError, IndexError, TypeError):
                return None
            if not isinstance(message, dict):
                return None
            return {k: message[k] for k in ("role", "content", "tool_calls") if message.get(k) is not None}
        if not self._streamed:
            return None
        kept: dict[str, Any] = {"role": "assistant", "content": "".join(self._content) or None}
        if self._tool_calls:
            kept["tool_calls"] = [self._tool_calls[i] for i in sorted(self._tool_calls)]
        return kept

    async def keep(self, status: int, body: bytes | None = None) -> None:
        """Store the turn of a successful answer; ``proxy.ledger.ending`` runs this before the answer ends."""
        answer = self.answer(body) if 200 <= status < 300 else None
        if answer is not None:
            await self.sessions.save(self, answer)


async def purge_expired(tables: Tables, now: datetime) -> int:
    """Delete every session whose time to live has passed; how many were deleted."""
    expired = tables.requests.query_entities(
        "RowKey ge @first and RowKey lt @after and expires_at lt @now",
        parameters={"first": ROW_PREFIX, "after": ROW_PREFIX[:-1] + chr(ord(ROW_PREFIX[-1]) + 1), "now": now},
        select=["PartitionKey", "RowKey"],
    )
    try:
        rows = await gathered(expired)
    except ResourceNotFoundError:  # no table yet
        return 0
    for row in rows:
        # A session written again since the query keeps its new turns: delete only what is still expired.
        with contextlib.suppress(ResourceNotFoundError, ResourceModifiedError):
            await guarded(
                tables.requests.delete_entity(
                    row["PartitionKey"],
                    row["RowKey"],
                    etag=row.metadata["etag"],
                    match_condition=MatchConditions.IfNotModified,
                )
            )
    return len(rows)


def _is_system(message: Any) -> bool:
    return isinstance(message, dict) and message.get("role") in SYSTEM_ROLES
