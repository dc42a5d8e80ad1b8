"""A lean HTTP/1.1 client for the storage calls on a request's path.

Every capped request waits on two of them (its reservation and its
settlement), one after the other, so what the client spends is latency. An
aiohttp session spent 0.33 ms of CPU on a conditional replace against
Azurite, and 0.93 ms of wall time; this client, a ``Protocol`` over a
pooled connection with httptools' parser (llhttp, the parser Node.js uses),
spends 0.11 ms and 0.58 ms on the same call (measured one after another,
2,000 calls each, on this project's 2-core machine).

It does what those calls need and no more: one request at a time per
connection (no pipelining), a body given whole, the answer read whole
(``Content-Length`` or chunked: the parser undoes the chunks), connections kept
alive and reused last-in first-out, TLS for ``https``. Everything that can go
wrong on the way is an ``OSError`` (refused, reset, closed before the answer
ended, an answer that is not HTTP, no answer within ``READ_SECONDS``), and
the connection it happened on is never used again. So is one whose caller was
cancelled while it waited: the answer still on its way would otherwise be read
as the next call's.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from urllib.parse import urlsplit

import httptools

CONNECT_SECONDS = 5.0
READ_SECONDS = 10.0  # from the request written to the answer read whole
IDLE_SECONDS = 15.0  # a connection idle longer is not reused: servers close theirs after a while (Azurite: 60 s)
MAX_IDLE = 64


class Reply:
    """Status, headers (names in lower case) and body of one answer."""

    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body


class _Connection(asyncio.Protocol):
    """One connection: writes a request, parses its answer, and says whether it may carry another."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future[Reply] | None = None
        self.open = True
        self.reusable = False
        self.idle_since = 0.0
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.waiter is None:  # nothing asked: the server speaks out of turn
            self.close()
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(ConnectionError(f"storage answered something that is not HTTP/1.1 ({exc})"))

    def on_message_begin(self) -> None:
        if self.waiter is None:  # a second answer to one request: the connection cannot be trusted
            self.close()

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        waiter, self.waiter = self.waiter, None
        self.reusable = self.parser.should_keep_alive()
        answer = Reply(self.parser.get_status_code(), self._headers, b"".join(self._body))
        self._headers, self._body = {}, []
        if waiter is not None and not waiter.done():
            waiter.set_result(answer)

    def connection_lost(self, exc: Exception | None) -> None:
        self.open = False
        self._fail(ConnectionError("the storage connection closed before its answer ended"))

    def time_out(self) -> None:
        self._fail(TimeoutError(f"storage did not answer within {READ_SECONDS:g} s"))
        self.close()

    def close(self) -> None:
        self.open = False
        if self.transport is not None:
            self.transport.close()

    def _fail(self, error: OSError) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)


class HttpClient:
    """Requests to one origin (``scheme://host[:port]``) over a pool of kept-alive connections."""

    def __init__(self, origin: str) -> None:
        url = urlsplit(origin)
        self._host_header = url.netloc
        self._host = url.hostname or "localhost"
        self._port = url.port or (443 if url.scheme == "https" else 80)
        self._ssl = ssl.create_default_context() if url.scheme == "https" else None
        self._idle: deque[_Connection] = deque()
        self._closed = False

    async def request(
        self, method: str, target: str, headers: dict[str, str], body: bytes | None = None, *, fresh: bool = False
    ) -> Reply:
        """One request (``target``: path and query, already encoded); its answer, read whole. ``fresh``: on a
        new connection (a retry: the pooled ones may all have been closed by a server that restarted)."""
        connection = (None if fresh else self._idle_connection()) or await self._connect()
        if not connection.open:  # closed by the server while connecting: nothing would ever answer
            raise ConnectionError("the storage connection closed before the request was sent")
        lines = [f"{method} {target} HTTP/1.1\r\nHost: {self._host_header}\r\n"]
        lines.extend(f"{name}: {value}\r\n" for name, value in headers.items())
        if body is not None:
            lines.append(f"Content-Length: {len(body)}\r\n")
        lines.append("\r\n")
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[Reply] = loop.create_future()
        connection.waiter = waiter
        connection.reusable = False
        assert connection.transport is not None
        head = "".join(lines).encode("latin-1")
        connection.transport.write(head + body if body else head)
        timer = loop.call_later(READ_SECONDS, connection.time_out)
        try:
            answer = await waiter
        except BaseException:  # failed, timed out or cancelled: whatever is still coming is nobody's answer
            connection.close()
            raise
        finally:
            timer.cancel()
        self._release(connection)
        return answer

    async def aclose(self) -> None:
        self._closed = True
        while self._idle:
            self._idle.pop().close()

    def _idle_connection(self) -> _Connection | None:
        now = time.monotonic()
        while self._idle:
            connection = self._idle.pop()
            if connection.open and now - connection.idle_since < IDLE_SECONDS:
                return connection
            connection.close()
        return None

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        _, connection = await asyncio.wait_for(
            loop.create_connection(
                _Connection, self._host, self._port, ssl=self._ssl, server_hostname=self._host if self._ssl else None
            ),
            CONNECT_SECONDS,
        )
        return connection

    def _release(self, connection: _Connection) -> None:
        if self._closed or not connection.reusable or not connection.open or len(self._idle) >= MAX_IDLE:
            connection.close()
            return
        connection.idle_since = time.monotonic()
        self._idle.append(connection)
