"""HTTP/1.1 over kept-alive connections: the client under the calls on a request's path.

A capped request waits on three calls, one after the other: its reservation
in Table Storage, Azure OpenAI, its settlement. What the client spends on each
is latency. aiohttp spent 0.33 ms of CPU and 0.93 ms of wall time on a
conditional replace against Azurite; this client, a ``Protocol`` over a pooled
connection with httptools' parser (llhttp, Node.js's parser), 0.11 ms and
0.58 ms (2,000 calls each, one after another, on this project's 2-core
machine).

It does what those calls need and no more: one request at a time per
connection (no pipelining), a request body given whole, the answer's head
awaited and its body read whole or chunk by chunk as it arrives (with
``Content-Length``, chunked, or until the connection closes; the parser undoes
the chunks), reading paused while more than ``HIGH_WATER`` bytes wait for a
slow reader, connections reused last in first out, at most
``max_connections`` open at once, TLS for ``https``.

Everything that can go wrong on the way is an ``OSError``: ``ConnectFailed``
(refused, unreachable) and ``ConnectTimedOut`` (longer than
``connect_seconds``) before the request is written; after it, a
``ConnectionError`` (reset, closed before the answer ended, an answer that is
not HTTP/1.1) or a ``TimeoutError`` (no byte for ``read_seconds``). The connection it happened on is closed.
So is one whose caller gave up (cancelled) or stopped reading before the end:
what is still on its way would otherwise be read as the next call's answer.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from collections.abc import AsyncGenerator
from urllib.parse import urlsplit

import httptools
from multidict import CIMultiDict

HIGH_WATER = 256 * 1024  # bytes of body waiting for their reader before the socket is no longer read


class ConnectFailed(ConnectionError):
    """No connection could be made (refused, unreachable, TLS refused)."""


class ConnectTimedOut(TimeoutError):
    """No connection within ``connect_seconds``."""


class Reply:
    """An answer read whole: status, headers (looked up in any case) and body."""

    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, headers: CIMultiDict[str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body


class _Connection(asyncio.Protocol):
    """One connection and the exchange under way on it: the answer's head, then its body as it comes."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.open = True
        self.idle_since = 0.0
        self.asked = False  # a request is written and its answer is not complete
        self.status = 0
        self.headers: CIMultiDict[str] = CIMultiDict()
        self.head = False
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.paused = False
        self.complete = False
        self.reusable = False
        self.until_close = False
        self.error: OSError | None = None
        self.waiter: asyncio.Future[None] | None = None

    def ask(self, request: bytes) -> None:
        """Write a request; what is known of the last answer is forgotten."""
        self.asked, self.head, self.complete, self.reusable, self.until_close = True, False, False, False, False
        self.error = None
        self.headers = CIMultiDict()
        if self.chunks:  # the last answer's reader stopped at its last bytes
            self.take()
        assert self.transport is not None
        self.transport.write(request)

    # What the socket brings.

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if not self.asked:  # nothing asked: the server speaks out of turn
            self.close()
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(ConnectionError(f"the answer is not HTTP/1.1 ({exc})"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.open = False
        if self.asked:
            if self.until_close:  # its body was to end with the connection: it has
                self.asked, self.complete = False, True
                self._wake()
            else:
                self._fail(ConnectionError("the connection closed before its answer ended"))
        self.pool._closed()

    # What the parser finds in it (httptools calls these with whole names and values).

    def on_message_begin(self) -> None:
        if self.complete:  # a second answer to one request: the connection cannot be trusted
            self.close()

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.add(name.decode("latin-1"), value.decode("latin-1"))

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.head = True
        self.until_close = (
            "content-length" not in self.headers
            and "transfer-encoding" not in self.headers
            and self.status not in (204, 304)
        )
        self._wake()

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > HIGH_WATER and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        self.asked, self.complete, self.until_close = False, True, False
        self.reusable = self.parser.should_keep_alive()
        self._wake()

    # What the reader does.

    async def wait(self, seconds: float) -> None:
        """Until the parser or the socket has news, raising what went wrong; ``TimeoutError`` after ``seconds``.
        Callers look at what came before they wait again, so bytes that came before a failure go first."""
        if self.error is not None:
            raise self.error
        loop = asyncio.get_running_loop()
        waiter = self.waiter = loop.create_future()
        timer = loop.call_later(seconds, self._time_out, waiter, seconds)
        try:
            await waiter
        finally:
            timer.cancel()

    async def next_chunk(self) -> bytes | None:
        """The body bytes that have come, waiting for some if none has; ``None`` once the body is whole."""
        while not self.chunks:
            if self.complete:
                return None
            await self.wait(self.pool.read_seconds)
        return self.take()

    def take(self) -> bytes:
        """The body bytes that have come, reading the socket again if it was paused for them."""
        body = self.chunks.popleft() if len(self.chunks) == 1 else b"".join(self.chunks)
        self.chunks.clear()
        self.buffered = 0
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()
        return body

    def close(self) -> None:
        self.open = False
        if self.transport is not None:
            self.transport.close()

    def _time_out(self, waiter: asyncio.Future[None], seconds: float) -> None:
        if not waiter.done():
            waiter.set_exception(TimeoutError(f"no answer within {seconds:g} s"))

    def _fail(self, error: OSError) -> None:
        if self.error is None:
            self.error = error
        self._wake()

    def _wake(self) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class Answer:
    """An answer whose head is in: ``status`` and ``headers`` now, the body to ``read`` whole or take in
    ``chunks``. ``close`` it when done: read to its end, its connection serves the next call; else it is closed."""

    __slots__ = ("_connection", "headers", "status")

    def __init__(self, connection: _Connection) -> None:
        self._connection: _Connection | None = connection
        self.status = connection.status
        self.headers = connection.headers

    async def read(self) -> bytes:
        connection = self._live()
        parts = []
        try:
            while (chunk := await connection.next_chunk()) is not None:
                parts.append(chunk)  # taken as they come: a paused socket is read again
        finally:
            self.close()
        return b"".join(parts)

    async def chunks(self) -> AsyncGenerator[bytes, None]:
        """The body as it arrives; bytes that came before a failure are given before it is raised."""
        connection = self._live()
        try:
            while (chunk := await connection.next_chunk()) is not None:
                yield chunk
        finally:
            self.close()

    def close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.pool._release(connection)

    def _live(self) -> _Connection:
        if self._connection is None:
            raise RuntimeError("this answer was read or closed already")
        return self._connection


class Pool:
    """Requests to one origin (``scheme://host[:port]``) over its kept-alive connections."""

    def __init__(
        self,
        origin: str,
        *,
        connect_seconds: float = 5.0,
        read_seconds: float = 10.0,
        idle_seconds: float = 15.0,
        max_connections: int = 100,
    ) -> None:
        url = urlsplit(origin)
        self._host_line = f"Host: {url.netloc}\r\n"
        self._host = url.hostname or "localhost"
        self._port = url.port or (443 if url.scheme == "https" else 80)
        self._ssl = ssl.create_default_context() if url.scheme == "https" else None
        self.connect_seconds = connect_seconds
        self.read_seconds = read_seconds
        self.idle_seconds = idle_seconds
        self.max_connections = max_connections
        self._idle: deque[_Connection] = deque()
        self._open = 0
        self._waiting: deque[asyncio.Future[None]] = deque()
        self._shut = False

    async def send(
        self, method: str, target: str, headers: dict[str, str], body: bytes | None = None, *, fresh: bool = False
    ) -> Answer:
        """Write a request (``target``: path and query, encoded) and return its answer once its head is in.
        ``fresh``: on a new connection (a retry: the pooled ones may all be dead after a restart)."""
        connection = (None if fresh else self._pooled()) or await self._connect()
        if not connection.open:  # closed by the server while connecting: nothing would ever answer
            raise ConnectionError("the connection closed before the request was written")
        lines = [f"{method} {target} HTTP/1.1\r\n", self._host_line]
        lines.extend(f"{name}: {value}\r\n" for name, value in headers.items())
        if body is not None:
            lines.append(f"Content-Length: {len(body)}\r\n")
        lines.append("\r\n")
        head = "".join(lines).encode("latin-1")
        connection.ask(head + body if body else head)
        try:
            while not connection.head:
                await connection.wait(self.read_seconds)
        except BaseException:  # failed, timed out or given up: whatever still comes is nobody's answer
            connection.close()
            raise
        return Answer(connection)

    async def request(
        self, method: str, target: str, headers: dict[str, str], body: bytes | None = None, *, fresh: bool = False
    ) -> Reply:
        """``send``, and the answer read whole."""
        answer = await self.send(method, target, headers, body, fresh=fresh)
        return Reply(answer.status, answer.headers, await answer.read())

    async def aclose(self) -> None:
        self._shut = True
        while self._idle:
            self._idle.pop().close()

    def _pooled(self) -> _Connection | None:
        now = time.monotonic()
        while self._idle:
            connection = self._idle.pop()
            if connection.open and now - connection.idle_since < self.idle_seconds:
                return connection
            connection.close()  # servers close theirs after a while: one idle this long may be half gone
        return None

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        while self._open >= self.max_connections:
            waiter = loop.create_future()
            self._waiting.append(waiter)
            try:
                await waiter
            except BaseException:
                if waiter.done() and not waiter.cancelled():  # woken, then given up: the place goes on
                    self._next()
                raise
        self._open += 1
        made: list[_Connection] = []

        def protocol() -> _Connection:
            made.append(_Connection(self))
            return made[0]

        try:
            await asyncio.wait_for(
                loop.create_connection(
                    protocol, self._host, self._port, ssl=self._ssl, server_hostname=self._host if self._ssl else None
                ),
                self.connect_seconds,
            )
        except BaseException as exc:
            if not made or made[0].transport is None:  # else its connection_lost gives its place back
                self._closed()
            if isinstance(exc, TimeoutError):
                where = f"{self._host}:{self._port}"
                raise ConnectTimedOut(f"no connection to {where} within {self.connect_seconds:g} s") from exc
            if isinstance(exc, OSError):
                raise ConnectFailed(f"no connection to {self._host}:{self._port} ({exc})") from exc
            raise
        return made[0]

    def _release(self, connection: _Connection) -> None:
        if self._shut or self._waiting or not connection.reusable or not connection.open:
            connection.close()  # a caller waits for a place: this connection's close makes one
            return
        connection.idle_since = time.monotonic()
        self._idle.append(connection)

    def _closed(self) -> None:
        """A connection is gone (or was never made): its place goes to the first caller waiting for one."""
        self._open -= 1
        self._next()

    def _next(self) -> None:
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
