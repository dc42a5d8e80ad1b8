"""Point operations on one table, straight over Table Storage's REST API.

The cap reservation and the settlement are the storage calls on a request's
critical path, so they get a client of their own: a read, an insert and a
replace with ``If-Match``, each one HTTP request on a kept-alive connection
(``proxy.net.http``, a third of aiohttp's CPU per call), signed with
the account key (``STORAGE_CONNECTION_STRING``, Azurite) or carrying a bearer
token for ``https://storage.azure.com`` (managed identity). It spends about a
third of azure-data-tables' CPU per call (0.16 ms against 0.53 ms, measured on
Azurite), which is latency on every capped request. The entity group
transaction that stores each answer's usage before its end is released
(``transact``, a hand-built ``$batch``) goes through it too: azure-data-tables
builds and reads a ``$batch`` with Python's ``email`` package, which cost more
CPU than the rest of a request. Everything else (events, reports, the CLI)
keeps using azure-data-tables.

Results and errors speak azure-core's language, so callers handle them as they
would the SDK's: ``ResourceNotFoundError`` (404), ``ResourceExistsError``
(409), ``ResourceModifiedError`` (412); anything else, including an
unreachable service, is ``StorageUnavailable``.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import os
import re
import time
from collections.abc import Mapping
from email.utils import formatdate
from typing import Any
from urllib.parse import quote, urlsplit

import orjson
from azure.core.credentials_async import AsyncTokenCredential
from azure.core.exceptions import (
    ClientAuthenticationError,
    ResourceExistsError,
    ResourceModifiedError,
    ResourceNotFoundError,
)

from proxy.config.settings import SettingsError
from proxy.config.tokens import BearerToken
from proxy.errors import StorageUnavailable
from proxy.net.http import Pool

STORAGE_SCOPE = "https://storage.azure.com/.default"
API_VERSION = "2019-02-02"
_JSON = "application/json"
_UNAVAILABLE = "Table Storage cannot be reached right now; the request was not let through. Try again shortly."


def parse_connection_string(value: str) -> tuple[str, str, bytes]:
    """(table endpoint, account name, account key) of a storage connection string."""
    parts = dict(part.split("=", 1) for part in value.split(";") if "=" in part)
    account, key = parts.get("AccountName"), parts.get("AccountKey")
    if parts.get("UseDevelopmentStorage") == "true":
        account = account or "devstoreaccount1"
        key = key or "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
        parts.setdefault("TableEndpoint", "http://127.0.0.1:10002/devstoreaccount1")
    if not account or not key:
        raise SettingsError("STORAGE_CONNECTION_STRING needs AccountName and AccountKey, or UseDevelopmentStorage=true")
    protocol = parts.get("DefaultEndpointsProtocol", "https")
    suffix = parts.get("EndpointSuffix", "core.windows.net")
    endpoint = parts.get("TableEndpoint") or f"{protocol}://{account}.table.{suffix}"
    return endpoint.rstrip("/"), account, base64.b64decode(key)


class EntityClient:
    """Get, insert and conditionally replace entities of one table."""

    def __init__(
        self,
        endpoint: str,
        table: str,
        *,
        account_key: tuple[str, bytes] | None = None,
        credential: AsyncTokenCredential | None = None,
    ) -> None:
        if account_key is None and credential is None:
            raise ValueError("an account key or a credential is needed for Table Storage")
        url = urlsplit(endpoint.rstrip("/"))
        self._origin = f"{url.scheme}://{url.netloc}"
        self._table_path = f"{url.path}/{table}"
        self._account_key = account_key
        self._token = None if credential is None else BearerToken(credential, STORAGE_SCOPE)
        self._http: Pool | None = None
        self._date = (0, "")

    @classmethod
    def for_settings(
        cls, connection_string: str | None, endpoint: str | None, table: str, credential: AsyncTokenCredential | None
    ) -> EntityClient:
        if connection_string:
            table_endpoint, account, key = parse_connection_string(connection_string)
            return cls(table_endpoint, table, account_key=(account, key))
        assert endpoint is not None
        return cls(endpoint, table, credential=credential)

    async def get(self, partition: str, row: str) -> tuple[str, dict[str, Any]]:
        """(ETag, properties) of one entity."""
        status, headers, body = await self._send("GET", self._entity_path(partition, row))
        if status != 200:
            raise _error(status, body)
        entity: dict[str, Any] = orjson.loads(body)
        return headers["etag"], entity

    async def insert(self, entity: dict[str, Any], encoded: bytes | None = None) -> str:
        """Insert a new entity (``encoded``: its JSON, when the caller has it already); its ETag."""
        status, headers, body = await self._send("POST", self._table_path, encoded or orjson.dumps(entity))
        if status not in (201, 204):
            raise _error(status, body)
        return headers["etag"]

    async def replace(self, entity: dict[str, Any], etag: str, encoded: bytes | None = None) -> str:
        """Replace an entity if it still has ``etag`` (``encoded``: its JSON, if at hand); its new ETag."""
        path = self._entity_path(entity["PartitionKey"], entity["RowKey"])
        status, headers, body = await self._send("PUT", path, encoded or orjson.dumps(entity), etag)
        if status != 204:
            raise _error(status, body)
        return headers["etag"]

    async def transact(self, operations: list[tuple[str, dict[str, Any], dict[str, Any]]]) -> list[dict[str, Any]]:
        """One entity group transaction (``$batch``): ``("create", entity, {})`` or
        ``("update", entity, {"etag": ...})`` (a replace under that ETag); each one's new ETag. An
        ``"encoded"`` option is the entity's JSON, when the caller has it already.

        Built and read by hand: azure-data-tables does it through Python's ``email``
        package, which cost more CPU than the rest of a request. A refusal raises
        ``TransactionRefused`` with the status and the index of the operation refused.
        """
        batch, changeset = f"batch_{os.urandom(16).hex()}", f"changeset_{os.urandom(16).hex()}"
        parts = [f"--{batch}\r\nContent-Type: multipart/mixed; boundary={changeset}\r\n\r\n".encode()]
        for kind, entity, options in operations:
            if kind == "create":
                line = f"POST {self._origin}{self._table_path} HTTP/1.1\r\n"
            else:
                path = self._entity_path(entity["PartitionKey"], entity["RowKey"])
                line = f"PUT {self._origin}{path} HTTP/1.1\r\nIf-Match: {options['etag']}\r\n"
            parts.append(
                f"--{changeset}\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n\r\n"
                f"{line}Content-Type: {_JSON}\r\nAccept: {_JSON};odata=nometadata\r\n"
                "Prefer: return-no-content\r\nDataServiceVersion: 3.0;\r\n\r\n".encode()
                + (options.get("encoded") or orjson.dumps(entity))
                + b"\r\n"
            )
        parts.append(f"--{changeset}--\r\n--{batch}--\r\n".encode())
        status, _, body = await self._send(
            "POST",
            f"{self._table_path.rsplit('/', 1)[0]}/$batch",
            b"".join(parts),
            content_type=f"multipart/mixed; boundary={batch}",
        )
        if status == 404:
            raise ResourceNotFoundError("Table Storage: no such table")
        if status != 202:
            raise _error(status, body)
        text = body.decode("utf-8", "replace")
        statuses = [int(code) for code in _STATUS_LINE.findall(text)]
        if not statuses:
            raise StorageUnavailable(_UNAVAILABLE)
        if statuses[0] == 404:  # inside the batch: the table does not exist (yet)
            raise ResourceNotFoundError("Table Storage: no such table")
        if statuses[0] >= 300:
            found = _FAILED_INDEX.search(text)
            raise TransactionRefused(statuses[0], int(found.group(1)) if found else -1)
        return [{"etag": etag} for etag in _ETAG_LINE.findall(text)]

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    def _entity_path(self, partition: str, row: str) -> str:
        return f"{self._table_path}(PartitionKey='{_key(partition)}',RowKey='{_key(row)}')"

    async def _send(
        self, method: str, path: str, body: bytes | None = None, etag: str | None = None, content_type: str = _JSON
    ) -> tuple[int, Mapping[str, str], bytes]:
        headers = {
            "x-ms-version": API_VERSION,
            "x-ms-date": self._now(),
            "accept": f"{_JSON};odata=nometadata",
            "dataserviceversion": "3.0",
        }
        if body is not None:
            headers["content-type"] = content_type
            headers["prefer"] = "return-no-content"
        if etag is not None:
            headers["if-match"] = etag
        headers["authorization"] = await self._authorization(method, path, headers)
        if self._http is None:
            self._http = Pool(self._origin)
        for attempt in (1, 2):
            try:
                reply = await self._http.request(method, path, headers, body, fresh=attempt == 2)
                return reply.status, reply.headers, reply.body
            except OSError as exc:
                # Once more on a fresh connection: a pooled one may have been closed by the server, or
                # an answer cut short. A write that did land fails the second time on its ETag (412) or
                # its row (409), which its caller takes as done (proxy.admission.counters).
                if attempt == 2:
                    raise StorageUnavailable(_UNAVAILABLE) from exc
        raise AssertionError("unreachable")

    async def _authorization(self, method: str, path: str, headers: dict[str, str]) -> str:
        if self._account_key is not None:
            account, key = self._account_key
            signed = "\n".join((method, "", headers.get("content-type", ""), headers["x-ms-date"], f"/{account}{path}"))
            signature = base64.b64encode(hmac.new(key, signed.encode(), hashlib.sha256).digest()).decode()
            return f"SharedKey {account}:{signature}"
        assert self._token is not None
        try:
            return await self._token.value()
        except ClientAuthenticationError as exc:
            raise StorageUnavailable("The proxy could not get a token for Table Storage (managed identity).") from exc

    def _now(self) -> str:
        second = int(time.time())
        if self._date[0] != second:
            self._date = (second, formatdate(second, usegmt=True))
        return self._date[1]


@functools.lru_cache(maxsize=4096)
def _key(value: str) -> str:
    """A key as an entity path holds it (quotes doubled, then percent-encoded): the same few thousand
    (events, attendees' days) come back on every request, so each is worked out once."""
    return quote(value.replace("'", "''"), safe="")


class TransactionRefused(Exception):
    """Table Storage refused an entity group transaction: its status and the operation's index (-1: unknown)."""

    def __init__(self, status_code: int, index: int) -> None:
        super().__init__(f"transaction refused with {status_code} at operation {index}")
        self.status_code = status_code
        self.index = index


_STATUS_LINE = re.compile(r"^HTTP/1\.1 (\d{3})", re.MULTILINE)
_ETAG_LINE = re.compile(r"^ETag: (.+?)\r?$", re.MULTILINE | re.IGNORECASE)
_FAILED_INDEX = re.compile(r'"value"\s*:\s*"(\d+):')


def _error(status: int, body: bytes) -> Exception:
    if status == 404:
        return ResourceNotFoundError(f"Table Storage: not found ({body[:200]!r})")
    if status == 409:
        return ResourceExistsError("Table Storage: the entity exists")
    if status == 412:
        return ResourceModifiedError("Table Storage: the entity changed (ETag)")
    return StorageUnavailable(f"Table Storage answered {status}; the request was not let through. Try again shortly.")
