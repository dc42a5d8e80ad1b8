"""``python -m devtools.deploy`` against a fake ``az`` on PATH, and the real app on loopback.

The real CLI cannot reach Azure from here, so ``az`` is a small script that records
its arguments (and whether the secrets reached it through the environment, never the
arguments) and answers like the real CLI: JSON on stdout, ``ERROR: ...`` on stderr
with a non-zero exit. The deployment's outputs point at the app the other tests use
(tests/conftest.py), so the health wait and the doctor run for real.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.support import ORGANIZER_KEY, ROOT

SUBSCRIPTION = "00000000-0000-0000-0000-0000000000aa"
USER_ID = "11111111-2222-3333-4444-555555555555"
OWNER = "8e3af657-a8ff-443c-a75c-2fe8c4bcb635"
READER = "acdd72a7-3385-48ef-bd42-f606fba81ae7"

FAKE_AZ = r'''#!{python}
"""A stand-in for the az CLI: records argv, answers from the scenario in $FAKE_AZ_STATE."""
import json, os, sys, zipfile

state_path = os.environ["FAKE_AZ_STATE"]
state = json.load(open(state_path))
argv = sys.argv[1:]
record = {{"argv": argv}}
if os.environ.get("ORGANIZER_KEY"):
    record["env"] = {{
        "ORGANIZER_KEY": "set" if os.environ["ORGANIZER_KEY"] == state["expected_key"] else "other",
        "DEPLOYER_PRINCIPAL_ID": os.environ.get("DEPLOYER_PRINCIPAL_ID"),
    }}
with open(state["log"], "a") as log:
    log.write(json.dumps(record) + "\n")

def answer(value):
    print(json.dumps(value) if "json" in argv else value)
    sys.exit(0)

def fail(message, code=1):
    print("ERROR: " + message, file=sys.stderr)
    sys.exit(code)

words = [a for a in argv if not a.startswith("-")]
if argv[:2] == ["account", "show"]:
    if not state["logged_in"]:
        fail("Please run 'az login' to setup account.")
    user = {{"name": "organizer@example.com", "type": "user"}}
    answer({{"id": state["subscription"], "name": "Events", "user": user}})
if argv[:2] == ["bicep", "version"]:
    answer("Bicep CLI version 0.38.5")
if argv[:3] == ["ad", "signed-in-user", "show"]:
    answer(state["user_id"])
if argv[:2] == ["group", "exists"]:
    answer(state["group_exists"])
if argv[:3] == ["role", "assignment", "list"]:
    answer([{{"roleDefinitionId": "/subscriptions/x/providers/Microsoft.Authorization/roleDefinitions/" + r,
              "scope": argv[argv.index("--scope") + 1]}} for r in state["roles"]])
if argv[:2] == ["group", "create"]:
    answer({{"name": argv[argv.index("--name") + 1], "properties": {{"provisioningState": "Succeeded"}}}})
if argv[:3] == ["deployment", "group", "show"]:
    if not state["deployed"]:
        fail("(DeploymentNotFound) Deployment 'event-proxy' could not be found.", 3)
    answer({{k: {{"type": "String", "value": v}} for k, v in state["outputs"].items()}})
if argv[:4] == ["functionapp", "config", "appsettings", "list"]:
    answer(state["expected_key"])
if argv[:3] == ["deployment", "group", "what-if"]:
    answer("Resource changes: 14 to create.")
if argv[:3] == ["deployment", "group", "create"]:
    answer({{"properties": {{"provisioningState": "Succeeded",
            "outputs": {{k: {{"type": "Array" if isinstance(v, list) else "String", "value": v}}
                        for k, v in state["outputs"].items()}}}}}})
if argv[:4] == ["functionapp", "deployment", "source", "config-zip"]:
    names = zipfile.ZipFile(argv[argv.index("--src") + 1]).namelist()
    with open(state["log"], "a") as log:
        log.write(json.dumps({{"zip": sorted(names)}}) + "\n")
    answer("")
fail("fake az: unexpected command " + " ".join(argv), 2)
'''


def fake_az(tmp_path: Path, app: str, **scenario: Any) -> tuple[dict[str, str], Path]:
    """A PATH holding the fake ``az``, and the log its calls go to."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "az"
    script.write_text(FAKE_AZ.format(python=sys.executable))
    script.chmod(0o755)
    log = tmp_path / "az-calls.jsonl"
    state = {
        "log": str(log),
        "logged_in": True,
        "subscription": SUBSCRIPTION,
        "user_id": USER_ID,
        "group_exists": False,
        "roles": [OWNER],
        "deployed": False,
        "expected_key": ORGANIZER_KEY,
        "outputs": {
            "AZURE_FUNCTION_APP_NAME": "evtproxy-func-abc123",
            "AZURE_FUNCTION_APP_URL": app,
            "AZURE_OPENAI_ENDPOINT": "https://evtproxy-oai-abc123.openai.azure.com/",
            "AZURE_OPENAI_DEPLOYMENTS": [
                {"name": "gpt-4o-mini", "model": "gpt-4o-mini", "version": "x", "skuName": "GlobalStandard"},
                {"name": "text-embedding-3-small", "model": "text-embedding-3-small", "version": "1"},
            ],
            "STORAGE_TABLE_ENDPOINT": "https://evtproxyst.table.core.windows.net/",
        },
        **scenario,
    }
    state_file = tmp_path / "state.json"
    state_file.write_text(json.dumps(state))
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("AZURE_", "STORAGE_", "ORGANIZER_"))}
    env = {**keep, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "FAKE_AZ_STATE": str(state_file)}
    return env, log


def run_deploy(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "devtools.deploy", "--resource-group", "rg-event", "--location", "eastus2"]
    return subprocess.run(
        [*command, "--interval", "0.2", "--wait", "30", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def calls(log: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.read_text().splitlines()]


def commands(log: Path) -> list[str]:
    """Each recorded call as a command line; the zip's content is checked separately."""
    return ["az " + " ".join(c["argv"]) for c in calls(log) if "argv" in c]


TEMPLATE_ARGS = (
    "--resource-group rg-event --name event-proxy --template-file infra/main.bicep --parameters infra/main.bicepparam"
)
SCOPE = f"/subscriptions/{SUBSCRIPTION}"


def test_fresh_deploy(app: str, tmp_path: Path) -> None:
    env, log = fake_az(tmp_path, app)
    env["ORGANIZER_KEY"] = ORGANIZER_KEY
    result = run_deploy(env)
    print(result.stdout, result.stderr)
    assert result.returncode == 0, result.stdout + result.stderr
    assert commands(log) == [
        "az account show --output json",
        "az bicep version",
        "az ad signed-in-user show --query id --output tsv",
        "az group exists --name rg-event --output json",
        f"az role assignment list --assignee {USER_ID} --scope {SCOPE} --include-inherited --include-groups "
        "--output json",
        "az group create --name rg-event --location eastus2 --output none",
        f"az deployment group create {TEMPLATE_ARGS} --output json",
        "az functionapp deployment source config-zip --resource-group rg-event --name evtproxy-func-abc123 "
        "--src dist/app.zip --build-remote true --output none",
    ]
    create = next(c for c in calls(log) if c["argv"][:3] == ["deployment", "group", "create"])
    # Secrets reach main.bicepparam through the environment, never the command line.
    assert create["env"] == {"ORGANIZER_KEY": "set", "DEPLOYER_PRINCIPAL_ID": USER_ID}
    assert not any(ORGANIZER_KEY in " ".join(c.get("argv", [])) for c in calls(log))
    (package,) = [c["zip"] for c in calls(log) if "zip" in c]
    assert "function_app.py" in package and "requirements.txt" in package
    assert not [name for name in package if name.startswith(("tests/", "infra/", "devtools/"))]
    # The doctor ran against the app with the deployed models, and found nothing wrong.
    assert f"doctor: {app}" in result.stdout
    assert "deployment: gpt-4o-mini answers (chat" in result.stdout
    assert "deployment: text-embedding-3-small answers (embeddings" in result.stdout
    assert "All good." in result.stdout
    assert "Organizer key (shown once" not in result.stdout  # it was given, not generated


def test_redeploy_keeps_the_organizer_key_the_app_has(app: str, tmp_path: Path) -> None:
    env, log = fake_az(tmp_path, app, group_exists=True, deployed=True)
    result = run_deploy(env)
    print(result.stdout, result.stderr)
    assert result.returncode == 0, result.stdout + result.stderr
    group_scope = f"{SCOPE}/resourceGroups/rg-event"
    assert commands(log) == [
        "az account show --output json",
        "az bicep version",
        "az ad signed-in-user show --query id --output tsv",
        "az group exists --name rg-event --output json",
        f"az role assignment list --assignee {USER_ID} --scope {group_scope} --include-inherited "
        "--include-groups --output json",
        "az deployment group show --resource-group rg-event --name event-proxy --query properties.outputs "
        "--output json",
        "az functionapp config appsettings list --resource-group rg-event --name evtproxy-func-abc123 "
        "--query [?name=='ORGANIZER_KEY'].value | [0] --output tsv",
        f"az deployment group create {TEMPLATE_ARGS} --output json",
        "az functionapp deployment source config-zip --resource-group rg-event --name evtproxy-func-abc123 "
        "--src dist/app.zip --build-remote true --output none",
    ]
    create = next(c for c in calls(log) if c["argv"][:3] == ["deployment", "group", "create"])
    assert create["env"]["ORGANIZER_KEY"] == "set"  # the key the app already had, so it keeps working
    assert "All good." in result.stdout


def test_what_if_deploys_nothing(app: str, tmp_path: Path) -> None:
    env, log = fake_az(tmp_path, app, group_exists=True)
    env["ORGANIZER_KEY"] = ORGANIZER_KEY
    result = run_deploy(env, "--what-if", "--prefix", "hack24")
    assert result.returncode == 0, result.stderr
    assert "Resource changes: 14 to create." in result.stdout
    what_if = commands(log)[-1]
    assert what_if == f"az deployment group what-if {TEMPLATE_ARGS} --parameters namePrefix=hack24"
    assert not [c for c in commands(log) if "create" in c or "config-zip" in c]


def test_refuses_clearly_without_a_role_that_may_assign_roles(app: str, tmp_path: Path) -> None:
    env, log = fake_az(tmp_path, app, group_exists=True, roles=[READER])
    result = run_deploy(env)
    assert result.returncode == 1
    message = result.stderr.strip()
    assert message.startswith("deploy: organizer@example.com may not create role assignments on ")
    assert f"{SCOPE}/resourceGroups/rg-event" in message
    assert "Owner, User Access Administrator, Role Based Access Control Administrator" in message
    assert "az role assignment create --assignee organizer@example.com" in message
    assert not [c for c in commands(log) if "deployment group" in c or "group create" in c]


@pytest.mark.parametrize(
    ("scenario", "args", "expected"),
    [
        ({"logged_in": False}, (), "deploy: Not signed in to Azure: run 'az login'"),
        ({}, ("--prefix", "Event-Proxy"), "deploy: --prefix 'Event-Proxy': use 2 to 9 lowercase letters"),
    ],
)
def test_prerequisites(
    app: str, tmp_path: Path, scenario: dict[str, Any], args: tuple[str, ...], expected: str
) -> None:
    env, _ = fake_az(tmp_path, app, **scenario)
    result = run_deploy(env, *args)
    assert result.returncode == 1
    assert result.stderr.startswith(expected), result.stderr


def test_a_model_that_does_not_answer_fails_the_deploy_after_retries(app: str, tmp_path: Path) -> None:
    env, _ = fake_az(tmp_path, app)
    env["ORGANIZER_KEY"] = ORGANIZER_KEY
    state = json.loads(Path(env["FAKE_AZ_STATE"]).read_text())
    state["outputs"]["AZURE_OPENAI_DEPLOYMENTS"] = [{"name": "gpt-5.2"}]
    Path(env["FAKE_AZ_STATE"]).write_text(json.dumps(state))
    result = run_deploy(env)
    assert result.returncode == 1
    assert result.stdout.count("Running the doctor") == 3
    assert "PROBLEM  deployment: gpt-5.2 does not answer: 404 DeploymentNotFound" in result.stdout
