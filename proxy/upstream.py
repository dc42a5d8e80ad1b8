"""Upstream Azure OpenAI: the pooled HTTP client, its credential, and the call.

One ``httpx.AsyncClient`` per worker, over aiohttp's pool (``proxy.transport``). Upstream is called with a bearer token
from ``azure-identity`` (managed identity in Azure, developer credentials
locally), or with ``AZURE_OPENAI_API_KEY`` when that is set; the token is
cached by ``proxy.tokens``. Client headers are never forwarded:
the attendee's credential holds the event code.

Transport failures become ``UpstreamError`` (502) after retries, timeouts
become ``UpstreamTimeout`` (504); upstream's own error answers pass through
with their status and body.
"""

from __future__ import annotations

import asyncio

import httpx
from azure.core.credentials_async import AsyncTokenCredential
from azure.core.exceptions import ClientAuthenticationError

from proxy.errors import UpstreamError, UpstreamTimeout
from proxy.settings import Settings
from proxy.tokens import BearerToken
from proxy.transport import AiohttpTransport

SCOPE = "https://cognitiveservices.azure.com/.default"
CONNECT_ATTEMPTS = 3
RETRY_STATUSES = frozenset({502, 503, 504})


class UpstreamAuth:
    """The header that authenticates the proxy to Azure OpenAI: its key, or a bearer token."""

    def __init__(self, api_key: str | None, credential: AsyncTokenCredential | None) -> None:
        if api_key is None and credential is None:
            raise ValueError("either an API key or a credential is needed for upstream")
        self._api_key = api_key
        self._token = None if credential is None else BearerToken(credential, SCOPE)

    async def header(self) -> tuple[str, str]:
        if self._api_key is not None:
            return ("api-key", self._api_key)
        assert self._token is not None
        try:
            return ("authorization", await self._token.value())
        except ClientAuthenticationError as exc:
            raise UpstreamError(
                "The proxy could not get a token for Azure OpenAI (managed identity); "
                "the operator should check the app's identity and role assignment."
            ) from exc


class Upstream:
    """Sends a prepared body to a deployment and returns the (streaming) response."""

    def __init__(self, settings: Settings, client: httpx.AsyncClient, auth: UpstreamAuth) -> None:
        self._base = f"{settings.openai_endpoint}/openai/deployments/"
        self._v1 = f"{settings.openai_endpoint}/openai/v1/"
        self._query = f"?api-version={settings.openai_api_version}"
        self._client = client
        self._auth = auth

    @staticmethod
    def client(settings: Settings) -> httpx.AsyncClient:
        transport = AiohttpTransport(connect_timeout=10.0, read_timeout=settings.upstream_timeout_seconds)
        return httpx.AsyncClient(transport=transport)

    async def send(self, deployment: str, operation: str, body: bytes, request_id: str) -> httpx.Response:
        """POST to upstream; the caller reads or streams the response and closes it."""
        url = f"{self._base}{deployment}/{operation}{self._query}"
        return await self._send("POST", url, body, request_id, deployment)

    async def send_v1(
        self,
        method: str,
        path: str,
        request_id: str,
        *,
        body: bytes | None = None,
        query: list[tuple[str, str]] | None = None,
        label: str = "the Responses API",
    ) -> httpx.Response:
        """Call Azure OpenAI's v1 API, ``/openai/v1/<path>`` (the Responses API); ``label`` names it in errors.

        The v1 API takes no dated ``api-version``, so ``AZURE_OPENAI_API_VERSION``
        does not apply here. Source:
        https://learn.microsoft.com/en-us/azure/foundry/openai/api-version-lifecycle
        """
        url = str(httpx.URL(f"{self._v1}{path}", params=query or None))
        return await self._send(method, url, body, request_id, label)

    async def _send(
        self, method: str, url: str, body: bytes | None, request_id: str, deployment: str
    ) -> httpx.Response:
        name, value = await self._auth.header()
        headers = {"accept-encoding": "identity", "x-ms-client-request-id": request_id, name: value}
        if body is not None:
            headers["content-type"] = "application/json"
        request = self._client.build_request(method, url, content=body, headers=headers)
        for attempt in range(1, CONNECT_ATTEMPTS + 1):
            try:
                response = await self._client.send(request, stream=True)
            except httpx.TimeoutException as exc:
                if isinstance(exc, httpx.ConnectTimeout) and attempt < CONNECT_ATTEMPTS:
                    continue
                raise UpstreamTimeout(
                    f"Azure OpenAI did not answer within the proxy's time limit for '{deployment}'. Try again."
                ) from exc
            except httpx.TransportError as exc:
                if attempt < CONNECT_ATTEMPTS:
                    await asyncio.sleep(0.1 * attempt)
                    continue
                raise UpstreamError(
                    f"Azure OpenAI could not be reached for '{deployment}' after {CONNECT_ATTEMPTS} attempts."
                ) from exc
            if response.status_code in RETRY_STATUSES and attempt < CONNECT_ATTEMPTS:
                await response.aclose()
                await asyncio.sleep(0.1 * attempt)
                continue
            response.extensions["proxy_attempts"] = attempt  # named in a 502's message
            return response
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        await self._client.aclose()
