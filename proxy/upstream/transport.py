r"""Upstream's HTTP client: a pool of kept-alive connections per origin, and its answer as the relay reads it.

httpcore's pool checked every pooled connection on each request and release,
about a quarter of the proxy's CPU at 64 concurrent requests; aiohttp's
request cost 12.4 % of the proxy's samples at concurrency 64 and, at
concurrency 1, a third of a millisecond on the upstream call alone. Calls now
go through ``proxy.net.http``, which the storage calls on the same path use too
(``bench/README.md``, items 10 and 15).
An answer is an ``UpstreamResponse``: its status, headers as they came, and
its body read whole or relayed as it arrives. Failures are raised as httpx's
transport errors (``ConnectError``, ``ConnectTimeout``, ``ReadTimeout``,
``ReadError``, ``RemoteProtocolError``), the exceptions
``proxy.upstream.client`` sorts for failover: the client's ``OSError``\ s are
translated here, at the boundary.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping

import httpx
import yarl

from proxy.net.http import Answer, ConnectFailed, ConnectTimedOut, Pool

IDLE_SECONDS = 60.0  # a connection unused longer is not reused


class UpstreamResponse:
    """Upstream's answer: status, headers, and its body, read whole (``aread``) or as it arrives (``aiter_raw``).

    ``backend`` names the backend that answered and ``attempts`` counts the
    sends (``proxy.upstream.client``). Close it (``aclose``) once done: a body
    read to its end returns its connection to the pool, one cut short closes it.
    """

    __slots__ = ("_answer", "_content", "attempts", "backend", "headers", "status_code")

    def __init__(
        self,
        status_code: int,
        headers: Mapping[str, str],
        answer: Answer | None = None,
        content: bytes | None = None,
    ) -> None:
        self.status_code = status_code
        self.headers = headers
        self.backend = ""
        self.attempts = 1
        self._answer = answer
        self._content = content

    @property
    def content(self) -> bytes:
        """The body ``aread`` returned."""
        if self._content is None:
            raise RuntimeError("the upstream answer was not read")
        return self._content

    async def aread(self) -> bytes:
        """The whole body (read once; the connection goes back to the pool)."""
        if self._content is None:
            assert self._answer is not None
            try:
                self._content = await self._answer.read()
            except OSError as exc:
                raise _read_failure(exc) from exc
        return self._content

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        """The body as it arrives, chunk by chunk, as sent (no decoding); only a 200 is relayed so, never
        an answer the failover already read (its 429s and 5xx). The bytes that came before a broken
        connection are passed on before its error, so a stream cut upstream loses no event."""
        assert self._answer is not None
        try:
            async for chunk in self._answer.chunks():
                yield chunk
        except OSError as exc:
            raise _read_failure(exc) from exc

    async def aclose(self) -> None:
        if self._answer is not None:
            self._answer.close()


def _read_failure(exc: OSError) -> httpx.TransportError:
    """A failure while reading a body, as the httpx error the failover and the relay sort."""
    if isinstance(exc, TimeoutError):
        return httpx.ReadTimeout(str(exc))
    return httpx.ReadError(str(exc) or type(exc).__name__)


class HttpTransport:
    """Sends requests over a ``proxy.net.http.Pool`` per origin, made on first use."""

    def __init__(self, *, connect_timeout: float, read_timeout: float, max_connections: int = 1000) -> None:
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._max_connections = max_connections
        self._pools: dict[tuple[str, str | None, int | None], Pool] = {}

    async def send(self, method: str, url: yarl.URL, headers: dict[str, str], body: bytes | None) -> UpstreamResponse:
        """Send a request; its answer once the headers are in, the body still to read or relay. The
        bytes pass through as sent (the proxy asks for identity), and no cookie is kept."""
        key = (url.scheme, url.raw_host, url.port)
        pool = self._pools.get(key)
        if pool is None:
            pool = self._pools[key] = Pool(
                f"{url.scheme}://{url.raw_authority}",
                connect_seconds=self._connect_timeout,
                read_seconds=self._read_timeout,
                idle_seconds=IDLE_SECONDS,
                max_connections=self._max_connections,
            )
        try:
            answer = await pool.send(method, url.raw_path_qs, headers, body)
        except ConnectTimedOut as exc:
            raise httpx.ConnectTimeout(str(exc)) from exc
        except ConnectFailed as exc:
            raise httpx.ConnectError(str(exc)) from exc
        except TimeoutError as exc:
            raise httpx.ReadTimeout(str(exc)) from exc
        except OSError as exc:
            raise httpx.RemoteProtocolError(str(exc) or type(exc).__name__) from exc
        return UpstreamResponse(answer.status, answer.headers, answer)

    async def aclose(self) -> None:
        pools, self._pools = list(self._pools.values()), {}
        for pool in pools:
            await pool.aclose()
