"""Keyed hashes of secrets: the one place where what is stored of a secret (an event code, a personal key) is made.

A secret is stored only as HMAC-SHA-256 under the deployment's ``CODE_HASH_KEY``
(Bicep generates it; ``make run`` and the tests generate one locally), never as
a plain hash: with a plain SHA-256, a copy of the table (or of a log line that
named a row) let anyone test candidate codes offline at billions per second.
Without the key, a stored hash tells nothing about the secret.

Each use of a secret has a *purpose* label (``EVENT_CODE``, ``PERSONAL_KEY``, ``ORGANIZER_ACCOUNT_KEY``),
and each purpose hashes under a key of its own derived from
``CODE_HASH_KEY``: the same string used for two purposes gives two unrelated
hashes, so one kind of row can never be matched against another.

``legacy_sha256`` is how event codes were stored before: it is kept only so
that events created before the upgrade are found once more and re-hashed
(``proxy.policy.events``).
"""

from __future__ import annotations

import hashlib
import hmac

EVENT_CODE = "event-code"
PERSONAL_KEY = "personal-key"
ORGANIZER_ACCOUNT_KEY = "organizer-account-key"
MIN_KEY_LENGTH = 32


class SecretHasher:
    """Keyed hashes (hex HMAC-SHA-256) of secrets, per purpose, under one deployment key."""

    __slots__ = ("_key", "_purposes")

    def __init__(self, key: str) -> None:
        if len(key) < MIN_KEY_LENGTH:
            raise ValueError(f"the key must have at least {MIN_KEY_LENGTH} characters")
        self._key = key.encode()
        self._purposes: dict[str, bytes] = {}

    def __repr__(self) -> str:  # keep the key out of tracebacks and logs
        return "SecretHasher(key=***)"

    def hash(self, purpose: str, secret: str) -> str:
        """The stored form of ``secret`` used for ``purpose``."""
        key = self._purposes.get(purpose)
        if key is None:
            key = self._purposes[purpose] = hmac.digest(self._key, b"proxy purpose:" + purpose.encode(), "sha256")
        return hmac.digest(key, secret.encode(), "sha256").hex()


def legacy_sha256(purpose: str, secret: str) -> str:
    """How a secret was stored before keyed hashes: an unsalted SHA-256 (read only, to upgrade old rows)."""
    return hashlib.sha256(f"{purpose}:{secret}".encode()).hexdigest()
