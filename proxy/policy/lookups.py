"""A per-worker cache of lookups in storage: values kept for a while, concurrent misses sharing one read.

Events by code (``proxy.policy.events``), personal keys and their claims (``proxy.policy.keys``) are
each read on an attendee's request and cached for ``EVENT_CACHE_SECONDS``. When an entry expires, every
request in flight for it misses at once (64 at concurrency 64): they share one lookup instead of each
making its own, which a client leaving does not cancel. A lookup that overlapped a change (``put``,
``drop``) is not kept, so a change this worker made is never overwritten by what was read before it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")
_LIMIT = 100_000


class Lookups:
    """Values by key for a while (``ttl`` of each value), per worker."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._values: dict[Any, tuple[float, Any]] = {}
        self._pending: dict[Any, asyncio.Task[Any]] = {}
        self._changes = 0

    async def get(self, key: Any, load: Callable[[], Awaitable[T]], ttl: Callable[[T], float]) -> T:
        cached = self._values.get(key)
        if cached is not None and cached[0] > self._clock():
            value: T = cached[1]
            return value
        pending = self._pending.get(key)
        if pending is None:
            pending = self._pending[key] = asyncio.ensure_future(self._load(key, load, ttl))
            pending.add_done_callback(lambda done: done.cancelled() or done.exception())
        loaded: T = await asyncio.shield(pending)
        return loaded

    async def _load(self, key: Any, load: Callable[[], Awaitable[T]], ttl: Callable[[T], float]) -> T:
        changes, task = self._changes, asyncio.current_task()
        try:
            value = await load()
        finally:
            if self._pending.get(key) is task:
                del self._pending[key]
        if changes == self._changes:
            self._store(key, value, ttl(value))
        return value

    def put(self, key: Any, value: Any, ttl: float) -> None:
        self._changes += 1
        self._store(key, value, ttl)

    def drop(self, key: Any) -> None:
        self._changes += 1
        self._values.pop(key, None)
        self._pending.pop(key, None)  # a lookup under way may have read what was before: the next one reads anew

    def _store(self, key: Any, value: Any, ttl: float) -> None:
        if len(self._values) > _LIMIT:
            self._values.clear()
        self._values[key] = (self._clock() + ttl, value)
