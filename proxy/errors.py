"""The proxy's one error hierarchy, and the one function that renders it.

    ProxyError                       status  code
    ├── InvalidRequest                400     invalid_request
    ├── MaxTokensExceedsCap           400     max_tokens_exceeds_cap
    ├── MissingCredentials            401     missing_credentials
    ├── InvalidEventCode              401     invalid_event_code
    ├── Unauthorized                  401     unauthorized (organizer API)
    ├── PersonalKeyRequired           401     personal_key_required (a claimed name, or an event that needs keys)
    ├── SignInRequired                401     sign_in_required (keys are registered with GitHub sign-in)
    ├── EventNotStarted               403     event_not_started
    ├── EventEnded                    403     event_ended
    ├── EventDisabled                 403     event_disabled
    ├── AttendeeBlocked               403     attendee_blocked
    ├── AttendeeLimitReached          403     attendee_limit_reached
    ├── Forbidden                     403     forbidden (an organizer account's role does not allow it)
    ├── ModelPriceUnknown             403     model_price_unknown (a model with no known price, in an event
    │                                         that caps cost)
    ├── NotFound                      404     not_found
    ├── ModelNotFound                 404     model_not_found
    ├── MethodNotAllowed              405     method_not_allowed (with ``Allow``)
    ├── EditConflict                  409     edit_conflict (organizer writes that kept colliding)
    ├── NameTaken                     409     name_taken (registering a name that has a personal key, or
    │                                         adding an organizer account whose name is taken)
    ├── RequestTooLarge               413     request_too_large
    ├── CapExceeded                   429     daily_request_cap_exceeded / daily_token_cap_exceeded /
    │                                         daily_cost_cap_exceeded / rate_limited / event_budget_exhausted
    │                                         (with ``Retry-After``)
    ├── UpstreamThrottled             429     rate_limited (every backend at its quota; ``Retry-After``)
    ├── InternalError                 500     internal_error (a bug; names the request id)
    ├── UpstreamError                 502     upstream_error
    ├── StorageUnavailable            503     storage_unavailable
    │   └── StorageRefused            503     storage_unavailable (a write Table Storage refuses as
    │                                         invalid, 400 or 413: trying it again will not help)
    ├── ServerBusy                    503     server_busy (the worker's memory for bodies is taken; ``Retry-After``)
    ├── OrganizerApiDisabled          503     organizer_api_disabled
    └── UpstreamTimeout               504     upstream_timeout

Errors from the layers below (httpx, azure-core) are translated into these at
the boundary that calls them (``raise ... from exc``). Messages never carry a
secret: no event code, token or key is ever formatted into one.
"""

from __future__ import annotations

import math

import orjson


class ProxyError(Exception):
    """An error with an HTTP status and an OpenAI error ``code``."""

    status = 500
    code = "internal_error"
    type = "invalid_request_error"

    def __init__(self, message: str, *, param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.headers = headers or {}

    def body(self) -> bytes:
        """The OpenAI-shaped JSON body."""
        return error_body(self.message, self.type, self.code, self.param)


def error_body(message: str, type_: str, code: str, param: str | None = None) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": type_, "code": code, "param": param}})


class InvalidRequest(ProxyError):
    status, code = 400, "invalid_request"


class MaxTokensExceedsCap(ProxyError):
    status, code = 400, "max_tokens_exceeds_cap"


class MissingCredentials(ProxyError):
    status, code, type = 401, "missing_credentials", "authentication_error"


class InvalidEventCode(ProxyError):
    status, code, type = 401, "invalid_event_code", "authentication_error"


class Unauthorized(ProxyError):
    status, code, type = 401, "unauthorized", "authentication_error"


class PersonalKeyRequired(ProxyError):
    status, code, type = 401, "personal_key_required", "authentication_error"


class SignInRequired(ProxyError):
    status, code, type = 401, "sign_in_required", "authentication_error"


class EventNotStarted(ProxyError):
    status, code, type = 403, "event_not_started", "permission_error"


class EventEnded(ProxyError):
    status, code, type = 403, "event_ended", "permission_error"


class EventDisabled(ProxyError):
    status, code, type = 403, "event_disabled", "permission_error"


class AttendeeBlocked(ProxyError):
    status, code, type = 403, "attendee_blocked", "permission_error"


class AttendeeLimitReached(ProxyError):
    status, code, type = 403, "attendee_limit_reached", "permission_error"


class Forbidden(ProxyError):
    """An organizer account whose role does not allow this change (a viewer's write, an organizer's account admin)."""

    status, code, type = 403, "forbidden", "permission_error"


class ModelPriceUnknown(ProxyError):
    """A cost cap cannot count a model it has no price for, so the event refuses it rather than let it be free."""

    status, code, type = 403, "model_price_unknown", "permission_error"

    def __init__(self, model: str, event_name: str) -> None:
        super().__init__(
            f"The model '{model}' has no known price, and '{event_name}' caps what attendees may spend, so it "
            "cannot be used until the organizer sets its price: the app setting MODEL_PRICES, in USD per million "
            f'tokens, e.g. {{"{model}": {{"input": 0.15, "cached_input": 0.075, "output": 0.6}}}}.',
            param="model",
        )


class NotFound(ProxyError):
    status, code = 404, "not_found"


class ModelNotFound(ProxyError):
    status, code = 404, "model_not_found"


class MethodNotAllowed(ProxyError):
    status, code = 405, "method_not_allowed"

    def __init__(self, method: str, path: str, allowed: list[str]) -> None:
        super().__init__(
            f"{path} does not take {method}; it takes {', '.join(allowed)}.",
            headers={"allow": ", ".join(allowed)},
        )


class EditConflict(ProxyError):
    status, code = 409, "edit_conflict"


class NameTaken(ProxyError):
    status, code = 409, "name_taken"


class RequestTooLarge(ProxyError):
    status, code = 413, "request_too_large"


class CapExceeded(ProxyError):
    """429; ``code`` is set per instance (daily requests, tokens or cost, rate, the event's budget)."""

    status, type = 429, "rate_limit_error"

    def __init__(self, message: str, *, code: str, retry_after: int) -> None:
        super().__init__(message, headers={"retry-after": str(max(1, retry_after))})
        self.code = code


class InternalError(ProxyError):
    status, code, type = 500, "internal_error", "api_error"


def internal_error(request_id: str) -> InternalError:
    return InternalError(
        f"The proxy failed while handling this request (request id {request_id}); it has been logged. "
        "Try again, and give the organizer the request id if it keeps happening.",
        headers={"x-request-id": request_id},
    )


class UpstreamError(ProxyError):
    status, code, type = 502, "upstream_error", "api_error"


class UpstreamThrottled(ProxyError):
    """Every backend for the model is cooled down after a 429 (``proxy.config.backends``); the shortest wait is sent."""

    status, code, type = 429, "rate_limited", "rate_limit_error"

    def __init__(self, message: str, *, retry_after: float) -> None:
        seconds, milliseconds = max(1, math.ceil(retry_after)), max(1, math.ceil(retry_after * 1000))
        headers = {"retry-after": str(seconds), "retry-after-ms": str(milliseconds)}
        super().__init__(message, headers=headers)


class StorageUnavailable(ProxyError):
    status, code, type = 503, "storage_unavailable", "api_error"


class StorageRefused(StorageUnavailable):
    """Table Storage refused a write as invalid (400, 413): the same write would be refused again."""

    def __init__(self, message: str, status_code: int) -> None:
        super().__init__(message)
        self.status_code = status_code


class ServerBusy(ProxyError):
    """This worker holds as many request bodies as its memory budget allows (``proxy.upstream.payload.BodyBudget``)."""

    status, code, type = 503, "server_busy", "api_error"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"retry-after": "1"})


class OrganizerApiDisabled(ProxyError):
    status, code, type = 503, "organizer_api_disabled", "api_error"


class UpstreamTimeout(ProxyError):
    status, code, type = 504, "upstream_timeout", "api_error"
