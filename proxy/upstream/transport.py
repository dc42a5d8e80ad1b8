"""Upstream's HTTP client: aiohttp's connection pool, and its answer as the relay reads it.

httpcore's pool checked every pooled connection on each request and release,
about a quarter of the proxy's CPU at 64 concurrent requests, so calls go
through aiohttp's pool (already deployed as azure-core's transport). They go
to it straight: an ``httpx.Request`` built for each call and httpx's response
read through its chain of async generators took 8 % of the proxy's samples at
concurrency 64 on top of aiohttp's own, and without them the proxy's CPU per
request fell by a fifth (``bench/README.md``, item 10).
An answer is an ``UpstreamResponse``: its status, aiohttp's headers as they
came, and its body read whole or relayed as it arrives. Failures are raised
as httpx's transport errors (``ConnectError``, ``ReadTimeout``, ``ReadError``,
...), the exceptions ``proxy.upstream.client`` sorts for failover: aiohttp's
errors are translated here, at the boundary.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping

import aiohttp
import httpx
import yarl


class UpstreamResponse:
    """Upstream's answer: status, headers, and its body, read whole (``aread``) or as it arrives (``aiter_raw``).

    ``backend`` names the backend that answered and ``attempts`` counts the
    sends (``proxy.upstream.client``). Close it (``aclose``) once done: a body
    read to its end returns its connection to the pool, one cut short closes it.
    """

    __slots__ = ("_content", "_response", "attempts", "backend", "headers", "status_code")

    def __init__(
        self,
        status_code: int,
        headers: Mapping[str, str],
        response: aiohttp.ClientResponse | None = None,
        content: bytes | None = None,
    ) -> None:
        self.status_code = status_code
        self.headers = headers
        self.backend = ""
        self.attempts = 1
        self._response = response
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
            assert self._response is not None
            try:
                self._content = await self._response.read()
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise _read_failure(exc) from exc
        return self._content

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        """The body as it arrives, chunk by chunk, as sent (no decoding); only a 200 is relayed so, never
        an answer the failover already read (its 429s and 5xx)."""
        assert self._response is not None
        content = self._response.content
        try:
            async for chunk in content.iter_any():
                yield chunk
        except (aiohttp.ClientError, TimeoutError) as exc:
            if not isinstance(exc, aiohttp.SocketTimeoutError):
                # aiohttp raises a broken connection's error before handing over the bytes it had
                # already received: pass those on first, so a stream cut upstream loses no event.
                # (read_nowait would raise the stored error again; _read_nowait, aiohttp 3.x, does not.)
                received = content._read_nowait(-1)
                if received:
                    yield received
            raise _read_failure(exc) from exc

    async def aclose(self) -> None:
        if self._response is not None:
            self._response.release()


def _read_failure(exc: BaseException) -> httpx.TransportError:
    """aiohttp's failure while reading a body, as the httpx error the failover and the relay sort."""
    if isinstance(exc, aiohttp.SocketTimeoutError):
        return httpx.ReadTimeout(str(exc))
    return httpx.ReadError(str(exc) or type(exc).__name__)


class AiohttpTransport:
    """Sends requests with one pooled ``aiohttp.ClientSession``, made on first use."""

    def __init__(self, *, connect_timeout: float, read_timeout: float, max_connections: int = 1000) -> None:
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout, sock_read=read_timeout)
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    async def send(self, method: str, url: yarl.URL, headers: dict[str, str], body: bytes | None) -> UpstreamResponse:
        """Send a request; its answer once the headers are in, the body still to read or relay."""
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=self._max_connections, keepalive_timeout=60)
            # No proxy lookup from the environment, no decompression: bytes pass through as sent (the proxy
            # asks for identity). No cookie jar: nothing one answer sets rides on another attendee's request
            # (and no jar to search per call).
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=self._timeout,
                auto_decompress=False,
                trust_env=False,
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        try:
            response = await self._session.request(
                method, url, headers=headers, data=body, allow_redirects=False, skip_auto_headers=("User-Agent",)
            )
        except aiohttp.ConnectionTimeoutError as exc:
            raise httpx.ConnectTimeout(str(exc)) from exc
        except aiohttp.SocketTimeoutError as exc:
            raise httpx.ReadTimeout(str(exc)) from exc
        except aiohttp.ClientConnectorError as exc:
            raise httpx.ConnectError(str(exc)) from exc
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise httpx.RemoteProtocolError(str(exc) or type(exc).__name__) from exc
        return UpstreamResponse(response.status, response.headers, response)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
