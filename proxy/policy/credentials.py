"""The attendee credential: ``CODE/USER`` or a personal key, where it is read from and how it is parsed.

Accepted in ``api-key``, ``Authorization: Bearer`` or ``openai-event-code``
(first present wins, in that order). A personal key (``proxy.policy.keys``) is
``ek-`` and 32 URL-safe characters; anything else must be ``CODE/USER``. Codes
and keys are secrets: never logged, echoed or put in an error message.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from starlette.datastructures import Headers

from proxy.errors import InvalidEventCode, MissingCredentials

KEY_PREFIX = "ek-"
KEY_PATTERN = re.compile(r"ek-[A-Za-z0-9_-]{32}")
CODE_PATTERN = re.compile(r"[A-Za-z0-9_-]{4,64}")
USER_PATTERN = re.compile(r"[A-Za-z0-9._@+-]{1,128}")
_CREDENTIAL = re.compile(r"([A-Za-z0-9_-]{4,64})/([A-Za-z0-9._@+-]{1,128})")


@dataclass(frozen=True, slots=True)
class Credential:
    code: str
    user: str

    def __repr__(self) -> str:  # keep the code out of tracebacks and logs
        return f"Credential(code=***, user={self.user!r})"


@dataclass(frozen=True, slots=True)
class PersonalKey:
    key: str

    def __repr__(self) -> str:  # keep the key out of tracebacks and logs
        return "PersonalKey(key=***)"


def read_credential(headers: Headers) -> Credential | PersonalKey:
    """Parse the credential, or raise ``MissingCredentials`` / ``InvalidEventCode``."""
    raw = headers.get("api-key")
    if raw is None:
        authorization = headers.get("authorization")
        if authorization is not None:
            scheme, _, raw = authorization.partition(" ")
            if scheme.lower() != "bearer":
                raise InvalidEventCode(
                    "The Authorization header must be 'Bearer ' followed by your personal key or CODE/your-name."
                )
        else:
            raw = headers.get("openai-event-code")
    if raw is None or not raw.strip():
        raise MissingCredentials(
            "No credential: send your personal key or 'CODE/your-name' as the API key "
            "(api-key header, Authorization: Bearer, or openai-event-code header)."
        )
    raw = raw.strip()
    if raw.startswith(KEY_PREFIX) and KEY_PATTERN.fullmatch(raw):
        return PersonalKey(raw)
    match = _CREDENTIAL.fullmatch(raw)
    if match is None:
        raise InvalidEventCode(
            "The API key must be your personal key (ek- and 32 characters) or 'CODE/your-name': CODE is 4 to 64 "
            "of A-Z a-z 0-9 _ -, your-name is 1 to 128 of A-Z a-z 0-9 . _ @ + -."
        )
    return Credential(code=match.group(1), user=match.group(2))
