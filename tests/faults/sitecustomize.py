"""Faults injected into the app's worker process, for tests/test_faults.py only.

Python imports ``sitecustomize`` at start-up from ``PYTHONPATH``; the fault
test puts this folder there, so the worker (started by the host emulator with
that environment) runs the real app with three deliberate bugs, each set off
by a marker no real request carries:

- the event lookup raises for the code ``FAULTY-LOOKUP``;
- the upstream call raises for a request whose body holds ``FAULT-UPSTREAM``;
- reading a stream's usage raises for the attendee ``faulty-stream``.
"""

from __future__ import annotations

from typing import Any

from proxy.edge import streaming
from proxy.policy.events import EventStore
from proxy.upstream.client import Upstream

_by_code = EventStore.by_code
_send = Upstream.send
_take_usage = streaming._take_usage


async def _faulty_by_code(self: EventStore, code: str, code_hash: str | None = None) -> Any:
    if code == "FAULTY-LOOKUP":
        raise RuntimeError("injected fault in the event lookup")
    return await _by_code(self, code, code_hash)


async def _faulty_send(self: Upstream, model: str, operation: str, body: bytes, request_id: str, **options: Any) -> Any:
    if b"FAULT-UPSTREAM" in body:
        raise RuntimeError("injected fault in the upstream call")
    return await _send(self, model, operation, body, request_id, **options)


def _faulty_take_usage(complete: bytes, record: Any, wants_usage: bool) -> bytes:
    if record.user == "faulty-stream":
        raise RuntimeError("injected fault in the middle of a stream")
    return _take_usage(complete, record, wants_usage)


EventStore.by_code = _faulty_by_code  # type: ignore[method-assign]
Upstream.send = _faulty_send  # type: ignore[method-assign]
streaming._take_usage = _faulty_take_usage
