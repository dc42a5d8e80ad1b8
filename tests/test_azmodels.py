"""``devtools.deploy.models``: which version to deploy, from real ``az cognitiveservices model list`` output.

The region is the one captured on 2025-05-25 (tests/data/az_model_list.json names the source);
the dates below are that day's, so the answers are the ones ``make deploy`` would have given.
"""

from __future__ import annotations

import json
from datetime import date
from typing import Any

import pytest

from devtools.deploy.models import NoDeployableVersion, choose, offers, parameter, resolved
from tests.support import ROOT

CAPTURED = json.loads((ROOT / "tests" / "data" / "az_model_list.json").read_text())["captured"]["entries"]
CAPTURE_DAY = date(2025, 5, 25)


def ask(model: str, sku: str, version: str = "") -> dict[str, Any]:
    return {"name": model, "model": model, "version": version, "skuName": sku, "capacity": 10}


def test_newest_is_by_creation_not_by_the_version_string() -> None:
    """gpt-35-turbo 0125 (created 2024-02-15) is newer than 1106 (2023-11-15), though '1106' > '0125'."""
    (choice,) = choose([ask("gpt-35-turbo", "ProvisionedManaged", "1106")], {"eastus2": offers(CAPTURED)}, CAPTURE_DAY)
    assert choice.offer.version == "0125"
    assert "main.bicepparam says 1106" in choice.line()
    assert resolved([choice]) == [ask("gpt-35-turbo", "ProvisionedManaged", "0125")]


def test_deprecated_and_preview_versions_are_never_picked() -> None:
    region = {"eastus2": offers(CAPTURED)}
    (choice,) = choose([ask("gpt-35-turbo", "Standard", "0301")], region, CAPTURE_DAY)
    assert choice.offer.version == "0125" and choice.offer.lifecycle == "GenerallyAvailable"
    lifecycles = {(o.version, o.lifecycle) for o in region["eastus2"] if o.model == "gpt-35-turbo"}
    assert ("0301", "Deprecated") in lifecycles  # it is there, and refused


def test_a_version_closing_before_the_event_is_refused_with_what_the_region_offers() -> None:
    with pytest.raises(NoDeployableVersion) as refused:
        choose([ask("gpt-4o", "GlobalStandard")], {"eastus2": offers(CAPTURED)}, date(2026, 3, 2))
    message = str(refused.value)
    assert "no version of gpt-4o as GlobalStandard in eastus2 still takes new deployments on 2026-03-02" in message
    assert "eastus2: gpt-4o 2024-11-20 is generally available, new deployments until 2026-03-01." in message
    assert "  gpt-4.1-mini 2025-04-14 (new deployments until 2026-04-11)" in message


def test_every_region_must_offer_the_version() -> None:
    """An extra region without gpt-4o 2024-11-20 makes the deploy take 2024-08-06, which both offer."""
    without_newest = [e for e in CAPTURED if (e["model"]["name"], e["model"]["version"]) != ("gpt-4o", "2024-11-20")]
    regions = {"eastus2": offers(CAPTURED), "swedencentral": offers(without_newest)}
    (choice,) = choose([ask("gpt-4o", "GlobalStandard")], regions, CAPTURE_DAY)
    assert choice.offer.version == "2024-08-06"
    with pytest.raises(NoDeployableVersion, match=r"swedencentral does not offer text-embedding-3-large"):
        choose([ask("text-embedding-3-large", "GlobalStandard")], {**regions, "swedencentral": []}, CAPTURE_DAY)


def test_a_sku_the_region_lacks_is_named() -> None:
    with pytest.raises(NoDeployableVersion, match=r"eastus2 offers gpt-4\.1 as .*, not GlobalStandard"):
        choose([ask("gpt-4.1", "GlobalStandard")], {"eastus2": offers(CAPTURED)}, CAPTURE_DAY)


def test_only_openai_account_entries_count() -> None:
    entries = [{**e, "kind": "AIServices"} for e in CAPTURED]
    assert offers(entries) == []


def test_bicepparam_literals() -> None:
    text = "param a = [\n  {\n    name: 'x'  // a comment\n    n: 5\n    on: true\n  }\n]\n"
    assert parameter(text, "a") == [{"name": "x", "n": 5, "on": True}]
    with pytest.raises(KeyError):
        parameter(text, "c")
    with pytest.raises(ValueError, match="not a literal"):
        parameter("param k = readEnvironmentVariable('K', '')\n", "k")
