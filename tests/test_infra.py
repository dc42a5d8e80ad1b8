"""Checks on the Bicep under infra/, the deployment package rules and the packaging script.

No Azure here and no Bicep compiler: the templates are parsed with pycep and scanned with
checkov, and what they set is compared with what the code reads (proxy/settings.py).
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
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from devtools.package import build, is_ignored, package_files, parse_ignore
from proxy.settings import APP_SETTINGS, HOST_SETTINGS

ROOT = Path(__file__).resolve().parent.parent
INFRA = ROOT / "infra"
BICEP_FILES = sorted(INFRA.rglob("*.bicep"))

# The tables the code reads and writes. proxy.storage will export these as TABLE_NAMES;
# until it exists they are spelled out here.
EXPECTED_TABLES = ("proxyevents", "proxyusage", "proxyrequests")

# Settings the app reads that the Bicep must not set in Azure: the API key and connection
# string are for local runs (Azure uses the managed identity), and the three limits have
# defaults in proxy/settings.py that suit Azure.
LOCAL_ONLY_OR_OPTIONAL = {
    "AZURE_OPENAI_API_KEY",
    "STORAGE_CONNECTION_STRING",
    "MAX_REQUEST_BYTES",
    "UPSTREAM_TIMEOUT_SECONDS",
    "EVENT_CACHE_SECONDS",
}

# On Flex Consumption these live in functionAppConfig.runtime; as app settings they make
# the deployment fail.
NOT_ON_FLEX = {"FUNCTIONS_EXTENSION_VERSION", "FUNCTIONS_WORKER_RUNTIME"}

FUNCTION_APP_OUTPUTS = {"AZURE_FUNCTION_APP_NAME", "AZURE_FUNCTION_APP_URL"}

ROLE_IDS = {
    "Cognitive Services OpenAI User": "5e0bd9bd-7b93-4f28-af87-19fc36ad61bd",
    "Storage Table Data Contributor": "0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3",
    "Storage Blob Data Owner": "b7e6dc6d-f1e8-4753-8033-0f4cdb15b2fe",
    "Monitoring Metrics Publisher": "3913510d-42f4-4e42-8a64-420c390055eb",
}


def _require(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        pytest.fail(f"{module} is not installed: pip install -r requirements-dev.txt")


@cache
def parsed(relative: str) -> dict[str, Any]:
    """The pycep parse of ``infra/<relative>``."""
    _require("pycep")
    from pycep import BicepParser

    # pycep's BicepJson is a TypedDict; the tests index it freely.
    return dict(BicepParser().parse(file_path=INFRA / relative))


def body(resource: dict[str, Any]) -> dict[str, Any]:
    """A resource's or module's properties, under the loop or condition wrapper if any."""
    config: dict[str, Any] = resource["config"]
    if "loop_type" in config or "condition" in config:
        inner: dict[str, Any] = config["config"]
        return inner
    return config


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


def function_app_settings() -> dict[str, Any]:
    app = only_resource("modules/functionapp.bicep", "Microsoft.Web/sites")
    entries = app["properties"]["siteConfig"]["appSettings"]
    names = [entry["name"] for entry in entries]
    assert len(names) == len(set(names)), f"app settings set twice: {names}"
    return {entry["name"]: entry["value"] for entry in entries}


# (1) Every file parses.


@pytest.mark.parametrize("path", BICEP_FILES, ids=lambda p: str(p.relative_to(INFRA)))
def test_bicep_file_parses(path: Path) -> None:
    result = parsed(str(path.relative_to(INFRA)))
    assert result.get("resources") or result.get("modules"), f"{path} declares nothing"


def test_infra_has_main_and_the_modules() -> None:
    names = {str(p.relative_to(INFRA)) for p in BICEP_FILES}
    expected = {"main.bicep"} | {
        f"modules/{m}.bicep" for m in ("storage", "openai", "functionapp", "monitoring", "roles")
    }
    assert expected <= names
    wired = {m["detail"]["path"] for m in parsed("main.bicep")["modules"].values()}
    assert wired == expected - {"main.bicep"}


def test_bicepparam_sets_only_parameters_of_main() -> None:
    text = (INFRA / "main.bicepparam").read_text()
    assert re.search(r"^using '\./main\.bicep'\s*$", text, re.MULTILINE)
    assigned = set(re.findall(r"^param\s+(\w+)\s*=", text, re.MULTILINE))
    main_parameters = set(parsed("main.bicep")["parameters"])
    assert assigned <= main_parameters
    # The CLI can override (-p organizerKey=...) only the parameters the file sets.
    assert {"organizerKey", "deployerPrincipalId"} <= assigned


# (2) checkov passes.


def test_checkov_passes() -> None:
    _require("checkov")
    env = dict(os.environ, BC_SKIP_MAPPING="TRUE", LOG_LEVEL="ERROR")
    command = [sys.executable, "-m", "checkov.main", "-d", "infra", "--framework", "bicep"]
    command += ["--quiet", "--compact", "-o", "json", "--skip-download"]
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


# (3) App settings match proxy/settings.py.


def test_function_app_sets_only_known_settings() -> None:
    unknown = set(function_app_settings()) - set(APP_SETTINGS) - set(HOST_SETTINGS)
    assert not unknown, f"not in APP_SETTINGS or HOST_SETTINGS of proxy/settings.py: {sorted(unknown)}"


def test_function_app_sets_every_setting_the_app_needs_in_azure() -> None:
    needed = (set(APP_SETTINGS) - LOCAL_ONLY_OR_OPTIONAL) | (set(HOST_SETTINGS) - NOT_ON_FLEX)
    missing = needed - set(function_app_settings())
    assert not missing, f"the function app does not set {sorted(missing)}"


def test_function_app_uses_identities_not_keys() -> None:
    settings = function_app_settings()
    assert not (NOT_ON_FLEX | LOCAL_ONLY_OR_OPTIONAL) & set(settings)
    assert settings["AzureWebJobsStorage__credential"] == "managedidentity"
    assert settings["APPLICATIONINSIGHTS_AUTHENTICATION_STRING"] == "ClientId=${identityClientId};Authorization=AAD"
    assert settings["AZURE_CLIENT_ID"] == settings["AzureWebJobsStorage__clientId"] == "identityClientId"
    assert settings["PYTHON_ENABLE_INIT_INDEXING"] == "1"
    assert settings["ORGANIZER_KEY"] == "organizerKey"
    organizer_key = parsed("modules/functionapp.bicep")["parameters"]["organizerKey"]
    assert {"type": "secure"} in organizer_key["decorators"]
    api_version = parsed("modules/functionapp.bicep")["parameters"]["openAiApiVersion"]
    assert api_version["default"] == "2024-10-21"


def test_function_app_is_flex_consumption_python() -> None:
    plan = resources_of("modules/functionapp.bicep", "Microsoft.Web/serverfarms")[0]
    assert body(plan)["sku"] == {"name": "FC1", "tier": "FlexConsumption"}
    assert body(plan)["kind"] == "functionapp"
    assert body(plan)["properties"]["reserved"] is True
    app = only_resource("modules/functionapp.bicep", "Microsoft.Web/sites")
    assert app["kind"] == "functionapp,linux"
    assert app["identity"]["type"] == "UserAssigned"
    properties = app["properties"]
    assert properties["httpsOnly"] is True
    assert properties["siteConfig"]["minTlsVersion"] == "1.2"
    assert properties["siteConfig"]["ftpsState"] == "Disabled"
    config = properties["functionAppConfig"]
    assert config["runtime"] == {"name": "python", "version": "3.11"}
    assert config["deployment"]["storage"]["type"] == "blobContainer"
    assert config["deployment"]["storage"]["authentication"]["type"] == "UserAssignedIdentity"
    assert set(config["scaleAndConcurrency"]) == {"maximumInstanceCount", "instanceMemoryMB"}


# (4) Outputs.


def test_outputs_are_named_like_the_settings() -> None:
    outputs = set(parsed("main.bicep")["outputs"])
    assert outputs <= set(APP_SETTINGS) | set(HOST_SETTINGS) | FUNCTION_APP_OUTPUTS
    expected = FUNCTION_APP_OUTPUTS | {"AZURE_OPENAI_ENDPOINT", "STORAGE_TABLE_ENDPOINT", "AZURE_CLIENT_ID"}
    assert outputs == expected


def test_no_output_reveals_the_organizer_key() -> None:
    main_parameters = parsed("main.bicep")["parameters"]
    assert {"type": "secure"} in main_parameters["organizerKey"]["decorators"]
    for path in BICEP_FILES:
        outputs = parsed(str(path.relative_to(INFRA))).get("outputs", {})
        for name, output in outputs.items():
            assert "organizer" not in name.lower(), f"{path.name}: output {name}"
            text = json.dumps(output["value"]).lower()
            assert "organizer" not in text, f"{path.name}: output {name} uses the organizer key"


# (5) Roles and identity-only access.


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


def test_identity_and_deployer_get_the_roles() -> None:
    main = parsed("main.bicep")
    role_ids = main["variables"]["roleIds"]["value"]
    assert set(role_ids.values()) == set(ROLE_IDS.values())
    modules = {body(m)["name"]: m for m in main["modules"].values() if m["detail"]["path"] == "modules/roles.bicep"}
    app, deployer = body(modules["roles-app"]), body(modules["roles-deployer"])
    assert app["params"]["principalType"] == "ServicePrincipal"
    assert deployer["params"]["principalType"] == "User"
    assert deployer["params"]["principalId"] == "deployerPrincipalId"
    condition = json.dumps(modules["roles-deployer"]["config"]["condition"])
    assert '"empty"' in condition and "deployerPrincipalId" in condition
    assert main["parameters"]["deployerPrincipalId"]["default"] == ""
    # The deployer gets the data roles; the identity gets those and the telemetry role.
    assert app["params"]["assignments"] == "appRoles"
    assert deployer["params"]["assignments"] == "dataRoles"
    data_roles = json.dumps(main["variables"]["dataRoles"]["value"])
    app_roles = json.dumps(main["variables"]["appRoles"]["value"])
    for key in ("cognitiveServicesOpenAiUser", "storageTableDataContributor", "storageBlobDataOwner"):
        assert key in data_roles
    assert "monitoringMetricsPublisher" not in data_roles
    assert "dataRoles" in app_roles and "monitoringMetricsPublisher" in app_roles


def test_storage_is_entra_id_only_with_the_tables_the_code_uses() -> None:
    account = only_resource("modules/storage.bicep", "Microsoft.Storage/storageAccounts")["properties"]
    assert account["allowSharedKeyAccess"] is False
    assert account["allowBlobPublicAccess"] is False
    assert account["minimumTlsVersion"] == "TLS1_2"
    assert account["supportsHttpsTrafficOnly"] is True
    parameters = parsed("modules/storage.bicep")["parameters"]
    assert tuple(parameters["tableNames"]["default"]) == EXPECTED_TABLES
    tables = only_resource("modules/storage.bicep", "Microsoft.Storage/storageAccounts/tableServices/tables")
    assert tables["name"] == "tableName"
    assert parameters["deploymentContainerName"]["default"] == "deployments"


def test_openai_has_local_auth_off_and_deploys_models_one_at_a_time() -> None:
    account = only_resource("modules/openai.bicep", "Microsoft.CognitiveServices/accounts")
    assert account["kind"] == "OpenAI"
    assert account["sku"] == {"name": "S0"}
    assert account["properties"]["disableLocalAuth"] is True
    assert account["properties"]["customSubDomainName"] == "name"
    (deployments,) = resources_of("modules/openai.bicep", "Microsoft.CognitiveServices/accounts/deployments")
    assert {"type": "batchSize", "argument": 1} in deployments["decorators"]
    models = parsed("main.bicep")["parameters"]["modelDeployments"]["default"]
    assert [(m["name"], m["model"], m["version"], m["skuName"], m["capacity"]) for m in models] == [
        ("gpt-4o-mini", "gpt-4o-mini", "2024-07-18", "GlobalStandard", 10),
        ("text-embedding-3-small", "text-embedding-3-small", "1", "Standard", 10),
    ]


def test_app_insights_has_local_auth_off() -> None:
    insights = only_resource("modules/monitoring.bicep", "Microsoft.Insights/components")
    assert insights["properties"]["DisableLocalAuth"] is True
    assert insights["properties"]["WorkspaceResourceId"]["operator"]["operands"]["operand_2"] == "id"


# (6) .funcignore and the package.

MUST_SHIP = ("function_app.py", "host.json", "requirements.txt", "proxy/__init__.py", "proxy/settings.py")
MUST_NOT_SHIP = (
    "tests/test_infra.py",
    "infra/main.bicep",
    "infra/modules/roles.bicep",
    "devtools/package.py",
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
        assert archive.read("proxy/settings.py") == b"# proxy/settings.py\n"
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
        [sys.executable, "-m", "devtools.package", "--root", str(tmp_path), "--output", str(tmp_path / "out.zip")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(r".*out\.zip: 5 files, \d+\.\d KiB\n", result.stdout), result.stdout
