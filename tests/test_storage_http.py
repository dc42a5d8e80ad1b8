"""The storage client's HTTP (``proxy.storage.http``) against a server that misbehaves.

The invariant: a call returns the whole answer to its own request, or raises
``OSError``; never a short body, never the answer to another call. Each test
runs a loopback server that answers as the test says (in pieces, chunked, cut
short, late, never, in garbage) and counts the connections it was given.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest

from proxy.storage import http
from proxy.storage.http import HttpClient
from tests.support import eventually

Answerer = Callable[[str, asyncio.StreamWriter], Awaitable[None]]


@dataclass
class Server:
    """Reads requests one after another on each connection; ``answer`` writes what the test wants."""

    answer: Answerer
    connections: int = 0
    requests: list[str] = field(default_factory=list)
    port: int = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
                length = next(
                    (
                        int(line.split(":")[1])
                        for line in head.split("\r\n")
                        if line.lower().startswith("content-length")
                    ),
                    0,
                )
                body = await reader.readexactly(length)
                target = head.split(" ")[1]
                self.requests.append(target)
                assert f"content-length: {len(body)}" in head.lower() or not body
                await self.answer(target, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


Serve = Callable[[Answerer], Awaitable[tuple[Server, HttpClient]]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    servers: list[asyncio.Server] = []
    clients: list[HttpClient] = []

    async def start(answer: Answerer) -> tuple[Server, HttpClient]:
        server = Server(answer)
        listening = await asyncio.start_server(server.serve, "127.0.0.1", 0)
        server.port = listening.sockets[0].getsockname()[1]
        servers.append(listening)
        clients.append(HttpClient(f"http://127.0.0.1:{server.port}"))
        return server, clients[-1]

    yield start
    for client in clients:
        await client.aclose()
    for listening in servers:
        listening.close()


def whole(body: bytes, *extra: str) -> bytes:
    headers = "".join(f"{line}\r\n" for line in extra)
    return f'HTTP/1.1 200 OK\r\nETag: W/"1"\r\n{headers}Content-Length: {len(body)}\r\n\r\n'.encode() + body


async def echo(target: str, writer: asyncio.StreamWriter) -> None:
    """The request's own target as the body, a byte at a time: every answer arrives in pieces."""
    for byte in whole(target.encode()):
        writer.write(bytes([byte]))
        await writer.drain()


async def test_answers_in_pieces_are_read_whole_on_one_kept_alive_connection(serve: Serve) -> None:
    server, client = await serve(echo)
    for n in range(5):
        reply = await client.request("PUT", f"/t/{n}", {"if-match": "*"}, b'{"n": %d}' % n)
        assert (reply.status, reply.body, reply.headers["etag"]) == (200, f"/t/{n}".encode(), 'W/"1"')
    assert server.connections == 1


async def test_concurrent_calls_each_get_their_own_answer(serve: Serve) -> None:
    server, client = await serve(echo)
    for _ in range(2):  # the second round reuses the connections the first one opened
        replies = await asyncio.gather(*(client.request("GET", f"/t/{n}", {}) for n in range(20)))
        assert [reply.body for reply in replies] == [f"/t/{n}".encode() for n in range(20)]
    assert server.connections == 20


async def test_a_chunked_answer_is_read_without_its_chunks(serve: Serve) -> None:
    async def chunked(target: str, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 202 Accepted\r\nTransfer-Encoding: chunked\r\n\r\n")
        for piece in (b"--batch\r\n", b"HTTP/1.1 204 No Content\r\n", b"--batch--"):
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            await writer.drain()
        writer.write(b"0\r\n\r\n")

    server, client = await serve(chunked)
    for _ in range(2):
        reply = await client.request("POST", "/$batch", {}, b"x")
        assert (reply.status, reply.body) == (202, b"--batch\r\nHTTP/1.1 204 No Content\r\n--batch--")
    assert server.connections == 1


@pytest.mark.parametrize("cut", ["head", "body", "chunk"])
async def test_an_answer_cut_short_raises_and_is_never_a_short_body(serve: Serve, cut: str) -> None:
    answers = {
        "head": b"HTTP/1.1 200 OK\r\nContent-Len",
        "body": whole(b'{"value": "all of it"}')[:-5],
        "chunk": b"HTTP/1.1 202 Accepted\r\nTransfer-Encoding: chunked\r\n\r\n10\r\nonly half",
    }

    async def cut_short(target: str, writer: asyncio.StreamWriter) -> None:
        writer.write(answers[cut])
        await writer.drain()
        writer.close()

    _, client = await serve(cut_short)
    with pytest.raises(ConnectionError):
        await client.request("GET", "/t", {})


async def test_garbage_raises(serve: Serve) -> None:
    async def garbage(target: str, writer: asyncio.StreamWriter) -> None:
        writer.write(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")

    _, client = await serve(garbage)
    with pytest.raises(OSError):
        await client.request("GET", "/t", {})


@pytest.mark.parametrize("gave_up", ["cancelled", "timed out"])
async def test_a_late_answer_is_nobodys_after_its_caller_gave_up(
    serve: Serve, monkeypatch: pytest.MonkeyPatch, gave_up: str
) -> None:
    """The first call's answer comes after its caller left: the next call, written before that answer
    arrives, must read its own answer, not that one."""
    release = asyncio.Event()

    async def late_first(target: str, writer: asyncio.StreamWriter) -> None:
        if target == "/slow":
            await release.wait()
        writer.write(whole(target.encode()))
        await writer.drain()

    server, client = await serve(late_first)
    await client.request("GET", "/warm", {})  # one connection in the pool, which the slow call takes
    if gave_up == "cancelled":
        waiting = asyncio.create_task(client.request("GET", "/slow", {}))
        await eventually(lambda: asyncio.sleep(0, len(server.requests)), lambda seen: seen == 2, what="the slow call")
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
    else:
        monkeypatch.setattr(http, "READ_SECONDS", 0.2)
        with pytest.raises(TimeoutError):
            await client.request("GET", "/slow", {})
    release.set()  # the late answer goes out once the next call has been written
    replies = [await client.request("GET", f"/next/{n}", {}) for n in range(3)]
    assert [reply.body for reply in replies] == [f"/next/{n}".encode() for n in range(3)]


async def test_a_connection_the_server_closes_or_that_sat_idle_is_not_reused(
    serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def closing(target: str, writer: asyncio.StreamWriter) -> None:
        writer.write(whole(b"bye", "Connection: close") if target == "/close" else whole(b"ok"))
        await writer.drain()

    server, client = await serve(closing)
    await client.request("GET", "/close", {})
    await client.request("GET", "/a", {})
    await client.request("GET", "/b", {})
    assert server.connections == 2  # /a on a new connection, /b on the same as /a
    monkeypatch.setattr(http, "IDLE_SECONDS", 0.0)
    await client.request("GET", "/c", {})
    assert server.connections == 3


@pytest.mark.parametrize("first", ["the request", "the close"])
async def test_a_connection_closed_as_it_opens_fails_at_once(monkeypatch: pytest.MonkeyPatch, first: str) -> None:
    """A server that takes connections and closes them (a relay whose storage is gone): each call fails
    as soon as the close arrives, whether it comes before the request is written or after, never when
    the read timeout runs out."""
    monkeypatch.setattr(http, "READ_SECONDS", 60.0)

    async def close_at_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    listening = await asyncio.start_server(close_at_once, "127.0.0.1", 0)
    client = HttpClient(f"http://127.0.0.1:{listening.sockets[0].getsockname()[1]}")
    if first == "the close":  # the connection is handed over only once its close has been seen
        connect = client._connect

        async def connect_then_see_the_close() -> http._Connection:
            connection = await connect()
            return await eventually(lambda: asyncio.sleep(0, connection), lambda c: not c.open, what="the close")

        monkeypatch.setattr(client, "_connect", connect_then_see_the_close)
    async with asyncio.timeout(10):
        for _ in range(5):
            with pytest.raises(ConnectionError):
                await client.request("PUT", "/t", {}, b"{}")
    await client.aclose()
    listening.close()


async def test_a_refused_connection_raises(serve: Serve) -> None:
    listening = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = listening.sockets[0].getsockname()[1]
    listening.close()
    await listening.wait_closed()
    client = HttpClient(f"http://127.0.0.1:{port}")
    with pytest.raises(OSError):
        await client.request("GET", "/t", {})
    await client.aclose()
