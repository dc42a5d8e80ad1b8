"""What a Bicep compiler, and Azure, would refuse in ``infra/``, checked without either.

``devtools.deploy.bicep_check`` resolves every name and checks every resource against Azure's
published types (tests/data/bicep_types.json, copied from Azure/bicep-types-az at a named
commit). Two rules no compiler knows are checked here, from tests/data/azure_sources.json:
a role is granted only on a resource its permissions act on, and the Python version is one
Azure Functions still supports a month from now. Each rule is shown to catch a broken copy of
``infra/`` with a message naming the file and line.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import pytest

from devtools.deploy.bicep_check import check
from devtools.deploy.bicep_eval import DeploymentFailed, evaluate
from devtools.deploy.bicep_parse import Node, parse
from devtools.deploy.bicep_types import TYPES, TYPES_FILE, Types

ROOT = Path(__file__).resolve().parent.parent
INFRA = ROOT / "infra"
SOURCES = json.loads((ROOT / "tests" / "data" / "azure_sources.json").read_text())
SUPPORT_MARGIN = timedelta(days=30)


def _objects(node: Any) -> Iterator[Node]:
    if isinstance(node, Node):
        if node.kind == "object":
            yield node
        for part in node.parts:
            if isinstance(part, tuple):
                yield from _objects(part[2])
            else:
                yield from _objects(part)


def _fields(node: Node) -> dict[str, Node]:
    return {key: value for key, _, value in node.parts if isinstance(key, str)}


def role_scope_problems(infra: Path) -> list[str]:
    """Each ``{scope, roleId}`` of main.bicep names a resource on which that role's data actions act."""
    roles = {r["id"]: r for r in SOURCES["roles"]}
    main = parse(infra / "main.bicep", name="infra/main.bicep")
    role_ids = {key: value.value for key, _, value in main.of("var")["roleIds"].value.parts}  # type: ignore[union-attr]
    # roles.bicep: the loop that grants assignments whose scope is 'storage' is scoped to an existing storage account.
    module = parse(infra / "modules" / "roles.bicep")
    existing = {d.name: d.type_text.split("@")[0] for d in module.of("resource").values() if d.existing}
    scope_types = {}
    for declaration in module.of("resource").values():
        loop = declaration.value
        if loop is None or loop.kind != "for" or loop.parts[1].kind != "if":
            continue
        condition, body = loop.parts[1].parts
        key = condition.parts[1].value if condition.kind == "binary" else None
        target = _fields(body).get("scope")
        if key and target is not None and target.value in existing:
            scope_types[key] = existing[target.value]
    problems = []
    for variable in main.of("var").values():
        for grant in _objects(variable.value):
            fields = _fields(grant)
            if set(fields) != {"scope", "roleId"} or fields["roleId"].kind != "member":
                continue
            role = roles[role_ids[fields["roleId"].value]]
            scope = fields["scope"].value
            resource_type = scope_types.get(scope, f"no resource for scope '{scope}' in roles.bicep")
            if not resource_type.lower().startswith(role["data_actions_provider"].lower() + "/"):
                problems.append(
                    f"infra/main.bicep:{grant.line}: {role['name']} is granted on {scope} ({resource_type}), but "
                    f"its data actions are {role['data_actions_provider']}'s ({role['data_actions']}): it would "
                    "grant nothing there"
                )
    return problems


def runtime_problems(infra: Path, today: date) -> list[str]:
    """The function app's Python is one Flex Consumption runs and Functions supports a month from ``today``."""
    runtimes = SOURCES["flex_consumption"]["runtimes"]
    text = (infra / "modules" / "functionapp.bicep").read_text()
    match = re.search(r"runtime: \{\s*name: 'python'\s*version: '([^']+)'", text)
    if match is None:
        return ["infra/modules/functionapp.bicep:1: no python runtime in functionAppConfig"]
    version = match.group(1)
    line = text.count("\n", 0, match.start(1)) + 1
    where = f"infra/modules/functionapp.bicep:{line}"
    if version not in runtimes["python"]:
        return [f"{where}: Python {version} is not a Flex Consumption runtime ({', '.join(runtimes['python'])})"]
    ends = date.fromisoformat(runtimes["python_end_of_support"][version])
    if ends <= today + SUPPORT_MARGIN:
        return [
            f"{where}: Python {version} is out of support on {ends} (Functions follows Python's end of life: "
            f"{runtimes['support_policy_url']}); use {max(runtimes['python_end_of_support'])}"
        ]
    return []


def all_problems(infra: Path, today: date) -> list[str]:
    return [str(p) for p in check(infra)] + role_scope_problems(infra) + runtime_problems(infra, today)


def test_the_types_are_azures_for_every_type_infra_uses() -> None:
    data = json.loads(TYPES_FILE.read_text())
    assert data["repository"] == "https://github.com/Azure/bicep-types-az"
    assert re.fullmatch(r"[0-9a-f]{40}", data["commit"])
    assert set(data["resources"]) == set(TYPES)
    assert TYPES_FILE.stat().st_size < 512 * 1024
    used = {
        declaration.type_text for path in INFRA.rglob("*.bicep") for declaration in parse(path).of("resource").values()
    }
    assert used == set(TYPES), "every type infra/ uses, and only those, is in the subset"
    # The sources file's API versions and the types agree.
    sourced = {(e["type"].lower(), v) for e in SOURCES["api_versions"] for v in e["versions"]}
    assert {(t.split("@")[0].lower(), t.split("@")[1]) for t in used} <= sourced
    body = Types.load().body("Microsoft.Web/sites@2024-04-01")
    assert body is not None and "functionAppConfig" in json.dumps(
        data["types"][body["properties"]["properties"]["type"]]
    )


def test_infra_has_no_problem() -> None:
    assert all_problems(INFRA, date.today()) == []


# The five changes a review slipped past the earlier tests, and a few more of the same kind.
MUTATIONS = {
    "undefined symbol": (
        "main.bicep", "'${prefix}-id-${suffix}'", "'${prefx}-id-${suffix}'",
        "infra/main.bicep:{line}: 'prefx' is not declared",
    ),
    "module output that does not exist": (
        "main.bicep", "openAiEndpoint: openAi.outputs.endpoint", "openAiEndpoint: openAi.outputs.endpointUrl",
        "infra/main.bicep:{line}: module 'openAi' has no output 'endpointUrl' (modules/openai.bicep declares: "
        "endpoint, name)",
    ),
    "invalid property dependsOnX": (
        "main.bicep", "  dependsOn: [\n    appRoleAssignments", "  dependsOnX: [\n    appRoleAssignments",
        "infra/main.bicep:{line}: module 'functionApp': 'dependsOnX' is not a module property (dependsOn, name, "
        "params, scope)",
    ),
    "Monitoring Metrics Publisher on the storage account": (
        "main.bicep", "{ scope: 'appInsights', roleId: roleIds.monitoringMetricsPublisher }",
        "{ scope: 'storage', roleId: roleIds.monitoringMetricsPublisher }",
        "infra/main.bicep:{line}: Monitoring Metrics Publisher is granted on storage "
        "(Microsoft.Storage/storageAccounts), but its data actions are Microsoft.Insights's "
        "(Microsoft.Insights/Metrics/Write, Microsoft.Insights/Telemetry/Write): it would grant nothing there",
    ),
    "Python 3.10": (
        "modules/functionapp.bicep", "version: '3.11'", "version: '3.10'",
        "infra/modules/functionapp.bicep:{line}: Python 3.10 is out of support on 2026-10-31 (Functions follows "
        "Python's end of life: https://learn.microsoft.com/en-us/azure/azure-functions/language-support-policy); "
        "use 3.12",
    ),
    "dependsOnX on a resource": (
        "modules/storage.bicep", "  parent: account\n  name: 'default'\n  properties: {",
        "  parent: account\n  name: 'default'\n  dependsOnX: []\n  properties: {",
        "infra/modules/storage.bicep:{line}: Microsoft.Storage/storageAccounts/blobServices@2024-01-01 has no "
        "property 'dependsOnX' (it has: name, properties)",
    ),
    "misspelt nested property": (
        "modules/functionapp.bicep", "        maximumInstanceCount: maximumInstanceCount",
        "        maximumInstanceCountX: maximumInstanceCount",
        "infra/modules/functionapp.bicep:{line}: Microsoft.Web/sites@2024-04-01.properties.functionAppConfig."
        "scaleAndConcurrency has no property 'maximumInstanceCountX' (it has: alwaysReady, instanceMemoryMB, "
        "maximumInstanceCount, triggers)",
    ),
    "property read that the type lacks": (
        "modules/functionapp.bicep", "${storage.properties.primaryEndpoints.blob}",
        "${storage.properties.primaryEndpoint.blob}",
        "infra/modules/functionapp.bicep:{line}: storage.properties (Microsoft.Storage/storageAccounts@2024-01-01) "
        "has no property 'primaryEndpoint'",
    ),
    "API version Azure does not publish": (
        "modules/openai.bicep", "'Microsoft.CognitiveServices/accounts@2024-10-01' = {",
        "'Microsoft.CognitiveServices/accounts@2024-10-31' = {",
        "infra/modules/openai.bicep:{line}: resource 'account': Azure publishes no API version 2024-10-31 for "
        "Microsoft.CognitiveServices (its latest: ",
    ),
    "API version Azure publishes, not kept here": (
        "modules/openai.bicep", "'Microsoft.CognitiveServices/accounts@2024-10-01' = {",
        "'Microsoft.CognitiveServices/accounts@2023-05-01' = {",
        "infra/modules/openai.bicep:{line}: resource 'account': Microsoft.CognitiveServices/accounts@2023-05-01 is "
        "not in bicep_types.json: add it to TYPES in devtools/deploy/bicep_types.py and rebuild the file with "
        "--extract",
    ),
    "module parameter it does not declare": (
        "main.bicep", "    name: names.openAi\n    location: location\n",
        "    name: names.openAi\n    sku: 'S0'\n    location: location\n",
        "infra/main.bicep:{line}: module 'openAi': modules/openai.bicep has no parameter 'sku'",
    ),
    "literal a property does not allow": (
        "modules/storage.bicep", "publicAccess: 'None'", "publicAccess: 'Private'",
        "infra/modules/storage.bicep:{line}: Microsoft.Storage/storageAccounts/blobServices/containers@2024-01-01"
        ".properties.publicAccess is 'Private', not one of Blob, Container, None",
    ),
}  # fmt: skip


@pytest.mark.parametrize("mutation", MUTATIONS, ids=list(MUTATIONS))
def test_a_broken_template_fails_with_file_and_line(mutation: str, tmp_path: Path) -> None:
    relative, before, after, expected = MUTATIONS[mutation]
    scratch = tmp_path / "infra"
    shutil.copytree(INFRA, scratch)
    path = scratch / relative
    text = path.read_text()
    assert text.count(before) == 1, f"the mutation no longer applies to infra/{relative}: update it"
    mutated = text.replace(before, after)
    path.write_text(mutated)
    # The line expected is the one that changed (the first line of the change that differs).
    start = text.index(before)
    changed = next(i for i, (a, b) in enumerate(zip(before.splitlines(), after.splitlines(), strict=False)) if a != b)
    line = text.count("\n", 0, start) + 1 + changed
    problems = all_problems(scratch, date(2026, 12, 3))
    print("\n".join(problems))
    assert any(problem.startswith(expected.format(line=line)) for problem in problems), (line, problems)
    assert len(problems) == 1, problems  # nothing else reported: the checks are precise


# Settings the app refuses at start are refused by the template first (infra/modules/checks.bicep).

CHECK_DEFAULTS = {"location": "eastus2", "openAiExtraRegions": [], "organizerEntraClientId": "",
                  "organizerEntraObjectIds": "", "organizerEntraGroupIds": "",
                  "organizerEntraAdminObjectIds": "", "organizerEntraAdminGroupIds": "",
                  "organizerEntraViewerObjectIds": "", "organizerEntraViewerGroupIds": ""}  # fmt: skip


@pytest.mark.parametrize(
    ("given", "refusal"),
    [
        ({"openAiExtraRegions": ["swedencentral", "EastUS2"]}, "openAiExtraRegions lists eastus2, the region"),
        ({"openAiExtraRegions": ["swedencentral", "swedencentral"]}, "openAiExtraRegions lists a region twice"),
        ({"organizerEntraClientId": "c1d", "organizerEntraObjectIds": " , "},
         "organizerEntraClientId (ORGANIZER_ENTRA_CLIENT_ID) is set, but organizerEntraObjectIds, "
         "organizerEntraGroupIds and their Admin and Viewer twins (ORGANIZER_ENTRA_OBJECT_IDS, "
         "ORGANIZER_ENTRA_GROUP_IDS, ORGANIZER_ENTRA_ADMIN_..., ORGANIZER_ENTRA_VIEWER_...) are all empty"),
        ({"openAiExtraRegions": ["westus"], "organizerEntraClientId": "c1d", "organizerEntraGroupIds": "g"}, None),
        ({"organizerEntraClientId": "c1d", "organizerEntraAdminObjectIds": "a"}, None),
        ({"organizerEntraClientId": "c1d", "organizerEntraViewerGroupIds": "v"}, None),
        ({}, None),
    ],
)  # fmt: skip
def test_the_template_refuses_what_the_app_would_refuse(given: dict[str, Any], refusal: str | None) -> None:
    """checks.bicep's own expressions, evaluated as Resource Manager would: the value, or fail()'s message."""
    checks = parse(INFRA / "modules" / "checks.bicep")
    parameters = {**CHECK_DEFAULTS, **given}
    if refusal is None:
        outputs = evaluate(checks, parameters)
        assert outputs["openAiExtraRegions"] == parameters["openAiExtraRegions"]
        assert outputs["organizerEntraClientId"] == parameters["organizerEntraClientId"]
    else:
        with pytest.raises(DeploymentFailed) as failed:
            evaluate(checks, parameters)
        assert str(failed.value).startswith(refusal), failed.value


def test_everything_waits_for_the_checks_and_takes_the_checked_values() -> None:
    main = parse(INFRA / "main.bicep")
    text = (INFRA / "main.bicep").read_text()
    assert main.of("module")["checks"].type_text == "modules/checks.bicep"
    assert "organizerEntraClientId: checks.outputs.organizerEntraClientId" in text
    assert "location: checks.outputs.openAiExtraRegions[i]" in text
    for name, declaration in {**main.of("resource"), **main.of("module")}.items():
        if name == "checks":
            continue
        body = declaration.value
        while body is not None and body.kind in ("for", "if"):
            body = body.parts[1]
        source = json.dumps(body, default=lambda n: {"kind": n.kind, "value": n.value, "parts": n.parts})
        waits = '"value": "checks"' in source  # dependsOn: [checks], or a checks output read
        chained = any(f'"value": "{other}"' in source for other in ("identity", "storage", "openAi", "monitoring"))
        assert waits or chained, f"infra/main.bicep:{declaration.line}: {name} does not wait for the checks"


def test_the_app_names_the_same_settings() -> None:
    from proxy.config.settings import Settings, SettingsError

    base = {"STORAGE_CONNECTION_STRING": "UseDevelopmentStorage=true", "AZURE_OPENAI_ENDPOINT": "https://a.example"}
    with pytest.raises(SettingsError, match="ORGANIZER_ENTRA_OBJECT_IDS, ORGANIZER_ENTRA_GROUP_IDS"):
        Settings.from_env({**base, "ORGANIZER_TRUST_APP_SERVICE_AUTH": "true"})
    twice = [{"name": "eastus2", "endpoint": "https://a.example"}, {"name": "eastus2", "endpoint": "https://b.example"}]
    with pytest.raises(SettingsError, match="AZURE_OPENAI_BACKENDS names backends twice: eastus2"):
        Settings.from_env({**base, "AZURE_OPENAI_BACKENDS": json.dumps(twice)})
