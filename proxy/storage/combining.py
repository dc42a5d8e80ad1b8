"""Conditional writes to one partition, sent together while one is on its way (group commit across rows).

Admitting a request writes its attendee's day under the day's ETag
(``proxy.admission.counters``); at concurrency, every attendee's write is an
HTTP request of its own, and on Azurite each cost nearly as much CPU as the
proxy's whole request. Every day of an event shares the event's partition, so
writes that wait for their turn can travel in one entity group transaction
(``$batch``, up to 100 rows of a partition), each row still under its own
ETag: the first write to a partition goes out at once and alone, exactly as
before; those that come while it is on its way go together as soon as it is
back. A lone write is never delayed, and the busier storage is, the more each
transaction carries.

A transaction is all or nothing: when Table Storage refuses one row (a lost
race, 412; a row that exists, 409) nothing of it landed; that row's caller
is told (``ResourceModifiedError``, ``ResourceExistsError``: it reads again
and retries, as for a lone write) and the others are sent again. Each caller
hears only about its own row, as if it had written alone.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from azure.core.exceptions import ResourceExistsError, ResourceModifiedError, ResourceNotFoundError

from proxy.errors import StorageUnavailable
from proxy.storage.entities import EntityClient, TransactionRefused

# Writes on their way at once per partition. Measured with make bench's chat at concurrency 64 with caps:
# 391 req/s with 1 against 356 with 2 (smaller transactions, more of them, for the same requests).
IN_FLIGHT = 1
MAX_ROWS = 100  # per entity group transaction
MAX_BYTES = 2 * 1024 * 1024  # Table Storage takes up to 4 MiB per transaction


@dataclass(slots=True)
class _Write:
    entity: dict[str, Any]
    etag: str  # "" inserts
    body: bytes
    done: asyncio.Future[str] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


Told = tuple[_Write, str | Exception]  # a write and what its caller hears: its new ETag, or its error


class Combiner:
    """Replaces (under an ETag) and inserts on one table, combined per partition while one is on its way."""

    def __init__(self, entities: EntityClient, ensure_tables: Callable[[], Awaitable[None]]) -> None:
        self._entities = entities
        self._ensure_tables = ensure_tables  # creates the tables (an empty Azurite): Tables.ensure
        self._waiting: dict[str, list[_Write]] = {}
        self._busy: dict[str, int] = {}  # writes on their way, per partition
        self._sending: set[asyncio.Task[None]] = set()

    async def write(self, entity: dict[str, Any], etag: str) -> str:
        """Replace ``entity`` under ``etag`` (insert it when ``etag`` is empty); its new ETag.

        Raises as the lone write would: ``ResourceModifiedError`` (412) or
        ``ResourceExistsError`` (409) for a lost race, ``StorageUnavailable``.
        """
        partition = entity["PartitionKey"]
        write = _Write(entity, etag, orjson.dumps(entity))
        busy = self._busy.get(partition, 0)
        if busy < IN_FLIGHT:  # room on the way: at once, alone, in the caller's own task
            self._busy[partition] = busy + 1
            try:
                return await self._alone(write)
            finally:
                self._next(partition)
        write.done.add_done_callback(_retrieved)  # a caller gone (shutdown) leaves no "never retrieved" warning
        self._waiting.setdefault(partition, []).append(write)
        # Awaited as it is: a caller that goes away cancels only its own future (``_tell`` passes over it); the
        # transaction is a task of its own and goes on for the others. A shield would cost one more turn of the
        # event loop before every admission goes on.
        return await write.done

    def _send(self, writes: list[_Write], partition: str) -> None:
        task = asyncio.ensure_future(self._transact(writes, partition))
        self._sending.add(task)  # kept until done: the loop holds only a weak reference to a task
        task.add_done_callback(self._sending.discard)

    def _next(self, partition: str) -> None:
        """A write on its way is back: send what waited in its place, or make room."""
        waiting = self._waiting.pop(partition, [])
        if not waiting:
            left = self._busy.pop(partition) - 1
            if left:
                self._busy[partition] = left
            return
        batch: list[_Write] = []
        rows: set[str] = set()
        size = 0
        for write in waiting:
            row = write.entity["RowKey"]
            fits = len(batch) < MAX_ROWS and size + len(write.body) <= MAX_BYTES and row not in rows
            if batch and not fits:
                self._waiting.setdefault(partition, []).append(write)
                continue
            batch.append(write)
            rows.add(row)
            size += len(write.body)
        self._send(batch, partition)

    async def _transact(self, writes: list[_Write], partition: str) -> None:
        told: list[Told] = []
        try:
            while writes:
                writes, told = await self._attempt(writes)
                if writes:  # those refused hear it now, while the others are sent again
                    _tell(told)
        except BaseException as error:  # a bug or a cancelled task: no caller may hang
            told = [(write, StorageUnavailable(str(error) or "Table Storage write failed.")) for write in writes]
            if not isinstance(error, Exception):
                raise
        finally:
            # The next transaction first: its task then runs before the callers this one wakes, each of which goes
            # on with its request (upstream) before yielding, and a done callback would cost one more turn.
            try:
                self._next(partition)
            finally:
                _tell(told)

    async def _attempt(self, writes: list[_Write]) -> tuple[list[_Write], list[Told]]:
        """Send ``writes``; those to send again, and what to tell the callers of the others."""
        if len(writes) == 1:
            write = writes[0]
            try:
                etag = await self._alone(write)
            except Exception as error:  # noqa: BLE001 - handed to its caller, who hears it as from a lone write
                return [], [(write, error)]
            return [], [(write, etag)]
        operations = [
            ("update", w.entity, {"etag": w.etag, "encoded": w.body})
            if w.etag
            else ("create", w.entity, {"encoded": w.body})
            for w in writes
        ]
        try:
            results = await self._entities.transact(operations)
        except (TransactionRefused, ResourceNotFoundError) as refused:
            if not isinstance(refused, TransactionRefused) or not 0 <= refused.index < len(writes):
                # Which row is not said, or a 404 (no table yet, or no such row): each alone, as it would have gone.
                alone = await asyncio.gather(*(self._attempt([write]) for write in writes))
                return [], [answer for _, answers in alone for answer in answers]
            failed = writes[refused.index]
            return [write for write in writes if write is not failed], [(failed, _refusal(refused.status_code))]
        except Exception as error:  # noqa: BLE001 - handed to the callers, as a lone write would raise it
            return [], [(write, error) for write in writes]
        return [], [(write, str(result["etag"])) for write, result in zip(writes, results, strict=True)]

    async def _alone(self, write: _Write) -> str:
        if write.etag:
            return await self._entities.replace(write.entity, write.etag, write.body)
        try:
            return await self._entities.insert(write.entity, write.body)
        except ResourceNotFoundError:  # no table yet: an empty Azurite, say
            await self._ensure_tables()
            return await self._entities.insert(write.entity, write.body)


def _tell(told: list[Told]) -> None:
    """Tell each write's caller its new ETag or its error, unless it went away (its future cancelled)."""
    for write, outcome in told:
        if write.done.done():
            continue
        if isinstance(outcome, Exception):
            write.done.set_exception(outcome)
        else:
            write.done.set_result(outcome)


def _retrieved(done: asyncio.Future[str]) -> None:
    if not done.cancelled():
        done.exception()


def _refusal(status: int) -> Exception:
    if status == 412:
        return ResourceModifiedError("Table Storage: the entity changed (ETag)")
    if status == 409:
        return ResourceExistsError("Table Storage: the entity exists")
    return StorageUnavailable(f"Table Storage answered {status}; the request was not let through. Try again shortly.")
