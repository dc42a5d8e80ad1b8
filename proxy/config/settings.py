"""The one settings object: read once from the environment, validated at start.

Nothing else in the project reads ``os.environ``. A missing or malformed value
fails at cold start with a message that names it.

The CLI (``python -m proxy.manage``) reads the environment first, then the
``Values`` of ``local.settings.json``, so it reaches the same storage as the app.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from proxy.config.backends import Backend, parse_backends, single_backend
from proxy.config.hashing import MIN_KEY_LENGTH, SecretHasher
from proxy.config.prices import Price, parse_model_prices
from proxy.config.principal import NO_SIGN_IN, OrganizerSignIn

DEFAULT_API_VERSION = "2024-10-21"
# The largest body worth accepting is one that carries the largest image Azure OpenAI takes, 20 MiB
# ("The maximum size for input images is restricted to 20 MB": Vision-enabled chat model concepts,
# https://learn.microsoft.com/en-us/azure/ai-foundry/openai/concepts/gpt-with-vision, input limitations;
# its 400 names the bytes, "cannot exceed 20971520 bytes"), sent inline: base64 makes it 27,962,028
# bytes, and the prompt around it fits in what is left of 28 MiB. The largest text prompt any deployment
# takes (about a million tokens, some 4 MiB of JSON) fits too. Azure takes up to 10 such images in one
# request; more than one large image goes by URL (a few bytes here), which no instance has to hold.
DEFAULT_MAX_REQUEST_BYTES = 28 * 1024 * 1024
# The bodies one worker holds at once (proxy.upstream.payload.BodyBudget). A worker grows by up to about three
# times what it holds (the bytes read, the parsed body, the one sent upstream and what the socket has not
# taken yet): 64 bodies of 28 MiB sent at once by eight attendees took a worker from 89 to 413 MiB at its
# peak, by one attendee to 261 MiB (3,101 MiB with no budget and 32 MiB bodies), well inside a 2,048 MB
# Flex Consumption instance; three of the largest bodies are held at once (one of them an attendee's at
# most), and the rest are told to retry.
DEFAULT_BODY_MEMORY_BYTES = 128 * 1024 * 1024
# FUNCTIONS_REQUEST_BODY_SIZE_LIMIT, which the Bicep and local.settings.example.json give the Functions host:
# it refuses (a bare 413) any body past it before the worker sees a byte, instead of taking 100 MB a request
# (its default: https://learn.microsoft.com/en-us/azure/azure-functions/functions-app-settings
# #functions_request_body_size_limit). One MiB over the proxy's own limit, so that a body just over that
# still gets the proxy's OpenAI-shaped 413, which names the limit.
HOST_BODY_LIMIT_BYTES = DEFAULT_MAX_REQUEST_BYTES + 1024 * 1024
# functionTimeout in host.json (10 min) plus a minute: no live request is older (proxy.ledger.reconcile). The
# lease is derived from the functionTimeout the host applies, and one given that is not longer is refused.
DEFAULT_LEASE_SECONDS = 660.0
LEASE_MARGIN_SECONDS = 60.0
# The app's root, where host.json is deployed beside function_app.py.
APP_ROOT = Path(__file__).resolve().parents[2]
# Flex Consumption's functionTimeout when host.json sets none: 30 minutes
# (https://learn.microsoft.com/en-us/azure/azure-functions/functions-scale#timeout).
FLEX_DEFAULT_TIMEOUT_SECONDS = 1800.0
DEFAULT_FAILED_LOOKUPS = 10
# Chat sessions (``session_id``, ``proxy.conversations.sessions``): the bound on what is kept and prepended, and for how
# long after its last turn. Defaults for every event until organizers can set them per event.
DEFAULT_SESSION_MAX_TURNS = 20
DEFAULT_SESSION_MAX_CHARS = 60_000
DEFAULT_SESSION_TTL_SECONDS = 24 * 3600.0

# Settings the app reads, by name. The infra tests check that the Bicep sets
# exactly these (plus HOST_SETTINGS) on the function app.
APP_SETTINGS: tuple[str, ...] = (
    "AZURE_OPENAI_ENDPOINT",
    "AZURE_OPENAI_API_KEY",
    "AZURE_OPENAI_API_VERSION",
    "AZURE_OPENAI_BACKENDS",
    "AZURE_CLIENT_ID",
    "STORAGE_TABLE_ENDPOINT",
    "STORAGE_CONNECTION_STRING",
    "ORGANIZER_KEY",
    "CODE_HASH_KEY",
    "ORGANIZER_TRUST_APP_SERVICE_AUTH",
    "ORGANIZER_ENTRA_OBJECT_IDS",
    "ORGANIZER_ENTRA_GROUP_IDS",
    "ORGANIZER_ENTRA_ADMIN_OBJECT_IDS",
    "ORGANIZER_ENTRA_ADMIN_GROUP_IDS",
    "ORGANIZER_ENTRA_VIEWER_OBJECT_IDS",
    "ORGANIZER_ENTRA_VIEWER_GROUP_IDS",
    "ATTENDEE_SIGN_IN",
    "MAX_REQUEST_BYTES",
    "BODY_MEMORY_BYTES",
    "UPSTREAM_TIMEOUT_SECONDS",
    "EVENT_CACHE_SECONDS",
    "RESERVATION_LEASE_SECONDS",
    "FAILED_LOOKUPS_PER_MINUTE",
    "SESSION_MAX_TURNS",
    "SESSION_MAX_CHARS",
    "SESSION_TTL_SECONDS",
    "LOG_FORMAT",
    "MODEL_PRICES",
    # Read by the Functions host too; here, for the app's own telemetry (proxy.observability.telemetry).
    "APPLICATIONINSIGHTS_CONNECTION_STRING",
    "APPLICATIONINSIGHTS_AUTHENTICATION_STRING",
)

# Settings read by the Functions host or the language worker, not by our code.
HOST_SETTINGS: tuple[str, ...] = (
    "AzureWebJobsStorage__accountName",
    "AzureWebJobsStorage__credential",
    "AzureWebJobsStorage__clientId",
    "PYTHON_ENABLE_INIT_INDEXING",
    "FUNCTIONS_EXTENSION_VERSION",
    "FUNCTIONS_WORKER_RUNTIME",
    "FUNCTIONS_REQUEST_BODY_SIZE_LIMIT",
)


# The access log's lines (proxy.edge.access): logfmt for people, json for machines.
LogFormat = Literal["logfmt", "json"]
LOG_FORMATS: tuple[LogFormat, ...] = ("logfmt", "json")


# Settings given as text and validated by the model, by field.
ENV_NAMES: dict[str, str] = {
    "max_request_bytes": "MAX_REQUEST_BYTES",
    "body_memory_bytes": "BODY_MEMORY_BYTES",
    "upstream_timeout_seconds": "UPSTREAM_TIMEOUT_SECONDS",
    "event_cache_seconds": "EVENT_CACHE_SECONDS",
    "reservation_lease_seconds": "RESERVATION_LEASE_SECONDS",
    "failed_lookups_per_minute": "FAILED_LOOKUPS_PER_MINUTE",
    "session_max_turns": "SESSION_MAX_TURNS",
    "session_max_chars": "SESSION_MAX_CHARS",
    "session_ttl_seconds": "SESSION_TTL_SECONDS",
    "log_format": "LOG_FORMAT",
    "attendee_sign_in": "ATTENDEE_SIGN_IN",
}


class SettingsError(ValueError):
    """A setting is missing or malformed; the message names it."""


class Settings(BaseModel):
    """Everything the proxy and the organizer CLI are configured with (a pydantic model: bounds below)."""

    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)

    openai_endpoint: str
    openai_api_key: str | None
    openai_api_version: str
    client_id: str | None
    table_endpoint: str | None
    storage_connection_string: str | None
    organizer_key: str | None
    # The key of the stored hashes of codes (proxy.config.hashing); the app needs it, the CLI only to touch a code.
    code_hash_key: str | None = Field(None, repr=False)
    max_request_bytes: int = Field(gt=0)
    body_memory_bytes: int = Field(DEFAULT_BODY_MEMORY_BYTES, gt=0)
    upstream_timeout_seconds: float = Field(gt=0)
    # Changes (disable, rotate, block) must reach every instance within a minute.
    event_cache_seconds: float = Field(ge=0, le=60)
    reservation_lease_seconds: float = Field(DEFAULT_LEASE_SECONDS, gt=0)
    # Unknown event codes a client address may send per minute (proxy.policy.guessing).
    failed_lookups_per_minute: int = Field(DEFAULT_FAILED_LOOKUPS, gt=0)
    session_max_turns: int = Field(DEFAULT_SESSION_MAX_TURNS, gt=0)
    session_max_chars: int = Field(DEFAULT_SESSION_MAX_CHARS, gt=0)
    session_ttl_seconds: float = Field(DEFAULT_SESSION_TTL_SECONDS, gt=0)
    log_format: LogFormat = "logfmt"
    # Telemetry to Application Insights (proxy.observability.telemetry); None: off, nothing exported nor imported.
    appinsights_connection_string: str | None = None
    # From APPLICATIONINSIGHTS_AUTHENTICATION_STRING "Authorization=AAD;ClientId=ID": the managed identity
    # that authenticates the telemetry ("" for the system-assigned one); None: the connection string alone.
    appinsights_identity: str | None = None
    # Organizers signed in with Entra ID through App Service authentication (proxy.config.principal).
    organizer_sign_in: OrganizerSignIn = NO_SIGN_IN
    # Attendees register their personal key by signing in with GitHub through App Service authentication
    # (proxy.edge.registration); "off": the platform's principal header is ignored on attendee routes.
    attendee_sign_in: Literal["off", "github"] = "off"
    # AZURE_OPENAI_BACKENDS, or AZURE_OPENAI_ENDPOINT as the one backend (proxy.config.backends).
    backends: tuple[Backend, ...] = ()
    # MODEL_PRICES: USD per million tokens by deployment name, over the sourced table (proxy.config.prices).
    model_prices: dict[str, Price] = Field(default_factory=dict)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, *, need_upstream: bool = True) -> Settings:
        """Read and validate the settings; ``need_upstream=False`` for the CLI."""
        values = os.environ if env is None else env

        def get(name: str) -> str | None:
            value = values.get(name, "").strip()
            return value or None

        endpoint = get("AZURE_OPENAI_ENDPOINT")
        listed = get("AZURE_OPENAI_BACKENDS")
        if endpoint is None and listed is None and need_upstream:
            raise SettingsError(
                "AZURE_OPENAI_ENDPOINT is not set: give the Azure OpenAI endpoint, e.g. https://NAME.openai.azure.com"
                " (or several in AZURE_OPENAI_BACKENDS)"
            )
        if endpoint is not None and not endpoint.startswith(("https://", "http://")):
            raise SettingsError("AZURE_OPENAI_ENDPOINT must start with https:// (or http:// for a local simulator)")
        api_key = get("AZURE_OPENAI_API_KEY")
        backends: tuple[Backend, ...] = ()
        if listed is not None:
            try:
                backends = parse_backends(listed, get)
            except ValueError as exc:
                raise SettingsError(f"AZURE_OPENAI_BACKENDS {exc}") from None
        elif endpoint is not None:
            backends = (single_backend(endpoint.rstrip("/"), api_key),)
        model_prices: dict[str, Price] = {}
        if (raw_prices := get("MODEL_PRICES")) is not None:
            try:
                model_prices = parse_model_prices(raw_prices)
            except ValueError as exc:
                raise SettingsError(f"MODEL_PRICES {exc}") from None
        table_endpoint = get("STORAGE_TABLE_ENDPOINT")
        connection_string = get("STORAGE_CONNECTION_STRING")
        if table_endpoint is None and connection_string is None:
            raise SettingsError(
                "Neither STORAGE_TABLE_ENDPOINT (Azure, managed identity) nor "
                "STORAGE_CONNECTION_STRING (Azurite) is set"
            )
        # Read as given; the model converts and bounds them, and an error names the setting.
        raw: dict[str, Any] = {field: value for field, name in ENV_NAMES.items() if (value := get(name)) is not None}
        for lowered in ("log_format", "attendee_sign_in"):
            if lowered in raw:
                raw[lowered] = raw[lowered].lower()
        fields = dict(
            openai_endpoint=(endpoint or (backends[0].endpoint if backends else "")).rstrip("/"),
            openai_api_key=api_key,
            openai_api_version=get("AZURE_OPENAI_API_VERSION") or DEFAULT_API_VERSION,
            client_id=get("AZURE_CLIENT_ID"),
            table_endpoint=table_endpoint,
            storage_connection_string=connection_string,
            organizer_key=get("ORGANIZER_KEY"),
            code_hash_key=_code_hash_key(get("CODE_HASH_KEY")),
            appinsights_connection_string=get("APPLICATIONINSIGHTS_CONNECTION_STRING"),
            appinsights_identity=_appinsights_identity(get("APPLICATIONINSIGHTS_AUTHENTICATION_STRING")),
            organizer_sign_in=_organizer_sign_in(get),
            backends=backends,
            model_prices=model_prices,
            max_request_bytes=DEFAULT_MAX_REQUEST_BYTES,
            upstream_timeout_seconds=120.0,
            event_cache_seconds=30.0,
        )
        try:
            settings = cls.model_validate({**fields, **raw})
        except ValidationError as exc:
            raise _settings_error(exc, raw) from None
        host_limit = get("FUNCTIONS_REQUEST_BODY_SIZE_LIMIT")
        if host_limit is not None and host_limit.isdigit() and int(host_limit) < settings.max_request_bytes:
            raise SettingsError(
                f"FUNCTIONS_REQUEST_BODY_SIZE_LIMIT ({host_limit}) is below MAX_REQUEST_BYTES "
                f"({settings.max_request_bytes}): the Functions host would refuse bodies the proxy takes; raise it too"
            )
        timeout = _function_timeout(get("AzureFunctionsJobHost__functionTimeout"), APP_ROOT / "host.json")
        if "reservation_lease_seconds" not in raw:
            if timeout is None:
                raise SettingsError(
                    "functionTimeout is -1 (no limit): set RESERVATION_LEASE_SECONDS to longer than any request may "
                    "run, or the reconciler may give back the slot of one still running"
                )
            settings = settings.model_copy(update={"reservation_lease_seconds": timeout + LEASE_MARGIN_SECONDS})
        elif timeout is not None and settings.reservation_lease_seconds <= timeout:
            lease = settings.reservation_lease_seconds
            raise SettingsError(
                f"RESERVATION_LEASE_SECONDS ({lease:g}) must be longer than functionTimeout "
                f"({timeout:g} s, host.json or AzureFunctionsJobHost__functionTimeout): a request may run that long, "
                "and the reconciler would give back its slot while it still runs. Leave it unset to derive it "
                f"(functionTimeout + {LEASE_MARGIN_SECONDS:g} s)"
            )
        if settings.max_request_bytes > settings.body_memory_bytes * 3 // 8:
            raise SettingsError(
                f"BODY_MEMORY_BYTES ({settings.body_memory_bytes}) must be at least 8/3 of MAX_REQUEST_BYTES "
                f"({settings.max_request_bytes}): one attendee's large bodies may use three eighths of it, and the "
                "largest must fit"
            )
        return settings

    def hasher(self) -> SecretHasher:
        """The keyed hash of codes (``proxy.config.hashing``); ``SettingsError`` without ``CODE_HASH_KEY``."""
        if self.code_hash_key is None:
            raise SettingsError(
                "CODE_HASH_KEY is not set: give a random secret of at least 32 characters (the Bicep generates one; "
                "make run writes one into local.settings.json). Keep it: codes stored under another key stop working"
            )
        return SecretHasher(self.code_hash_key)

    @classmethod
    def for_cli(cls, settings_file: Path = Path("local.settings.json")) -> Settings:
        """The environment first, then ``Values`` of ``local.settings.json``."""
        return cls.from_env(cli_values(settings_file), need_upstream=False)


def _function_timeout(setting: str | None, host_json: Path) -> float | None:
    """The functionTimeout the Functions host applies, in seconds: the app setting that overrides
    ``host.json``, else ``host.json``'s, else Flex Consumption's default; None for ``-1`` (no limit)."""
    text = setting
    if text is None and host_json.is_file():
        try:
            found = json.loads(host_json.read_text()).get("functionTimeout")
        except (ValueError, AttributeError) as exc:
            raise SettingsError(f"{host_json} is not a JSON object: {exc}") from None
        text = None if found is None else str(found)
    if text is None:
        return FLEX_DEFAULT_TIMEOUT_SECONDS
    if text.strip() == "-1":
        return None
    span = re.fullmatch(r"(?:(\d+)\.)?(\d{1,2}):(\d{1,2}):(\d{1,2}(?:\.\d+)?)", text.strip())
    if span is None:
        raise SettingsError(f"functionTimeout {text!r} is not a time span like 00:10:00 ([d.]hh:mm:ss)")
    days, hours, minutes, seconds = span.groups()
    return ((int(days or 0) * 24 + int(hours)) * 60 + int(minutes)) * 60 + float(seconds)


def cli_values(settings_file: Path = Path("local.settings.json")) -> dict[str, str]:
    """What the CLI reads: the environment first, then ``Values`` of ``local.settings.json``."""
    merged: dict[str, str] = {}
    if settings_file.is_file():
        try:
            values = json.loads(settings_file.read_text()).get("Values", {})
        except (OSError, ValueError) as exc:
            raise SettingsError(f"{settings_file} is not valid JSON: {exc}") from exc
        merged.update({str(k): str(v) for k, v in values.items()})
    if os.environ.get("STORAGE_TABLE_ENDPOINT", "").strip() and "STORAGE_CONNECTION_STRING" not in os.environ:
        # An Azure endpoint given on the command line wins over the file's Azurite connection string.
        merged.pop("STORAGE_CONNECTION_STRING", None)
    merged.update(os.environ)
    return merged


def _appinsights_identity(raw: str | None) -> str | None:
    """``Authorization=AAD;ClientId=ID`` -> ``ID`` (``""`` without ClientId); None when not set."""
    if raw is None:
        return None
    pairs = dict(part.split("=", 1) for part in raw.split(";") if "=" in part)
    pairs = {key.strip().lower(): value.strip() for key, value in pairs.items()}
    if pairs.get("authorization", "").upper() != "AAD":
        raise SettingsError(
            "APPLICATIONINSIGHTS_AUTHENTICATION_STRING must read Authorization=AAD;ClientId=<the identity's client id>"
        )
    return pairs.get("clientid", "")


def _code_hash_key(raw: str | None) -> str | None:
    if raw is not None and len(raw) < MIN_KEY_LENGTH:
        raise SettingsError(f"CODE_HASH_KEY must have at least {MIN_KEY_LENGTH} characters (a random secret)")
    return raw


def _organizer_sign_in(get: Callable[[str], str | None]) -> OrganizerSignIn:
    try:
        return OrganizerSignIn.parse(
            get("ORGANIZER_TRUST_APP_SERVICE_AUTH"),
            get("ORGANIZER_ENTRA_OBJECT_IDS"),
            get("ORGANIZER_ENTRA_GROUP_IDS"),
            admin_object_ids=get("ORGANIZER_ENTRA_ADMIN_OBJECT_IDS"),
            admin_group_ids=get("ORGANIZER_ENTRA_ADMIN_GROUP_IDS"),
            viewer_object_ids=get("ORGANIZER_ENTRA_VIEWER_OBJECT_IDS"),
            viewer_group_ids=get("ORGANIZER_ENTRA_VIEWER_GROUP_IDS"),
        )
    except ValueError as exc:
        raise SettingsError(str(exc)) from None


def _settings_error(exc: ValidationError, raw: Mapping[str, Any]) -> SettingsError:
    """The first validation error, naming the setting as it is spelt in the environment."""
    error = exc.errors(include_url=False)[0]
    field = str(error["loc"][0]) if error["loc"] else ""
    name = ENV_NAMES.get(field, field)
    given = f", got {raw[field]!r}" if field in raw else ""
    if field == "log_format":
        return SettingsError(f"LOG_FORMAT must be one of {', '.join(LOG_FORMATS)}{given}")
    if field == "event_cache_seconds":
        return SettingsError(f"EVENT_CACHE_SECONDS must be between 0 and 60 (changes must apply within 60 s){given}")
    if error["type"] in ("greater_than", "greater_than_equal"):
        return SettingsError(f"{name} must be positive{given}")
    if error["type"] in ("int_parsing", "float_parsing", "int_from_float", "int_type", "float_type"):
        kind = "a whole number" if "int" in error["type"] else "a number"
        return SettingsError(f"{name} must be {kind}{given}")
    return SettingsError(f"{name}: {error['msg']}{given}")
