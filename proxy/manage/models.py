"""The organizer API's bodies and answers as pydantic models (their OpenAPI schema: ``proxy.manage.openapi``).

``EventCreate`` and ``EventUpdate`` validate an event's fields, from the HTTP
API and the CLI alike; ``EventOut``, ``UsageReport``, ``AttendeeList`` and the
others describe the answers, so ``GET /api/manage/openapi.json`` (``proxy.manage.openapi``)
publishes what the code checks. Unknown fields are refused, and every failure becomes a
400 ``invalid_request`` whose ``param`` names the field (``invalid``).

Integers and booleans are strict (``"5"`` is not 5, ``"yes"`` is not true):
organizers see the mistake instead of a guess. Times are ISO 8601 with an
offset, stored in UTC. Attendee requests are not validated here: their checks
stay hand-written in ``proxy.upstream.payload``, which is faster on the hot path (docs/how-it-works.md,
*Performance*).
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StringConstraints,
    ValidationError,
    field_validator,
)

from proxy.admission.alerts import check_webhook
from proxy.errors import InvalidRequest
from proxy.policy.events import DEFAULT_DAILY_REQUESTS, DEFAULT_MAX_TOKENS, DEFAULT_MODELS

M = TypeVar("M", bound=BaseModel)
CODE_PATTERN = r"^[A-Za-z0-9_-]{4,64}$"
# A deployment name is a path segment of the upstream URL: it never starts with a dot, so "." and ".." cannot
# climb out of /openai/deployments/ (httpx resolves dot segments before sending).
MODEL_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# Fields that null clears (no cap); the texts too, as empty.
CLEARABLE = frozenset({"daily_requests", "daily_tokens", "tpm", "event_requests", "event_tokens", "max_attendees",
                       "session_turns", "session_chars", "alert_webhook", "daily_cost", "event_cost"})  # fmt: skip


def _utc_time(value: Any) -> datetime:
    if not isinstance(value, str):
        raise ValueError("must be an ISO 8601 string with an offset")
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"is not ISO 8601: {value!r} (example: 2026-11-21T09:00:00+01:00)") from None
    if moment.tzinfo is None:
        raise ValueError(f"needs a UTC offset, e.g. {value}+00:00 or {value}Z")
    return moment.astimezone(UTC)


def _models(value: Any) -> Any:
    if isinstance(value, str):
        return [m.strip() for m in value.split(",") if m.strip()]
    return value


def _text(value: Any) -> Any:
    return "" if value is None else value


ATTENDEE_KEYS = "every attendee must register a personal key (POST /api/v1/keys): CODE/name is refused"
Positive = Annotated[StrictInt, Field(gt=0)]
Dollars = Annotated[float, Field(gt=0, le=1_000_000, allow_inf_nan=False)]
DAILY_COST = "USD per attendee and day (prices: proxy/data/prices.json and MODEL_PRICES)"
EVENT_COST = "USD for the whole event, all attendees"
Time = Annotated[datetime, BeforeValidator(_utc_time), Field(json_schema_extra={"format": "date-time"})]
Name = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]
Text = Annotated[str, BeforeValidator(_text), StringConstraints(strip_whitespace=True, max_length=1000)]
ShortText = Annotated[str, BeforeValidator(_text), StringConstraints(strip_whitespace=True, max_length=200)]
Code = Annotated[str, StringConstraints(pattern=CODE_PATTERN)]
Models = Annotated[list[str], BeforeValidator(_models), Field(min_length=1)]
Webhook = Annotated[str, StringConstraints(strip_whitespace=True, max_length=2000), AfterValidator(check_webhook)]
WEBHOOK = ("POST {text, event_id, event, budget, used, limit, percent} here at 80 % and 100 % of each event-wide "
           "budget (https; http only to loopback, locally); shown masked")  # fmt: skip


class _Fields(BaseModel):
    """Validation shared by create and update."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("time_zone", check_fields=False)
    @classmethod
    def _zone(cls, value: str | None) -> str | None:
        if value is None:
            return value
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"{value!r} is not an IANA time zone (e.g. Europe/Paris, America/New_York, UTC)") from None
        return value

    @field_validator("models", check_fields=False)
    @classmethod
    def _deployments(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return value
        for model in value:
            if not MODEL_PATTERN.fullmatch(model):
                raise ValueError(f"holds an invalid deployment name: {model!r}")
        return list(dict.fromkeys(value))


class EventCreate(_Fields):
    """``POST /events`` and ``events create``: a new event."""

    name: Name
    code: Code | None = Field(None, description="4-64 of A-Z a-z 0-9 _ -, not easy to guess; generated when absent")
    start: Time
    end: Time
    time_zone: str = "UTC"
    models: Models = Field(default_factory=lambda: list(DEFAULT_MODELS))
    max_tokens: Positive = DEFAULT_MAX_TOKENS
    daily_requests: Positive | None = DEFAULT_DAILY_REQUESTS
    daily_tokens: Positive | None = None
    tpm: Positive | None = None
    event_requests: Positive | None = None
    event_tokens: Positive | None = None
    max_attendees: Positive | None = None
    daily_cost: Dollars | None = Field(None, description=DAILY_COST)
    event_cost: Dollars | None = Field(None, description=EVENT_COST)
    session_turns: Positive | None = Field(None, description="turns kept per chat session; default 20")
    session_chars: Positive | None = Field(None, description="characters kept per chat session; default 60000")
    attendee_keys: StrictBool = Field(False, description=ATTENDEE_KEYS)
    active: StrictBool = True
    description: Text = ""
    organizer: ShortText = ""
    alert_webhook: Webhook | None = Field(None, description=WEBHOOK)


class EventUpdate(_Fields):
    """``PATCH /events/{id}`` and ``events update``: only the fields given change; null clears a cap."""

    name: Name | None = None
    start: Time | None = None
    end: Time | None = None
    time_zone: str | None = None
    models: Models | None = None
    max_tokens: Positive | None = None
    daily_requests: Positive | None = None
    daily_tokens: Positive | None = None
    tpm: Positive | None = None
    event_requests: Positive | None = None
    event_tokens: Positive | None = None
    max_attendees: Positive | None = None
    daily_cost: Dollars | None = Field(None, description=DAILY_COST)
    event_cost: Dollars | None = Field(None, description=EVENT_COST)
    session_turns: Positive | None = Field(None, description="turns kept per chat session; default 20")
    session_chars: Positive | None = Field(None, description="characters kept per chat session; default 60000")
    attendee_keys: StrictBool | None = Field(None, description=ATTENDEE_KEYS)
    active: StrictBool | None = None
    description: Text | None = None
    organizer: ShortText | None = None
    alert_webhook: Webhook | None = Field(None, description=WEBHOOK + "; null removes it")

    def changes(self) -> dict[str, Any]:
        """The fields given, with null refused where it means nothing."""
        given = {name: getattr(self, name) for name in self.model_fields_set}
        for name, value in given.items():
            if value is None and name not in CLEARABLE | {"description", "organizer"}:
                raise InvalidRequest(f"'{name}' cannot be null", param=name)
        return given


class RotateCode(BaseModel):
    """``POST /events/{id}/rotate-code``: the new code, or none for a generated one."""

    model_config = ConfigDict(extra="forbid")
    code: Code | None = None


class AttendeePatch(BaseModel):
    """``PATCH /events/{id}/attendees/{user}``."""

    model_config = ConfigDict(extra="forbid")
    blocked: StrictBool


class Share(BaseModel):
    """``POST /events/{id}/share``: an account (or ``entra:<object id>``) and what it may do with the event."""

    model_config = ConfigDict(extra="forbid")
    organizer: Annotated[str, StringConstraints(min_length=1, max_length=100)]
    role: Literal["organizer", "viewer"] = "organizer"


class OrganizerCreate(BaseModel):
    """``POST /organizers``: a new account; its key is in the answer, once."""

    model_config = ConfigDict(extra="forbid")
    name: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    role: Literal["admin", "organizer", "viewer"]


class EventOut(BaseModel):
    """An event as organizers see it (never its code)."""

    id: str
    name: str
    start: datetime
    end: datetime
    time_zone: str
    models: list[str]
    max_tokens: int
    daily_requests: int | None
    daily_tokens: int | None
    tpm: int | None
    event_requests: int | None
    event_tokens: int | None
    max_attendees: int | None
    daily_cost: float | None
    event_cost: float | None
    session_turns: int | None
    session_chars: int | None
    attendee_keys: bool
    active: bool
    description: str
    organizer: str
    alert_webhook: str | None = Field(description="scheme and host of the alert webhook (its path is a secret)")
    owner: str | None = Field(description="the account that created it (ORGANIZER_KEY, a name, entra:<object id>)")
    shared: dict[str, Literal["organizer", "viewer"]] = Field(description="the accounts it is shared with")
    created_at: datetime


class EventCreated(EventOut):
    code: str = Field(description="shown only in this answer: only a hash is stored")


class Caller(BaseModel):
    name: str = Field(description="an account's name, ORGANIZER_KEY, or entra:<object id>")
    role: Literal["admin", "organizer", "viewer"]


class EventList(BaseModel):
    object: Literal["list"]
    data: list[EventOut]
    account: Caller = Field(description="who asked: the events listed are those it may see")


class CodeRotated(BaseModel):
    id: str
    code: str


class EventDeleted(BaseModel):
    id: str
    deleted: Literal[True]


class PlanQuery(BaseModel):
    """``GET /events/{id}/plan?attendees=N``."""

    model_config = ConfigDict(extra="forbid")

    attendees: int = Field(gt=0, le=1_000_000)


class Figures(BaseModel):
    requests: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cached_tokens: int = Field(description="of the prompt tokens, those upstream served from its prompt cache")
    cost: float = Field(description="USD, from the sourced price table and MODEL_PRICES")
    unpriced_requests: int = Field(description="requests whose model had no known price: not in cost")


class UsageRow(Figures):
    key: str = Field(description="the user, model, day or backend")


class BudgetUse(BaseModel):
    limit: int | None
    used: int


class CostUse(BaseModel):
    limit: float = Field(description="USD")
    used: float = Field(description="USD recorded, plus the requests in flight at the dearest price per token")


class EventBudget(BaseModel):
    requests: BudgetUse = Field(description="requests admitted")
    tokens: BudgetUse = Field(description="tokens recorded, plus the estimates of requests in flight")
    cost: CostUse | None = Field(None, description="present with event_cost")
    exhausted: bool


class UsageReport(BaseModel):
    event_id: str
    by: str
    totals: Figures
    rows: list[UsageRow]
    budget: EventBudget | None = Field(None, description="present when the event has a budget")


class Attendee(BaseModel):
    user: str
    first_seen: datetime | None
    requests: int
    total_tokens: int
    cost: float = Field(description="USD")
    blocked: bool
    personal_key: bool = Field(description="the name has a personal key: CODE/name is refused for it")


class AttendeeList(BaseModel):
    event_id: str
    object: Literal["list"]
    max_attendees: int | None
    count: int = Field(description="distinct names seen")
    data: list[Attendee]


class AttendeeBlocked(BaseModel):
    event_id: str
    user: str
    blocked: bool


class KeyReset(BaseModel):
    event_id: str
    user: str
    reset: bool = Field(description="whether the name had a personal key")


class Account(BaseModel):
    name: str
    role: Literal["admin", "organizer", "viewer"]
    created_at: datetime | None
    created_by: str | None


class AccountKey(BaseModel):
    name: str
    role: Literal["admin", "organizer", "viewer"]
    key: str = Field(description="shown only in this answer: only a keyed hash is stored")


class AccountList(BaseModel):
    object: Literal["list"]
    data: list[Account]


class Shares(BaseModel):
    event_id: str
    owner: str | None
    shared: dict[str, Literal["organizer", "viewer"]]


class AuditEntry(BaseModel):
    time: datetime
    account: str = Field(description="an account's name, ORGANIZER_KEY, or entra:<object id>")
    role: str
    via: Literal["api", "cli"]
    action: str
    event_id: str | None
    target: str | None = Field(description="the attendee or account concerned")
    changes: dict[str, dict[str, Any]] = Field(description="{field: {old, new}}, as the API shows them")


class AuditList(BaseModel):
    object: Literal["list"]
    event_id: str | None
    data: list[AuditEntry]


class ErrorBody(BaseModel):
    class Error(BaseModel):
        message: str
        type: str
        code: str
        param: str | None

    error: Error


def validated(model: type[M], fields: Any) -> M:
    """``model`` from organizer input, or ``InvalidRequest`` naming the first bad field."""
    try:
        return model.model_validate(fields)
    except ValidationError as exc:
        raise invalid(model, exc) from None


def invalid(model: type[BaseModel], exc: ValidationError) -> InvalidRequest:
    error = exc.errors(include_url=False)[0]
    param = str(error["loc"][0]) if error["loc"] else None
    if error["type"] == "extra_forbidden":
        known = ", ".join(sorted(model.model_fields))
        return InvalidRequest(f"Unknown field '{param}'. Known fields: {known}.", param=param)
    if error["type"] == "missing":
        hint = ": ISO 8601 with an offset, e.g. 2026-11-21T09:00:00+01:00" if param in ("start", "end") else ""
        return InvalidRequest(f"'{param}' is required{hint}", param=param)
    message = str(error["msg"]).removeprefix("Value error, ")
    if param == "code" and error["type"] == "string_pattern_mismatch":
        message = "must be 4 to 64 of A-Z a-z 0-9 _ -"
    elif error["type"] in ("int_type", "greater_than", "int_from_float"):
        message = "must be a positive integer"
    elif error["type"] == "bool_type":
        message = "must be true or false"
    return InvalidRequest(f"'{param}' {message[:1].lower()}{message[1:]}", param=param)
