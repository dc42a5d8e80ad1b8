"""HTTP/1.1 under the calls on a request's path (``proxy.net.http``) against a server that misbehaves.

The invariant: a call returns the whole answer to its own request, or raises
``OSError``; never a short body, never the answer to another call. Each test
runs a loopback server that answers as the test says (in pieces, chunked, cut
short, late, never, in garbage) and counts the connections it was given. The
last ones do it over TLS, as Azure's endpoints are served: with the pool's
default context, which checks the certificate and its name.
"""

from __future__ import annotations

import asyncio
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from proxy.net import http
from proxy.net.http import Pool
from tests.support import eventually

Answerer = Callable[[str, asyncio.StreamWriter], Awaitable[None]]


@dataclass
class Server:
    """Reads requests one after another on each connection; ``answer`` writes what the test wants."""

    answer: Answerer
    connections: int = 0
    open_now: int = 0
    most_open: int = 0
    requests: list[str] = field(default_factory=list)
    port: int = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open_now += 1
        self.most_open = max(self.most_open, self.open_now)
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
            self.open_now -= 1
            writer.close()


Serve = Callable[..., Awaitable[tuple[Server, Pool]]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    servers: list[asyncio.Server] = []
    clients: list[Pool] = []

    async def start(answer: Answerer, **options: float) -> tuple[Server, Pool]:
        server = Server(answer)
        listening = await asyncio.start_server(server.serve, "127.0.0.1", 0)
        server.port = listening.sockets[0].getsockname()[1]
        servers.append(listening)
        clients.append(Pool(f"http://127.0.0.1:{server.port}", **options))  # type: ignore[arg-type]
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
async def test_a_late_answer_is_nobodys_after_its_caller_gave_up(serve: Serve, gave_up: str) -> None:
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
        client.read_seconds = 0.2
        with pytest.raises(TimeoutError):
            await client.request("GET", "/slow", {})
    release.set()  # the late answer goes out once the next call has been written
    replies = [await client.request("GET", f"/next/{n}", {}) for n in range(3)]
    assert [reply.body for reply in replies] == [f"/next/{n}".encode() for n in range(3)]


async def test_a_connection_the_server_closes_or_that_sat_idle_is_not_reused(serve: Serve) -> None:
    async def closing(target: str, writer: asyncio.StreamWriter) -> None:
        writer.write(whole(b"bye", "Connection: close") if target == "/close" else whole(b"ok"))
        await writer.drain()

    server, client = await serve(closing)
    await client.request("GET", "/close", {})
    await client.request("GET", "/a", {})
    await client.request("GET", "/b", {})
    assert server.connections == 2  # /a on a new connection, /b on the same as /a
    client.idle_seconds = 0.0
    await client.request("GET", "/c", {})
    assert server.connections == 3


@pytest.mark.parametrize("first", ["the request", "the close"])
async def test_a_connection_closed_as_it_opens_fails_at_once(monkeypatch: pytest.MonkeyPatch, first: str) -> None:
    """A server that takes connections and closes them (a relay whose storage is gone): each call fails
    as soon as the close arrives, whether it comes before the request is written or after, never when
    the read timeout runs out."""

    async def close_at_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    listening = await asyncio.start_server(close_at_once, "127.0.0.1", 0)
    client = Pool(f"http://127.0.0.1:{listening.sockets[0].getsockname()[1]}", read_seconds=60)
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
    client = Pool(f"http://127.0.0.1:{port}")
    with pytest.raises(OSError):
        await client.request("GET", "/t", {})
    await client.aclose()


async def test_a_body_is_given_as_it_arrives_and_what_came_before_a_cut_before_its_error(serve: Serve) -> None:
    more = asyncio.Event()

    async def two_chunks_then_cut(target: str, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        await writer.drain()
        await more.wait()
        writer.write(b"6\r\nsecond\r\n")  # and no last chunk: the connection closes mid-answer
        await writer.drain()
        writer.close()

    _, client = await serve(two_chunks_then_cut)
    answer = await client.send("POST", "/stream", {}, b"{}")
    chunks = answer.chunks()
    assert await anext(chunks) == b"first"  # before the server has sent the rest
    more.set()
    assert await anext(chunks) == b"second"
    with pytest.raises(ConnectionError):
        await anext(chunks)


async def test_a_body_that_ends_with_its_connection_is_read_whole(serve: Serve) -> None:
    async def until_close(target: str, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nall of ")
        await writer.drain()
        writer.write(b"it")
        writer.close()

    server, client = await serve(until_close)
    for _ in range(2):
        assert (await client.request("GET", "/t", {})).body == b"all of it"
    assert server.connections == 2


async def test_a_reader_that_stops_early_closes_its_connection(serve: Serve) -> None:
    async def long_body(target: str, writer: asyncio.StreamWriter) -> None:
        body = target.encode() * 1000
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body))
        for start in range(0, len(body), 100):
            writer.write(body[start : start + 100])
            await writer.drain()

    server, client = await serve(long_body)
    answer = await client.send("GET", "/first", {})
    chunks = answer.chunks()
    assert (await anext(chunks)).startswith(b"/first")
    await chunks.aclose()  # the relay's client hung up: the rest of this body is nobody's
    assert (await client.request("GET", "/second", {})).body == b"/second" * 1000
    assert server.connections == 2


async def test_a_slow_reader_pauses_the_socket_and_loses_nothing(serve: Serve) -> None:
    size = 8 * 1024 * 1024

    async def big(target: str, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        for start in range(0, size, 65536):
            writer.write(bytes([start // 65536 % 251]) * 65536)
            await writer.drain()

    _, client = await serve(big)
    answer = await client.send("GET", "/big", {})
    connection = answer._connection
    assert connection is not None
    await eventually(lambda: asyncio.sleep(0, connection.paused), bool, what="reading paused")
    assert connection.buffered <= http.HIGH_WATER + 256 * 1024  # one socket read past the mark, at most
    body = await answer.read()
    assert len(body) == size
    assert all(body[start] == start // 65536 % 251 for start in range(0, size, 65536))


async def test_no_more_connections_than_allowed_and_every_call_answered(serve: Serve) -> None:
    release = asyncio.Event()

    async def held(target: str, writer: asyncio.StreamWriter) -> None:
        await release.wait()
        writer.write(whole(target.encode()))
        await writer.drain()

    server, client = await serve(held, max_connections=2)
    calls = [asyncio.create_task(client.request("GET", f"/t/{n}", {})) for n in range(6)]
    await eventually(lambda: asyncio.sleep(0, len(server.requests)), lambda seen: seen == 2, what="two calls")
    release.set()
    replies = await asyncio.gather(*calls)
    assert [reply.body for reply in replies] == [f"/t/{n}".encode() for n in range(6)]
    assert server.most_open <= 2


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """Self-signed certificates, each with its key: one for 127.0.0.1, one for another name."""
    folder = tmp_path_factory.mktemp("net-tls")
    made = {}
    for name, subject in (("loopback", "IP:127.0.0.1"), ("elsewhere", "DNS:elsewhere.invalid")):
        cert, key = folder / f"{name}.pem", folder / f"{name}.key"
        subprocess.run(
            [
                *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", f"/CN={name}"),
                *("-addext", f"subjectAltName={subject}", "-keyout", str(key), "-out", str(cert)),
            ],
            check=True,
            capture_output=True,
        )
        made[name] = (cert, key)
    return made


async def serve_tls(server: Server, cert: tuple[Path, Path]) -> asyncio.Server:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*cert)
    listening = await asyncio.start_server(server.serve, "127.0.0.1", 0, ssl=context)
    server.port = listening.sockets[0].getsockname()[1]
    return listening


async def test_over_tls_answers_are_read_whole_streamed_and_paused_on_kept_alive_connections(
    certificates: dict[str, tuple[Path, Path]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Azure's storage and OpenAI endpoints are https: the pool's default context, which verifies the
    certificate and the name, trusts this one through ``SSL_CERT_FILE`` as it would a public CA's."""
    size = 4 * 1024 * 1024

    async def answers(target: str, writer: asyncio.StreamWriter) -> None:
        if target != "/big":
            await echo(target, writer)
            return
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for start in range(0, size, 65536):
            writer.write(b"10000\r\n" + bytes([start // 65536 % 251]) * 65536 + b"\r\n")
            await writer.drain()
        writer.write(b"0\r\n\r\n")

    monkeypatch.setenv("SSL_CERT_FILE", str(certificates["loopback"][0]))
    server = Server(answers)
    listening = await serve_tls(server, certificates["loopback"])
    client = Pool(f"https://127.0.0.1:{server.port}")
    try:
        for n in range(3):
            assert (await client.request("GET", f"/t/{n}", {})).body == f"/t/{n}".encode()
        answer = await client.send("GET", "/big", {})
        connection = answer._connection
        assert connection is not None
        await eventually(lambda: asyncio.sleep(0, connection.paused), bool, what="reading paused")
        received = [chunk async for chunk in answer.chunks()]
        body = b"".join(received)
        assert len(body) == size and len(received) > 1
        assert all(body[start] == start // 65536 % 251 for start in range(0, size, 65536))
        assert (await client.request("GET", "/after", {})).body == b"/after"
        assert server.connections == 1
    finally:
        await client.aclose()
        listening.close()


@pytest.mark.parametrize("trusted", ["a certificate for another name", "no certificate"])
async def test_over_tls_a_certificate_that_does_not_check_out_is_refused(
    certificates: dict[str, tuple[Path, Path]], monkeypatch: pytest.MonkeyPatch, trusted: str
) -> None:
    if trusted == "a certificate for another name":
        monkeypatch.setenv("SSL_CERT_FILE", str(certificates["elsewhere"][0]))
    server = Server(echo)
    listening = await serve_tls(server, certificates["elsewhere"])
    client = Pool(f"https://127.0.0.1:{server.port}")
    try:
        with pytest.raises(http.ConnectFailed, match=r"CERTIFICATE_VERIFY_FAILED|mismatch"):
            await client.request("GET", "/t", {})
        assert server.requests == []
    finally:
        await client.aclose()
        listening.close()
