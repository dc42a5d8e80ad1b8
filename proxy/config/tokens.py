"""Bearer tokens from ``azure-identity``, cached so the hot path does not await the SDK.

The credential is created once per worker (managed identity in Azure, developer
credentials locally) and passed in. A token is reused until five minutes
before it expires, then refreshed once, whatever the number of requests
waiting for it.
"""

from __future__ import annotations

import asyncio
import time

from azure.core.credentials_async import AsyncTokenCredential

from proxy.config.settings import Settings

REFRESH_MARGIN_SECONDS = 300


class BearerToken:
    """The ``Authorization`` value for one scope."""

    def __init__(self, credential: AsyncTokenCredential, scope: str) -> None:
        self._credential = credential
        self._scope = scope
        self._value = ""
        self._refresh_at = 0.0
        self._lock = asyncio.Lock()

    async def value(self) -> str:
        """``Bearer <token>``; raises azure-core's ``ClientAuthenticationError`` when none can be had."""
        if time.time() < self._refresh_at:
            return self._value
        async with self._lock:
            if time.time() >= self._refresh_at:
                token = await self._credential.get_token(self._scope)
                self._value = f"Bearer {token.token}"
                self._refresh_at = token.expires_on - REFRESH_MARGIN_SECONDS
            return self._value


def make_credential(settings: Settings) -> AsyncTokenCredential | None:
    """The Azure credential, when upstream or storage needs one (imported only then)."""
    if all(backend.api_key for backend in settings.backends) and settings.storage_connection_string:
        return None
    from azure.identity.aio import DefaultAzureCredential

    if settings.client_id:
        return DefaultAzureCredential(managed_identity_client_id=settings.client_id)
    return DefaultAzureCredential()
