"""The settings object is a pydantic model: numbers converted and bounded, errors naming the setting."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from proxy.config.settings import Settings, SettingsError

BASE = {
    "STORAGE_CONNECTION_STRING": "UseDevelopmentStorage=true",
    "AZURE_OPENAI_ENDPOINT": "https://x.openai.azure.com",
}


def test_defaults_and_conversions() -> None:
    settings = Settings.from_env(BASE)
    assert (settings.max_request_bytes, settings.event_cache_seconds, settings.log_format) == (28 << 20, 30.0, "logfmt")
    assert settings.body_memory_bytes == 128 << 20
    given = Settings.from_env({**BASE, "MAX_REQUEST_BYTES": "1024", "EVENT_CACHE_SECONDS": "0", "LOG_FORMAT": "JSON"})
    assert (given.max_request_bytes, given.event_cache_seconds, given.log_format) == (1024, 0.0, "json")
    with pytest.raises(ValidationError):
        settings.model_copy(update={"max_request_bytes": 1}).__setattr__("max_request_bytes", 2)  # frozen


@pytest.mark.parametrize(
    ("name", "value", "said"),
    [
        ("EVENT_CACHE_SECONDS", "61", "between 0 and 60"),
        ("MAX_REQUEST_BYTES", "lots", "must be a whole number, got 'lots'"),
        ("UPSTREAM_TIMEOUT_SECONDS", "0", "must be positive"),
        ("SESSION_TTL_SECONDS", "-5", "must be positive"),
        ("FAILED_LOOKUPS_PER_MINUTE", "2.5", "whole number"),
        ("LOG_FORMAT", "xml", "one of logfmt, json"),
        ("BODY_MEMORY_BYTES", "0", "must be positive"),
        # The largest body must fit in the three eighths of the budget that one attendee's large bodies may use.
        ("BODY_MEMORY_BYTES", str(74 << 20), "at least 8/3 of MAX_REQUEST_BYTES"),
        # The host's own limit (as the Bicep sets it) must not cut bodies the proxy would take.
        ("FUNCTIONS_REQUEST_BODY_SIZE_LIMIT", str(16 << 20), "below MAX_REQUEST_BYTES"),
    ],
)
def test_a_bad_value_names_its_setting(name: str, value: str, said: str) -> None:
    with pytest.raises(SettingsError, match=name) as raised:
        Settings.from_env({**BASE, name: value})
    assert said in str(raised.value)


def test_the_reservation_lease_follows_the_function_timeout() -> None:
    """The lease outlives any request: derived from functionTimeout, and one given that is not longer is refused."""
    assert Settings.from_env(BASE).reservation_lease_seconds == 600 + 60  # host.json's 00:10:00, plus a minute
    shorter = {**BASE, "AzureFunctionsJobHost__functionTimeout": "00:00:04"}
    assert Settings.from_env(shorter).reservation_lease_seconds == 64
    assert Settings.from_env({**shorter, "RESERVATION_LEASE_SECONDS": "5"}).reservation_lease_seconds == 5
    with pytest.raises(SettingsError, match=r"RESERVATION_LEASE_SECONDS \(300\) must be longer than functionTimeout"):
        Settings.from_env({**BASE, "RESERVATION_LEASE_SECONDS": "300"})  # host.json: 600 s
    longer = {**BASE, "AzureFunctionsJobHost__functionTimeout": "1.00:00:00"}
    assert Settings.from_env(longer).reservation_lease_seconds == 86_400 + 60
    unbounded = {**BASE, "AzureFunctionsJobHost__functionTimeout": "-1"}
    with pytest.raises(SettingsError, match="functionTimeout is -1"):
        Settings.from_env(unbounded)
    assert Settings.from_env({**unbounded, "RESERVATION_LEASE_SECONDS": "7200"}).reservation_lease_seconds == 7200
    with pytest.raises(SettingsError, match="not a time span"):
        Settings.from_env({**BASE, "AzureFunctionsJobHost__functionTimeout": "10 minutes"})
