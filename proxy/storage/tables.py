"""Table Storage: the table names, the clients, and the translation of its errors.

Azure uses ``STORAGE_TABLE_ENDPOINT`` with a managed identity; local runs use
``STORAGE_CONNECTION_STRING`` (Azurite). Clients are made once per worker.
No storage URL is ever logged (a row key can be a code's keyed hash).
Every storage failure that is not a conflict or a miss becomes
``StorageUnavailable``: the proxy fails closed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterable, AsyncIterator, Awaitable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from typing import Any, TypeVar

from azure.core.credentials_async import AsyncTokenCredential
from azure.core.exceptions import (
    AzureError,
    ResourceExistsError,
    ResourceModifiedError,
    ResourceNotFoundError,
)
from azure.data.tables import TableTransactionError
from azure.data.tables.aio import TableClient

from proxy.config.settings import Settings
from proxy.errors import StorageRefused, StorageUnavailable
from proxy.storage.entities import EntityClient, TransactionRefused

EVENTS_TABLE = "proxyevents"
USAGE_TABLE = "proxyusage"
REQUESTS_TABLE = "proxyrequests"
TABLE_NAMES = (EVENTS_TABLE, USAGE_TABLE, REQUESTS_TABLE)

T = TypeVar("T")
TRANSACT_ATTEMPTS = 3

# azure-core logs every request's URL at INFO (headers at DEBUG), and a Table Storage URL names the row: an
# event's index row is named by its code's keyed hash. The storage clients log to a logger of their own, off
# and outside logging's hierarchy, so that no logging configuration (the Functions worker's, DEBUG) shows them.
_NO_REQUEST_LOG = logging.Logger("proxy.storage.requests")
_NO_REQUEST_LOG.disabled = True

# Fail fast when storage is down: a request waits at most a few seconds before 503.
_CLIENT_OPTIONS: dict[str, Any] = {
    "logger": _NO_REQUEST_LOG,
    "retry_total": 2,
    "retry_backoff_factor": 0.2,
    "connection_timeout": 5,
    "read_timeout": 10,
    # No proxy lookup from the environment: aiohttp would do it in a thread on every call.
    "use_env_settings": False,
}


@dataclass(frozen=True, slots=True)
class Tables:
    """The three tables the proxy uses, as async clients."""

    events: TableClient
    usage: TableClient
    requests: TableClient
    # The cap reservation's lean client for ``proxyusage`` (see ``proxy.storage.entities``).
    usage_entities: EntityClient

    @classmethod
    def create(cls, settings: Settings, credential: AsyncTokenCredential | None) -> Tables:
        def client(name: str) -> TableClient:
            if settings.storage_connection_string:
                return TableClient.from_connection_string(settings.storage_connection_string, name, **_CLIENT_OPTIONS)
            assert settings.table_endpoint and credential is not None
            return TableClient(settings.table_endpoint, name, credential=credential, **_CLIENT_OPTIONS)

        entities = EntityClient.for_settings(
            settings.storage_connection_string, settings.table_endpoint, USAGE_TABLE, credential
        )
        return cls(client(EVENTS_TABLE), client(USAGE_TABLE), client(REQUESTS_TABLE), entities)

    async def ensure(self) -> None:
        """Create the tables if missing (Bicep creates them in Azure)."""
        for table in (self.events, self.usage, self.requests):
            with suppress(ResourceExistsError):
                await guarded(table.create_table())

    async def insert(self, table: TableClient, entity: dict[str, Any]) -> dict[str, Any]:
        """Insert an entity; the first insert into fresh storage creates the tables."""
        try:
            return dict(await guarded(table.create_entity(entity)))
        except ResourceNotFoundError:  # TableNotFound: an empty Azurite, say
            await self.ensure()
            return dict(await guarded(table.create_entity(entity)))

    async def transact(self, operations: list[tuple[str, Any, dict[str, Any]]]) -> list[dict[str, Any]]:
        """One entity group transaction on ``proxyusage`` (``EntityClient.transact``); the new ETags.

        A pooled connection the server had closed is tried again (twice), and a
        missing table is created. Retrying is safe for callers whose transactions
        fail a second time on an ETag (412) or an existing row (409): they raise
        ``TransactionRefused`` for the caller to handle; a write refused as invalid
        (400, 413) is ``StorageRefused``, not tried again; other refusals and
        outages are ``StorageUnavailable``.
        """
        for attempt in range(1, TRANSACT_ATTEMPTS + 1):
            try:
                try:
                    return await self.usage_entities.transact(operations)
                except ResourceNotFoundError:
                    await self.ensure()  # no table yet: an empty Azurite, say
                    return await self.usage_entities.transact(operations)
            except TransactionRefused as error:
                if error.status_code in (409, 412):
                    raise
                if error.status_code in (400, 413):  # invalid, or too large: the same again would be too
                    message = f"Table Storage refused a write as invalid ({error.status_code})."
                    raise StorageRefused(message, error.status_code) from error
                raise StorageUnavailable("Table Storage refused a write; try again shortly.") from error
            except StorageUnavailable:
                if attempt == TRANSACT_ATTEMPTS:
                    raise
                await asyncio.sleep(0.05 * attempt)
        raise AssertionError("unreachable")

    async def submit(self, table: TableClient, operations: list[tuple[Any, ...]]) -> list[dict[str, Any]]:
        """One entity group transaction through azure-data-tables (organizer writes, off the hot path); each
        operation's metadata (its new ``etag``). Errors as ``guarded``: an operation refused for its ETag is
        ``ResourceModifiedError``, a missing row ``ResourceNotFoundError``, an existing one ``ResourceExistsError``;
        a missing table is created once."""
        for attempt in (1, 2):
            try:
                return [dict(metadata) for metadata in await table.submit_transaction(operations)]
            except TableTransactionError as error:
                code = str(getattr(error, "error_code", "") or "")
                if error.status_code == 404 and "TableNotFound" in code and attempt == 1:
                    await self.ensure()
                    continue
                failed = {412: ResourceModifiedError, 404: ResourceNotFoundError, 409: ResourceExistsError}
                if error.status_code in failed:
                    message = f"Table Storage refused the transaction ({error.status_code})."
                    raise failed[error.status_code](message) from error
                raise StorageUnavailable("Table Storage refused a write; try again shortly.") from error
            except ResourceNotFoundError:
                if attempt == 2:
                    raise
                await self.ensure()  # the table itself is missing: an empty Azurite, say
            except (ResourceExistsError, ResourceModifiedError):
                raise
            except (AzureError, OSError) as exc:
                raise StorageUnavailable(
                    "Table Storage cannot be reached right now; the change was not made. Try again shortly."
                ) from exc
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        for table in (self.events, self.usage, self.requests):
            await table.close()
        await self.usage_entities.aclose()


async def guarded(operation: Awaitable[T]) -> T:
    """Await a storage call; outages become ``StorageUnavailable``.

    Misses, conflicts and ETag mismatches pass through: callers handle them.
    """
    try:
        return await operation
    except (ResourceNotFoundError, ResourceExistsError, ResourceModifiedError):
        raise
    except (AzureError, OSError) as exc:
        raise StorageUnavailable(
            "Table Storage cannot be reached right now; the request was not let through. Try again shortly."
        ) from exc


async def gathered(entities: AsyncIterable[T]) -> list[T]:
    """Collect a query's results; outages become ``StorageUnavailable`` as in ``guarded``."""

    async def collect() -> list[T]:
        return [entity async for entity in entities]

    return await guarded(collect())


@asynccontextmanager
async def opened(settings: Settings, credential: AsyncTokenCredential | None) -> AsyncIterator[Tables]:
    """Tables for a short-lived process such as the CLI."""
    tables = Tables.create(settings, credential)
    try:
        yield tables
    finally:
        await tables.aclose()
