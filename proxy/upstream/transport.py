"""An httpx transport over aiohttp's connection pool, for the upstream client.

The proxy speaks httpx to Azure OpenAI, but httpcore's pool checks every
pooled connection on each request and release, which cost about a quarter of
the proxy's CPU at 64 concurrent requests (see ``bench/README.md``). aiohttp,
already deployed as azure-core's transport, keeps a pool that does not. The
rest of the code sees plain httpx requests, responses and exceptions:
aiohttp's errors are translated here, at the boundary.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import httpx
import yarl


class _Body(httpx.AsyncByteStream):
    """The response body as it arrives, chunk by chunk."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.content.iter_any():
                yield chunk
        except aiohttp.SocketTimeoutError as exc:
            raise httpx.ReadTimeout(str(exc)) from exc
        except (aiohttp.ClientError, TimeoutError) as exc:
            # aiohttp raises a broken connection's error before handing over the bytes it had
            # already received: pass those on first, so a stream cut upstream loses no event.
            # (read_nowait would raise the stored error again; _read_nowait, aiohttp 3.x, does not.)
            received = self._response.content._read_nowait(-1)
            if received:
                yield received
            raise httpx.ReadError(str(exc) or type(exc).__name__) from exc

    async def aclose(self) -> None:
        # A body read to the end returns its connection to the pool; one cut short closes it.
        self._response.release()


class AiohttpTransport(httpx.AsyncBaseTransport):
    """Sends httpx requests with one pooled ``aiohttp.ClientSession``, made on first use."""

    def __init__(self, *, connect_timeout: float, read_timeout: float, max_connections: int = 1000) -> None:
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout, sock_read=read_timeout)
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=self._max_connections, keepalive_timeout=60)
            # No proxy lookup from the environment, no decompression: bytes pass through as sent. No cookie
            # jar: nothing one answer sets rides on another attendee's request (and no jar to search per call).
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=self._timeout,
                auto_decompress=False,
                trust_env=False,
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        headers = [(name.decode("latin-1"), value.decode("latin-1")) for name, value in request.headers.raw]
        try:
            response = await self._session.request(
                request.method,
                yarl.URL(str(request.url), encoded=True),  # httpx's URL is encoded already: not parsed again
                headers=headers,
                data=request.content,
                allow_redirects=False,
                skip_auto_headers=("User-Agent",),
            )
        except aiohttp.ConnectionTimeoutError as exc:
            raise httpx.ConnectTimeout(str(exc)) from exc
        except aiohttp.SocketTimeoutError as exc:
            raise httpx.ReadTimeout(str(exc)) from exc
        except aiohttp.ClientConnectorError as exc:
            raise httpx.ConnectError(str(exc)) from exc
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise httpx.RemoteProtocolError(str(exc) or type(exc).__name__) from exc
        return httpx.Response(
            response.status, headers=list(response.raw_headers), stream=_Body(response), request=request
        )

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
