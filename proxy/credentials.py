"""The attendee credential ``CODE/USER``: where it is read from and how it is checked.

Accepted in ``api-key``, ``Authorization: Bearer`` or ``openai-event-code``
(first present wins, in that order). The code is a secret: it is never logged,
echoed or put in an error message.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from starlette.datastructures import Headers

from proxy.errors import InvalidEventCode, MissingCredentials

_CREDENTIAL = re.compile(r"([A-Za-z0-9_-]{4,64})/([A-Za-z0-9._@+-]{1,128})")


@dataclass(frozen=True, slots=True)
class Credential:
    code: str
    user: str

    def __repr__(self) -> str:  # keep the code out of tracebacks and logs
        return f"Credential(code=***, user={self.user!r})"


def read_credential(headers: Headers) -> Credential:
    """Parse the credential, or raise ``MissingCredentials`` / ``InvalidEventCode``."""
    raw = headers.get("api-key")
    if raw is None:
        authorization = headers.get("authorization")
        if authorization is not None:
            scheme, _, raw = authorization.partition(" ")
            if scheme.lower() != "bearer":
                raise InvalidEventCode("The Authorization header must be 'Bearer CODE/your-name'.")
        else:
            raw = headers.get("openai-event-code")
    if raw is None or not raw.strip():
        raise MissingCredentials(
            "No credential: send 'CODE/your-name' as the API key "
            "(api-key header, Authorization: Bearer, or openai-event-code header)."
        )
    match = _CREDENTIAL.fullmatch(raw.strip())
    if match is None:
        raise InvalidEventCode(
            "The API key must be 'CODE/your-name': CODE is 4 to 64 of A-Z a-z 0-9 _ -, "
            "your-name is 1 to 128 of A-Z a-z 0-9 . _ @ + -."
        )
    return Credential(code=match.group(1), user=match.group(2))
