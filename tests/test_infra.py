"""Checks on the Bicep under infra/, the deployment package rules and the packaging script.

No Azure here and no Bicep compiler: the templates are parsed with pycep and scanned with
checkov; what a compiler would refuse (names, module parameters and outputs, resource types,
API versions and property paths against Azure's published types) is checked by
tests/test_bicep_check.py with devtools/deploy/bicep_check.py. Every identifier that comes from
Azure (role ids, API versions, SKUs, model versions, what Flex Consumption forbids and
allows) is compared with
``tests/data/azure_sources.json``, where each value carries the page it was copied from and
the date; a template value missing there fails. What the templates set is also compared
with what the code reads (proxy/config/settings.py) and with what devtools/deploy/command.py consumes.

What cannot be checked here (quota, a model's availability in *your* region today, the
platform accepting the whole deployment) is checked on a real subscription with
``python -m devtools.deploy --what-if``; see the deploy guide, docs/deploy.md.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from devtools.deploy.bicep_parse import parse
from devtools.deploy.package import build, is_ignored, package_files, parse_ignore
from proxy.config.settings import APP_SETTINGS, DEFAULT_MAX_REQUEST_BYTES, HOST_BODY_LIMIT_BYTES, HOST_SETTINGS
from proxy.storage.tables import TABLE_NAMES

ROOT = Path(__file__).resolve().parent.parent
INFRA = ROOT / "infra"
BICEP_FILES = sorted(INFRA.rglob("*.bicep"))
# pycep (here and in checkov) predates Bicep's fail(), which modules/checks.bicep is made of;
# devtools/deploy/bicep_check.py parses and checks every file (tests/test_bicep_check.py).
CHECKS = INFRA / "modules" / "checks.bicep"
PYCEP_FILES = [path for path in BICEP_FILES if path != CHECKS]
SOURCES_FILE = ROOT / "tests" / "data" / "azure_sources.json"
DEPLOY_SCRIPT = ROOT / "devtools" / "deploy" / "command.py"


# Settings the app reads that the Bicep must not set in Azure: the API key and connection
# string are for local runs (Azure uses the managed identity), and the limits have
# defaults in proxy/config/settings.py that suit Azure (the reservation lease follows host.json's functionTimeout).
LOCAL_ONLY_OR_OPTIONAL = {
    "ATTENDEE_SIGN_IN",  # set with az when GitHub sign-in is configured (README)
    "AZURE_OPENAI_API_KEY",
    "STORAGE_CONNECTION_STRING",
    "SESSION_MAX_TURNS",
    "SESSION_MAX_CHARS",
    "SESSION_TTL_SECONDS",
    "MAX_REQUEST_BYTES",
    "BODY_MEMORY_BYTES",
    "UPSTREAM_TIMEOUT_SECONDS",
    "MODEL_PRICES",
    "EVENT_CACHE_SECONDS",
    "RESERVATION_LEASE_SECONDS",
    "FAILED_LOOKUPS_PER_MINUTE",
}

# Outputs for devtools/deploy/command.py that are not app settings.
DEPLOY_OUTPUTS = {"AZURE_FUNCTION_APP_NAME", "AZURE_FUNCTION_APP_URL", "AZURE_OPENAI_DEPLOYMENTS"}

# The region the deploy guide (docs/deploy.md) deploys to in its examples; every default model/SKU pair must be
# offered there according to the sources file.
EXAMPLE_REGION = "eastus2"

GUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


def _require(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        pytest.fail(f"{module} is not installed: pip install -r requirements-dev.txt")


@cache
def sources() -> dict[str, Any]:
    """The sourced Azure identifiers (tests/data/azure_sources.json)."""
    data: dict[str, Any] = json.loads(SOURCES_FILE.read_text())
    return data


@cache
def parsed(relative: str) -> dict[str, Any]:
    """The pycep parse of ``infra/<relative>``."""
    _require("pycep")
    from pycep import BicepParser

    # pycep's BicepJson is a TypedDict; the tests index it freely.
    return dict(BicepParser().parse(file_path=INFRA / relative))


@cache
def bicepparam() -> dict[str, Any]:
    """The values ``infra/main.bicepparam`` assigns, literals only (pycep reads no .bicepparam).

    Each ``param x = <literal>`` is parsed by pycep as the default of ``param x object``;
    values built from functions (``readEnvironmentVariable``) are left out.
    """
    _require("pycep")
    from pycep import BicepParser

    text = (INFRA / "main.bicepparam").read_text()
    values: dict[str, Any] = {}
    for match in re.finditer(r"^param\s+(\w+)\s*=\s*(.*?)(?=^param\s|^//|\Z)", text, re.MULTILINE | re.DOTALL):
        name, literal = match.group(1), match.group(2).strip()
        if re.match(r"^[A-Za-z_]\w*\(", literal):
            continue
        kind = "array" if literal.startswith("[") else "int" if literal.isdigit() else "string"
        values[name] = dict(BicepParser().parse(text=f"param {name} {kind} = {literal}\n"))["parameters"][name][
            "default"
        ]
    return values


def body(resource: dict[str, Any]) -> dict[str, Any]:
    """A resource's or module's properties, under the loop or condition wrapper if any."""
    config: dict[str, Any] = resource["config"]
    if "loop_type" in config or "condition" in config:
        inner: dict[str, Any] = config["config"]
        return inner
    return config


def all_resources() -> Iterator[tuple[str, dict[str, Any]]]:
    """Every resource declared in every file, existing ones included, with its file."""
    for path in PYCEP_FILES:
        relative = str(path.relative_to(INFRA))
        for resource in parsed(relative).get("resources", {}).values():
            yield relative, resource


def resources_of(relative: str, resource_type: str) -> list[dict[str, Any]]:
    found = [r for r in parsed(relative)["resources"].values() if r["type"] == resource_type and not r["existing"]]
    assert found, f"no {resource_type} in infra/{relative}"
    return found


def only_resource(relative: str, resource_type: str) -> dict[str, Any]:
    (resource,) = resources_of(relative, resource_type)
    return body(resource)


def walk(node: Any) -> Iterator[Any]:
    """Every value in a parsed expression tree."""
    yield node
    if isinstance(node, dict):
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk(value)


def decorator(parameter: dict[str, Any], kind: str) -> Any:
    found = [d["argument"] for d in parameter["decorators"] if d["type"] == kind]
    assert found, f"no @{kind} on {parameter}"
    return found[0]


def function_app() -> dict[str, Any]:
    return only_resource("modules/functionapp.bicep", "Microsoft.Web/sites")


def function_app_settings() -> dict[str, Any]:
    entries = function_app()["properties"]["siteConfig"]["appSettings"]
    names = [entry["name"] for entry in entries]
    assert len(names) == len(set(names)), f"app settings set twice: {names}"
    return {entry["name"]: entry["value"] for entry in entries}


def model_deployments() -> list[dict[str, Any]]:
    deployments: list[dict[str, Any]] = bicepparam()["modelDeployments"]
    assert deployments, "main.bicepparam sets no modelDeployments"
    return deployments


# (1) The sources file itself: every entry names where it came from and when.


def test_every_sourced_value_names_its_page_and_date() -> None:
    def entries(node: Any) -> Iterator[dict[str, Any]]:
        if isinstance(node, dict):
            if "url" in node:
                yield node
            else:
                for value in node.values():
                    yield from entries(value)
        elif isinstance(node, list):
            for value in node:
                yield from entries(value)

    found = list(entries({k: v for k, v in sources().items() if k != "about"}))
    assert len(found) > 20
    for entry in found:
        assert entry["url"].startswith("https://"), entry
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", entry["retrieved"]), entry
    for role in sources()["roles"]:
        assert GUID.fullmatch(role["id"]) and role["name"], role


# (2) Every file parses and the wiring holds.


@pytest.mark.parametrize("path", PYCEP_FILES, ids=lambda p: str(p.relative_to(INFRA)))
def test_bicep_file_parses(path: Path) -> None:
    result = parsed(str(path.relative_to(INFRA)))
    assert result.get("resources") or result.get("modules"), f"{path} declares nothing"


def test_infra_has_main_and_the_modules() -> None:
    names = {str(p.relative_to(INFRA)) for p in BICEP_FILES}
    expected = {"main.bicep"} | {
        f"modules/{m}.bicep" for m in ("storage", "openai", "functionapp", "monitoring", "roles", "checks")
    }
    assert expected <= names
    wired = {m["detail"]["path"] for m in parsed("main.bicep")["modules"].values()}
    assert wired == expected - {"main.bicep"}


def test_bicepparam_sets_only_parameters_of_main() -> None:
    text = (INFRA / "main.bicepparam").read_text()
    assert re.search(r"^using '\./main\.bicep'\s*$", text, re.MULTILINE)
    assigned = set(re.findall(r"^param\s+(\w+)\s*=", text, re.MULTILINE))
    main_parameters = parsed("main.bicep")["parameters"]
    assert assigned <= set(main_parameters)
    # The CLI can override only the parameters the file sets; secrets come from the environment.
    assert {"organizerKey", "deployerPrincipalId", "modelDeployments"} <= assigned
    required = {name for name, p in main_parameters.items() if p.get("default") is None}
    assert required <= assigned, f"main.bicep needs {sorted(required - assigned)} and main.bicepparam omits them"
    assert "readEnvironmentVariable('ORGANIZER_KEY'" in text


# (3) Identifiers from Azure are the ones in the sources file.


def test_every_api_version_is_sourced() -> None:
    known = {entry["type"].lower(): set(entry["versions"]) for entry in sources()["api_versions"]}
    used = {(path, r["type"], r["api_version"]) for path, r in all_resources()}
    assert used
    unsourced = [
        f"{path}: {kind}@{version}"
        for path, kind, version in sorted(used)
        if version not in known.get(kind.lower(), ())
    ]
    assert not unsourced, "API versions not in tests/data/azure_sources.json:\n" + "\n".join(unsourced)


def test_every_role_id_is_a_sourced_built_in_role_with_the_name_it_is_used_for() -> None:
    by_id = {role["id"].lower(): role["name"] for role in sources()["roles"]}
    role_ids: dict[str, str] = parsed("main.bicep")["variables"]["roleIds"]["value"]
    for key, role_id in role_ids.items():
        assert role_id.lower() in by_id, f"roleIds.{key} = {role_id} is not a built-in role in the sources file"
        # roleIds.storageBlobDataOwner must hold the id of 'Storage Blob Data Owner', and so on.
        assert re.sub(r"[^a-z]", "", by_id[role_id.lower()].lower()) == key.lower(), (key, by_id[role_id.lower()])
    # The roles devtools/deploy/command.py accepts as able to assign roles are sourced too.
    from devtools.deploy.command import ASSIGNING_ROLES

    for role_id, name in ASSIGNING_ROLES.items():
        assert by_id.get(role_id) == name, f"devtools/deploy/command.py: {role_id} is not '{name}' in the sources file"
    # No GUID anywhere in the templates that is not one of these role ids.
    stray = {g.lower() for path in BICEP_FILES for g in GUID.findall(path.read_text())} - set(by_id)
    assert not stray, f"GUIDs in infra/ that are not sourced role ids: {sorted(stray)}"


def test_every_sku_is_sourced() -> None:
    known = {(entry["type"].lower(), entry["name"]) for entry in sources()["skus"]}
    tiers = {(entry["type"].lower(), entry["name"]): entry.get("tier") for entry in sources()["skus"]}
    checked = 0
    for path, resource in all_resources():
        if resource["existing"]:
            continue
        config = body(resource)
        # Log Analytics keeps its SKU under properties.
        sku = config.get("sku") or config.get("properties", {}).get("sku")
        if not isinstance(sku, dict) or not isinstance(sku.get("name"), str):
            continue
        if resource["type"] == "Microsoft.CognitiveServices/accounts/deployments":
            continue  # its SKU comes from the parameters file, checked below
        key = (resource["type"].lower(), sku["name"])
        assert key in known, f"{path}: SKU {sku['name']} for {resource['type']} is not in the sources file"
        if "tier" in sku:
            assert sku["tier"] == tiers[key], f"{path}: tier {sku['tier']} for {sku['name']}"
        checked += 1
    assert checked >= 4
    deployment_skus = {name for kind, name in known if kind == "microsoft.cognitiveservices/accounts/deployments"}
    for deployment in model_deployments():
        assert deployment["skuName"] in deployment_skus, deployment


def test_every_resource_kind_is_sourced() -> None:
    known = {(entry["type"].lower(), entry["kind"]) for entry in sources()["kinds"]}
    kinds = [
        (path, r["type"], body(r)["kind"]) for path, r in all_resources() if not r["existing"] and "kind" in body(r)
    ]
    assert len(kinds) >= 5
    for path, kind_of, kind in kinds:
        assert (kind_of.lower(), kind) in known, f"{path}: kind {kind!r} for {kind_of} is not in the sources file"


NEW_CUSTOMER_MARGIN = timedelta(days=30)


def test_model_defaults_stay_open_to_new_customers_in_the_example_region() -> None:
    """A default whose version closes to new customers (a fresh subscription is one) within 30 days fails.

    The dates are the sources file's, copied from Microsoft's tables; devtools/deploy/command.py still
    asks the region at deploy time, and this test keeps the file's own defaults honest.
    """
    models = {(m["name"], m["version"]): m for m in sources()["models"]}
    today = date.today()
    for deployment in model_deployments():
        key = (deployment["model"], deployment["version"])
        assert key in models, f"{key} is not in the sources file: copy it from the retirement tables first"
        model = models[key]
        assert model["lifecycle"] == "Generally Available", key
        closes = model["new_customers_until"]
        assert closes is None or date.fromisoformat(closes) > today + NEW_CUSTOMER_MARGIN, (
            f"infra/main.bicepparam: {key[0]} {key[1]} closes to new customers on {closes}, within "
            f"{NEW_CUSTOMER_MARGIN.days} days of {today}: choose a newer default ({model['url']})"
        )
        offered = model["regions"].get(deployment["skuName"], [])
        assert EXAMPLE_REGION in offered, f"{key} as {deployment['skuName']} is not offered in {EXAMPLE_REGION}"
        assert isinstance(deployment["capacity"], int) and deployment["capacity"] > 0
    names = [d["name"] for d in model_deployments()]
    assert len(names) == len(set(names)), names


def test_the_old_default_fails_the_new_customer_rule() -> None:
    """The rule above rejects gpt-5.2 2025-12-11 from 2026-11-12 on (it closes on 2026-12-12)."""
    (old,) = [m for m in sources()["models"] if (m["name"], m["version"]) == ("gpt-5.2", "2025-12-11")]
    assert date.fromisoformat(old["new_customers_until"]) <= date(2026, 12, 3) + NEW_CUSTOMER_MARGIN


def test_deploy_reads_the_same_defaults() -> None:
    """devtools/deploy/command.py reads modelDeployments from main.bicepparam with its own reader: both agree."""
    from devtools.deploy.models import parameter

    text = (INFRA / "main.bicepparam").read_text()
    assert parameter(text, "modelDeployments") == model_deployments()
    assert parameter(text, "openAiExtraRegions") == bicepparam()["openAiExtraRegions"]


def test_the_openai_module_takes_sku_and_version_per_deployment() -> None:
    (deployments,) = resources_of("modules/openai.bicep", "Microsoft.CognitiveServices/accounts/deployments")
    config = body(deployments)
    text = json.dumps(config)
    for field in ("skuName", "capacity", "model", "version", "name"):
        assert f'"deployment", "operand_2": "{field}"' in text, f"deployments do not read deployment.{field}"
    assert {"type": "batchSize", "argument": 1} in deployments["decorators"]
    main_parameters = parsed("main.bicep")["parameters"]
    assert main_parameters["modelDeployments"]["default"] is None, "the models are chosen in main.bicepparam"


# (4) Flex Consumption: nothing it forbids, scale settings inside its documented bounds.


def test_key_vault_references_resolve_with_the_apps_identity() -> None:
    """With only a user-assigned identity, a Key Vault reference needs keyVaultReferenceIdentity."""
    app = function_app()
    assert app["identity"]["type"] == "UserAssigned"
    assert app["properties"]["keyVaultReferenceIdentity"] == "identityId"


def test_the_reconcile_timer_wakes_the_app_every_5_minutes() -> None:
    """Not every minute (1,440 billed wake-ups a day): 288, and a lost slot comes back within lease + 5 minutes."""
    from devtools.funchost.timers import Schedule
    from proxy.ledger.reconcile import RECONCILE_SCHEDULE

    assert "schedule=RECONCILE_SCHEDULE" in (ROOT / "function_app.py").read_text()
    schedule = Schedule.parse(RECONCILE_SCHEDULE)
    moment, day_end, runs = datetime(2026, 12, 3, tzinfo=UTC), datetime(2026, 12, 4, tzinfo=UTC), 0
    while (moment := schedule.next_after(moment)) <= day_end:
        runs += 1
    assert runs == 288


def test_site_config_uses_nothing_flex_consumption_forbids() -> None:
    flex = sources()["flex_consumption"]
    forbidden = {name.lower() for name in flex["forbidden_site_properties"]["values"]}
    properties = function_app()["properties"]
    used = {key.lower() for key in properties["siteConfig"]} | {key.lower() for key in properties}
    assert not used & forbidden, f"Flex Consumption rejects {sorted(used & forbidden)}"
    settings = {name.upper() for name in function_app_settings()}
    banned = {name.upper() for name in flex["forbidden_app_settings"]["values"]}
    assert not settings & banned, f"app settings Flex Consumption replaces: {sorted(settings & banned)}"


def test_function_app_is_flex_consumption_python() -> None:
    plan = resources_of("modules/functionapp.bicep", "Microsoft.Web/serverfarms")[0]
    assert body(plan)["properties"]["reserved"] is True
    app = function_app()
    assert app["identity"]["type"] == "UserAssigned"
    properties = app["properties"]
    assert properties["httpsOnly"] is True
    assert properties["siteConfig"]["minTlsVersion"] == "1.2"
    config = properties["functionAppConfig"]
    assert config["runtime"]["name"] == "python"
    assert config["runtime"]["version"] in sources()["flex_consumption"]["runtimes"]["python"]
    assert config["deployment"]["storage"]["type"] == "blobContainer"
    assert config["deployment"]["storage"]["authentication"]["type"] == "UserAssignedIdentity"


def test_scale_settings_are_explicit_and_inside_flex_bounds() -> None:
    flex = sources()["flex_consumption"]
    bounds = flex["maximum_instance_count"]
    memory = set(flex["instance_memory_mb"]["values"])
    scale = function_app()["properties"]["functionAppConfig"]["scaleAndConcurrency"]
    assert scale["triggers"]["http"]["perInstanceConcurrency"] == "httpPerInstanceConcurrency"
    assert scale["maximumInstanceCount"] == "maximumInstanceCount"
    assert scale["instanceMemoryMB"] == "instanceMemoryMB"
    always_ready = parsed("modules/functionapp.bicep")["variables"]["alwaysReady"]["value"]
    assert [group["name"] for group in always_ready] == ["http"]
    assert "http" in flex["scale_groups"]["values"]
    for relative in ("main.bicep", "modules/functionapp.bicep"):
        parameters = parsed(relative)["parameters"]
        count = parameters["maximumInstanceCount"]
        assert decorator(count, "min_value") == bounds["min"], relative
        assert decorator(count, "max_value") == bounds["max"], relative
        assert bounds["min"] <= count["default"] <= bounds["max"]
        assert set(decorator(parameters["instanceMemoryMB"], "allowed")) <= memory, relative
        assert decorator(parameters["httpPerInstanceConcurrency"], "min_value") >= 1
    chosen = bicepparam()
    assert bounds["min"] <= chosen["maximumInstanceCount"] <= bounds["max"]
    assert chosen["instanceMemoryMB"] in memory
    # Python's default of 1 would mean one instance, and one cold start, per stream.
    assert chosen["httpPerInstanceConcurrency"] > 1
    assert chosen["alwaysReadyInstances"] == 0, "always-ready instances bill around the clock; set them per event"
    main_parameters = parsed("main.bicep")["parameters"]
    assert main_parameters["httpPerInstanceConcurrency"]["default"] == chosen["httpPerInstanceConcurrency"]


# (5) App settings match proxy/config/settings.py.


def test_function_app_sets_only_known_settings() -> None:
    unknown = set(function_app_settings()) - set(APP_SETTINGS) - set(HOST_SETTINGS)
    assert not unknown, f"not in APP_SETTINGS or HOST_SETTINGS of proxy/config/settings.py: {sorted(unknown)}"


def test_function_app_sets_every_setting_the_app_needs_in_azure() -> None:
    banned = set(sources()["flex_consumption"]["forbidden_app_settings"]["values"])
    needed = (set(APP_SETTINGS) - LOCAL_ONLY_OR_OPTIONAL) | (set(HOST_SETTINGS) - banned)
    missing = needed - set(function_app_settings())
    assert not missing, f"the function app does not set {sorted(missing)}"


def test_function_app_uses_identities_not_keys() -> None:
    settings = function_app_settings()
    assert not LOCAL_ONLY_OR_OPTIONAL & set(settings)
    assert settings["AzureWebJobsStorage__credential"] == "managedidentity"
    assert settings["APPLICATIONINSIGHTS_AUTHENTICATION_STRING"] == "ClientId=${identityClientId};Authorization=AAD"
    assert settings["AZURE_CLIENT_ID"] == settings["AzureWebJobsStorage__clientId"] == "identityClientId"
    assert settings["PYTHON_ENABLE_INIT_INDEXING"] == "1"
    # The host refuses a body the proxy would refuse anyway, before it is relayed (proxy/config/settings.py).
    local = json.loads((ROOT / "local.settings.example.json").read_text())["Values"]
    assert settings["FUNCTIONS_REQUEST_BODY_SIZE_LIMIT"] == local["FUNCTIONS_REQUEST_BODY_SIZE_LIMIT"]
    assert int(settings["FUNCTIONS_REQUEST_BODY_SIZE_LIMIT"]) == HOST_BODY_LIMIT_BYTES > DEFAULT_MAX_REQUEST_BYTES
    assert settings["ORGANIZER_KEY"] == "organizerKey"
    organizer_key = parsed("modules/functionapp.bicep")["parameters"]["organizerKey"]
    assert {"type": "secure"} in organizer_key["decorators"]


# (6) Names and outputs.


def test_storage_name_is_valid_whatever_the_prefix() -> None:
    """A storage account takes 3-24 lowercase letters and digits: the name is derived, not trusted."""
    main = parsed("main.bicep")
    prefix = main["parameters"]["namePrefix"]
    assert decorator(prefix, "min_length") >= 2 and decorator(prefix, "max_length") <= 9
    lowered = {"function": {"type": "to_lower", "parameters": {"string_to_change": "namePrefix"}}}
    assert main["variables"]["prefix"]["value"] == lowered
    dropped = [
        node["function"]["parameters"]["old_string"]
        for node in walk(main["variables"]["storagePrefix"]["value"])
        if isinstance(node, dict) and node.get("function", {}).get("type") == "replace"
    ]
    assert {"-", "_", "."} <= set(dropped), dropped
    storage = main["variables"]["names"]["value"]["storage"]["function"]
    assert storage["type"] == "take" and storage["parameters"]["number_to_take"] == 24
    assert storage["parameters"]["original_value"].startswith("${storagePrefix}")


def test_no_dead_outputs() -> None:
    """Each module output feeds main.bicep; each main output is read by devtools/deploy/command.py."""
    main_text = (INFRA / "main.bicep").read_text()
    modules: dict[str, list[str]] = {}
    for symbol, module in parsed("main.bicep")["modules"].items():
        modules.setdefault(module["detail"]["path"], []).append(symbol)
    for path, symbols in modules.items():
        for name in parse(INFRA / path).of("output"):
            # A module used in a loop is read through an index: openAiExtra[i].outputs.name.
            used = rf"\b({'|'.join(symbols)})(\[[^\]]+\])?\.outputs\.{name}\b"
            assert re.search(used, main_text), f"{path}: output {name} is never used"
    deploy = DEPLOY_SCRIPT.read_text()
    for name in parsed("main.bicep")["outputs"]:
        assert re.search(f"[\"']{name}[\"']", deploy), (
            f"main.bicep output {name} is not read by devtools/deploy/command.py"
        )


def test_outputs_are_named_like_the_settings() -> None:
    outputs = set(parsed("main.bicep")["outputs"])
    assert outputs <= set(APP_SETTINGS) | set(HOST_SETTINGS) | DEPLOY_OUTPUTS
    assert DEPLOY_OUTPUTS | {"STORAGE_TABLE_ENDPOINT"} <= outputs


def test_no_output_reveals_the_organizer_key() -> None:
    main_parameters = parsed("main.bicep")["parameters"]
    assert {"type": "secure"} in main_parameters["organizerKey"]["decorators"]
    assert not [name for name in parse(CHECKS).of("param") if "key" in name.lower()]  # its outputs are not secret
    for path in PYCEP_FILES:
        outputs = parsed(str(path.relative_to(INFRA))).get("outputs", {})
        for name, output in outputs.items():
            assert "organizer" not in name.lower(), f"{path.name}: output {name}"
            text = json.dumps(output["value"]).lower()
            assert "organizer" not in text, f"{path.name}: output {name} uses the organizer key"


# (7) Roles and identity-only access.


def test_role_assignments_are_scoped_guid_named_and_typed() -> None:
    assignments = resources_of("modules/roles.bicep", "Microsoft.Authorization/roleAssignments")
    existing = {name for name, r in parsed("modules/roles.bicep")["resources"].items() if r["existing"]}
    for assignment in assignments:
        config = body(assignment)
        assert config["name"]["function"]["type"] == "guid"
        guid_parameters = config["name"]["function"]["parameters"]
        assert guid_parameters["base_string"]["operator"]["operands"] == {
            "operand_1": config["scope"],
            "operand_2": "id",
        }
        assert guid_parameters["extra_string_1"] == "principalId"
        assert config["scope"] in existing
        assert config["properties"]["principalType"] == "principalType"
    allowed = parsed("modules/roles.bicep")["parameters"]["principalType"]["decorators"]
    assert {"type": "allowed", "argument": ["ServicePrincipal", "User", "Group"]} in allowed


def _role_keys(node: Any) -> set[str]:
    return {
        n["operator"]["operands"]["operand_2"]
        for n in walk(node)
        if isinstance(n, dict) and n.get("operator", {}).get("operands", {}).get("operand_1") == "roleIds"
    }


def test_identity_gets_what_it_needs_and_the_deployer_least_privilege() -> None:
    main = parsed("main.bicep")
    variables = main["variables"]
    modules = {body(m)["name"]: m for m in main["modules"].values() if m["detail"]["path"] == "modules/roles.bicep"}
    app, deployer = body(modules["roles-app"]), body(modules["roles-deployer"])
    assert app["params"]["principalType"] == "ServicePrincipal"
    assert deployer["params"]["principalType"] == "User"
    assert deployer["params"]["principalId"] == "deployerPrincipalId"
    condition = json.dumps(modules["roles-deployer"]["config"]["condition"])
    assert '"empty"' in condition and "deployerPrincipalId" in condition
    assert main["parameters"]["deployerPrincipalId"]["default"] == ""
    assert app["params"]["assignments"] == "appRoles"
    assert _role_keys(variables["appRoles"]) == {
        "cognitiveServicesOpenAiUser",
        "storageTableDataContributor",
        "storageBlobDataOwner",
        "monitoringMetricsPublisher",
    }
    # The organizer CLI needs the tables; the models only if asked; never the blobs.
    assert deployer["params"]["assignments"] == "deployerRoles"
    assert _role_keys(variables["deployerTableRoles"]) == {"storageTableDataContributor"}
    assert _role_keys(variables["deployerModelRoles"]) == {"cognitiveServicesOpenAiUser"}
    choice = variables["deployerRoles"]["value"]["operator"]["operands"]
    assert choice["condition"] == "deployerCanCallModels" and choice["false_value"] == "deployerTableRoles"
    assert main["parameters"]["deployerCanCallModels"]["default"] is False


def test_extra_regions_repeat_the_account_and_the_app_role_and_feed_the_backends() -> None:
    main = parsed("main.bicep")
    assert main["parameters"]["openAiExtraRegions"]["default"] == []
    assert bicepparam()["openAiExtraRegions"] == []
    modules = main["modules"]
    for symbol in ("openAiExtra", "openAiExtraAppRoles", "openAiExtraDeployerRoles"):
        assert modules[symbol]["config"]["loop_type"]["detail"]["array_name"] == "openAiExtraRegions"
    assert body(modules["openAiExtra"])["params"]["modelDeployments"] == "modelDeployments"
    app = body(modules["openAiExtraAppRoles"])["params"]
    assert app["principalType"] == "ServicePrincipal" and app["assignments"] == "openAiAppRoles"
    assert json.dumps(main["variables"]["openAiAppRoles"]).count('"appRoles"') == 1  # the app's own openAi roles
    deployer = modules["openAiExtraDeployerRoles"]
    assert body(deployer)["params"]["assignments"] == "deployerModelRoles"
    assert "deployerCanCallModels" in json.dumps(deployer["config"]["condition"])
    # The app's backends: the first account, then one per extra region, from the modules' outputs.
    extra = body(modules["functionApp"])["params"]["openAiExtraBackends"]
    assert extra["loop_type"]["detail"]["array_name"] == "openAiExtraRegions"
    assert set(extra["config"]) == {"name", "endpoint", "priority", "weight"}
    assert "openAiExtra" in json.dumps(extra["config"]["endpoint"])
    assert function_app_settings()["AZURE_OPENAI_BACKENDS"]["function"]["type"] == "string"


def test_storage_is_entra_id_only_with_the_tables_the_code_uses() -> None:
    account = only_resource("modules/storage.bicep", "Microsoft.Storage/storageAccounts")["properties"]
    assert account["allowSharedKeyAccess"] is False
    assert account["allowBlobPublicAccess"] is False
    assert account["minimumTlsVersion"] == "TLS1_2"
    assert account["supportsHttpsTrafficOnly"] is True
    parameters = parsed("modules/storage.bicep")["parameters"]
    assert tuple(parameters["tableNames"]["default"]) == TABLE_NAMES  # the tables the code reads and writes
    tables = only_resource("modules/storage.bicep", "Microsoft.Storage/storageAccounts/tableServices/tables")
    assert tables["name"] == "tableName"
    assert parameters["deploymentContainerName"]["default"] == "deployments"


def test_openai_has_local_auth_off() -> None:
    account = only_resource("modules/openai.bicep", "Microsoft.CognitiveServices/accounts")
    assert account["properties"]["disableLocalAuth"] is True
    assert account["properties"]["customSubDomainName"] == "name"


def test_app_insights_has_local_auth_off() -> None:
    insights = only_resource("modules/monitoring.bicep", "Microsoft.Insights/components")
    assert insights["properties"]["DisableLocalAuth"] is True
    assert insights["properties"]["WorkspaceResourceId"]["operator"]["operands"]["operand_2"] == "id"


# (8) checkov passes.


def test_checkov_passes() -> None:
    _require("checkov")
    env = dict(os.environ, BC_SKIP_MAPPING="TRUE", LOG_LEVEL="ERROR")
    command = [sys.executable, "-m", "checkov.main", "-d", "infra", "--framework", "bicep"]
    command += ["--quiet", "--compact", "-o", "json", "--skip-download", "--skip-path", "infra/modules/checks.bicep"]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    try:
        report = json.loads(result.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"checkov printed no JSON (exit {result.returncode}):\n{result.stdout}\n{result.stderr}")
    reports = report if isinstance(report, list) else [report]
    summary = next(r["summary"] for r in reports if r.get("check_type") == "bicep")
    failed = [
        f"{c['check_id']} {c['resource']} ({c['file_path']}): {c['check_name']}"
        for r in reports
        for c in r.get("results", {}).get("failed_checks", [])
    ]
    assert not failed, "checkov failed:\n" + "\n".join(failed)
    assert summary["parsing_errors"] == 0
    assert summary["passed"] > 0 and summary["resource_count"] > 0, summary
    assert result.returncode == 0, result.stderr


def test_every_checkov_skip_gives_a_reason() -> None:
    skips = [
        (path.name, match.group(1), (match.group(2) or "").strip())
        for path in BICEP_FILES
        for match in re.finditer(r"checkov:skip=([A-Z0-9_]+)(?::(.*))?", path.read_text())
    ]
    assert skips, "expected the skips documented in the modules"
    unexplained = [(name, check) for name, check, reason in skips if len(reason) < 20]
    assert not unexplained


# (6) .funcignore and the package.

MUST_SHIP = ("function_app.py", "host.json", "requirements.txt", "proxy/__init__.py", "proxy/config/settings.py")
MUST_NOT_SHIP = (
    "tests/test_infra.py",
    "infra/main.bicep",
    "infra/modules/roles.bicep",
    "devtools/deploy/package.py",
    "bench/run.py",
    ".ci/check.sh",
    ".venv/lib/python3.11/site-packages/x.py",
    "node_modules/x/index.js",
    ".gitignore",
    ".github/workflows/ci.yml",
    "local.settings.json",
    "local.settings.example.json",
    "proxy/__pycache__/settings.cpython-311.pyc",
    ".pytest_cache/v/cache",
    ".mypy_cache/3.11/x.json",
    ".ruff_cache/x",
    "Makefile",
    "package.json",
    "package-lock.json",
    "pyproject.toml",
    "README.md",
    "dist/app.zip",
)


def funcignore_rules() -> list[Any]:
    return parse_ignore((ROOT / ".funcignore").read_text())


def repo_files() -> list[str]:
    skip = {".git", ".venv", "node_modules"}
    return sorted(
        p.relative_to(ROOT).as_posix()
        for p in ROOT.rglob("*")
        if p.is_file() and not skip & set(p.relative_to(ROOT).parts)
    )


def test_funcignore_keeps_the_app_and_drops_the_rest() -> None:
    rules = funcignore_rules()
    shipped = [path for path in MUST_SHIP if is_ignored(path, rules)]
    assert not shipped, f".funcignore drops {shipped}"
    leaked = [path for path in MUST_NOT_SHIP if not is_ignored(path, rules)]
    assert not leaked, f".funcignore lets through {leaked}"
    # The same over what the repository holds today.
    files = repo_files()
    dev_only = ("tests/", "infra/", "devtools/", "bench/", ".ci/")
    assert not [path for path in files if path.startswith(dev_only) and not is_ignored(path, rules)]
    app_code = [path for path in files if path.startswith("proxy/") and path.endswith(".py")]
    assert app_code and not [path for path in app_code if is_ignored(path, rules)]


def test_ignore_matching_agrees_with_pathspec() -> None:
    pathspec = pytest.importorskip("pathspec", reason="pathspec is optional; it only cross-checks the matcher")
    spec = pathspec.GitIgnoreSpec.from_lines((ROOT / ".funcignore").read_text().splitlines())
    rules = funcignore_rules()
    for path in sorted(set(MUST_SHIP) | set(MUST_NOT_SHIP) | set(repo_files())):
        assert is_ignored(path, rules) == spec.match_file(path), path


def test_ignore_rules_follow_gitignore_semantics() -> None:
    rules = parse_ignore("# comment\n\nlogs/\n/build\n*.log\n!keep.log\ndocs/*.txt\n")
    assert is_ignored("logs/a.txt", rules) and is_ignored("src/logs/a.txt", rules)
    assert not is_ignored("logs", rules)  # a file named like the directory rule
    assert is_ignored("build/x", rules) and not is_ignored("src/build", rules)
    assert is_ignored("a.log", rules) and is_ignored("src/a.log", rules)
    assert not is_ignored("keep.log", rules) and not is_ignored("src/keep.log", rules)
    assert is_ignored("docs/a.txt", rules) and not is_ignored("src/docs/a.txt", rules)
    assert is_ignored("logs/keep.log", rules)  # a negation cannot reach into an ignored directory


def test_package_builds_a_zip_honouring_funcignore(tmp_path: Path) -> None:
    app = tmp_path / "app"
    for path in MUST_SHIP + MUST_NOT_SHIP:
        target = app / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(f"# {path}\n")
    (app / ".funcignore").write_text((ROOT / ".funcignore").read_text())
    output = app / "dist" / "app.zip"
    output.unlink()
    count, size = build(app, output)
    with zipfile.ZipFile(output) as archive:
        names = sorted(archive.namelist())
        assert archive.read("proxy/config/settings.py") == b"# proxy/config/settings.py\n"
    assert names == sorted(MUST_SHIP)
    assert count == len(MUST_SHIP) and size == output.stat().st_size
    assert sorted(package_files(app, funcignore_rules())) == sorted(MUST_SHIP)


def test_package_refuses_a_directory_without_the_app(tmp_path: Path) -> None:
    (tmp_path / "host.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"function_app\.py, requirements\.txt"):
        build(tmp_path, tmp_path / "dist" / "app.zip")
    assert not (tmp_path / "dist").exists()


def test_package_command_prints_count_and_size(tmp_path: Path) -> None:
    for path in MUST_SHIP:
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("x\n")
    (tmp_path / ".funcignore").write_text((ROOT / ".funcignore").read_text())
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "devtools.deploy.package",
            "--root",
            str(tmp_path),
            "--output",
            str(tmp_path / "out.zip"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(r".*out\.zip: 5 files, \d+\.\d KiB\n", result.stdout), result.stdout
