"""``make deploy`` / ``python -m devtools.deploy`` against a fake ``az`` on PATH, and a real app on loopback.

The real CLI cannot reach Azure from here, so ``az`` is a small script that records
its arguments (and whether the secrets reached it through the environment, never the
arguments) and answers like the real CLI: JSON on stdout, ``ERROR: ...`` on stderr
with a non-zero exit. Its ``cognitiveservices model list`` answers come from
tests/data/az_model_list.json: real CLI output captured on 2025-05-25 (source named there),
and entries built in the same shape for today's models, marked as such. The deployment's
outputs point at an app of this module, under the real worker, over Azurite and a simulator
that serves the deployed names (gpt-5.4 as a reasoning model that refuses ``max_tokens``, as
Azure's does), so the health wait and the doctor run for real.

Every deploy runs from a copy of the repository's tracked files, as a new user's clone.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import ORGANIZER_KEY, ROOT, app_env, start_app, start_simulator

SUBSCRIPTION = "00000000-0000-0000-0000-0000000000aa"
USER_ID = "11111111-2222-3333-4444-555555555555"
OWNER = "8e3af657-a8ff-443c-a75c-2fe8c4bcb635"
READER = "acdd72a7-3385-48ef-bd42-f606fba81ae7"
MODEL_LISTS = json.loads((ROOT / "tests" / "data" / "az_model_list.json").read_text())
CAPTURED = MODEL_LISTS["captured"]["entries"]  # real az output
CAPTURED_ON = MODEL_LISTS["captured"]["captured_on"]
TODAYS = MODEL_LISTS["constructed"]["entries"]  # built in the same shape, for today's models
TODAY = "2026-12-03"  # the day the constructed region describes
SERVED = {"gpt-5.4": "reasoning", "text-embedding-3-small": "embeddings", "gpt-4o-mini": "chat", "gpt-35-turbo": "chat"}

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
if argv[:2] == ["group", "show"]:
    answer(state["group_location"])
if argv[:3] == ["cognitiveservices", "model", "list"]:
    region = argv[argv.index("--location") + 1]
    if region not in state["model_lists"]:
        fail("(NoRegisteredProviderFound) No registered resource provider found for location '" + region + "'.")
    answer(state["model_lists"][region])
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
    outputs = dict(state["outputs"])
    given = [a.split("=", 1)[1] for a in argv if a.startswith("modelDeployments=")]
    if given and "AZURE_OPENAI_DEPLOYMENTS" not in outputs:
        outputs["AZURE_OPENAI_DEPLOYMENTS"] = json.loads(given[-1])  # the template outputs its parameter
    answer({{"properties": {{"provisioningState": "Succeeded",
            "outputs": {{k: {{"type": "Array" if isinstance(v, list) else "String", "value": v}}
                        for k, v in outputs.items()}}}}}})
if argv[:4] == ["functionapp", "deployment", "source", "config-zip"]:
    names = zipfile.ZipFile(argv[argv.index("--src") + 1]).namelist()
    with open(state["log"], "a") as log:
        log.write(json.dumps({{"zip": sorted(names)}}) + "\n")
    answer("")
fail("fake az: unexpected command " + " ".join(argv), 2)
'''


@pytest.fixture(scope="module")
def app(azurite: str) -> Iterator[str]:
    """The proxy over a simulator serving the deployments these deploys create."""
    simulator, upstream = start_simulator(*[f"--deployment={name}={kind}" for name, kind in SERVED.items()])
    service, url = start_app(app_env(azurite, upstream))
    yield url
    service.stop()
    simulator.stop()


@pytest.fixture
def clone(tmp_path: Path) -> Path:
    """The files git tracks (and new ones it would), as a clone has them, with the shared install linked in."""
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout
    target = tmp_path / "repo"
    for name in files.decode().split("\0"):
        source = ROOT / name
        if name and source.is_file() and not source.is_symlink():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)  # mtimes kept: make finds the install up to date
    for link in (".venv", "node_modules"):
        (target / link).symlink_to((ROOT / link).resolve())
    return target


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
        "group_location": "eastus2",
        "model_lists": {"eastus2": TODAYS},
        "roles": [OWNER],
        "deployed": False,
        "expected_key": ORGANIZER_KEY,
        "outputs": {
            "AZURE_FUNCTION_APP_NAME": "evtproxy-func-abc123",
            "AZURE_FUNCTION_APP_URL": app,
            "AZURE_OPENAI_ENDPOINT": "https://evtproxy-oai-abc123.openai.azure.com/",
            "STORAGE_TABLE_ENDPOINT": "https://evtproxyst.table.core.windows.net/",
        },
        **scenario,
    }
    state_file = tmp_path / "state.json"
    state_file.write_text(json.dumps(state))
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("AZURE_", "STORAGE_", "ORGANIZER_"))}
    env = {**keep, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "FAKE_AZ_STATE": str(state_file)}
    return env, log


FAST = ("--interval", "0.2", "--wait", "30")


def run_deploy(env: dict[str, str], cwd: Path, *args: str, today: str = TODAY) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "devtools.deploy", "--resource-group", "rg-event", "--location", "eastus2"]
    return subprocess.run(
        [*command, *FAST, "--today", today, *args],
        cwd=cwd,
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


def set_models(clone: Path, *deployments: dict[str, Any]) -> None:
    """Replace modelDeployments in the clone's main.bicepparam, as an organizer would edit it."""
    path = clone / "infra" / "main.bicepparam"
    text = path.read_text()
    start = text.index("param modelDeployments = [")
    end = text.index("\n]\n", start) + 3
    items = "".join(
        "  {\n" + "".join(f"    {k}: {v if isinstance(v, int) else repr(v)}\n" for k, v in d.items()) + "  }\n"
        for d in deployments
    )
    path.write_text(text[:start] + "param modelDeployments = [\n" + items + "]\n" + text[end:])


TEMPLATE_ARGS = (
    "--resource-group rg-event --name event-proxy --template-file infra/main.bicep --parameters infra/main.bicepparam"
)
SCOPE = f"/subscriptions/{SUBSCRIPTION}"
GROUP_SCOPE = f"{SCOPE}/resourceGroups/rg-event"
DEFAULTS = [
    {"name": "gpt-5.4", "model": "gpt-5.4", "version": "2026-03-05", "skuName": "GlobalStandard", "capacity": 50},
    {"name": "text-embedding-3-small", "model": "text-embedding-3-small", "version": "1", "skuName": "GlobalStandard",
     "capacity": 50},
]  # fmt: skip


def template_call(verb: str, models: list[dict[str, Any]]) -> str:
    given = json.dumps(models, separators=(",", ":"))
    return f"az deployment group {verb} {TEMPLATE_ARGS} --parameters modelDeployments={given}"


def fresh_calls(models: list[dict[str, Any]], regions: tuple[str, ...] = ("eastus2",)) -> list[str]:
    return [
        "az account show --output json",
        "az bicep version",
        "az ad signed-in-user show --query id --output tsv",
        "az group exists --name rg-event --output json",
        f"az role assignment list --assignee {USER_ID} --scope {SCOPE} --include-inherited --include-groups "
        "--output json",
        *[f"az cognitiveservices model list --location {region} --output json" for region in regions],
        "az group create --name rg-event --location eastus2 --output none",
        template_call("create", models) + " --output json",
        "az functionapp deployment source config-zip --resource-group rg-event --name evtproxy-func-abc123 "
        "--src dist/app.zip --build-remote true --output none",
    ]


def redeploy_calls(models: list[dict[str, Any]]) -> list[str]:
    return [
        "az account show --output json",
        "az bicep version",
        "az ad signed-in-user show --query id --output tsv",
        "az group exists --name rg-event --output json",
        f"az role assignment list --assignee {USER_ID} --scope {GROUP_SCOPE} --include-inherited "
        "--include-groups --output json",
        "az group show --name rg-event --query location --output tsv",
        "az cognitiveservices model list --location eastus2 --output json",
        "az deployment group show --resource-group rg-event --name event-proxy --query properties.outputs "
        "--output json",
        "az functionapp config appsettings list --resource-group rg-event --name evtproxy-func-abc123 "
        "--query [?name=='ORGANIZER_KEY'].value | [0] --output tsv",
        template_call("create", models) + " --output json",
        "az functionapp deployment source config-zip --resource-group rg-event --name evtproxy-func-abc123 "
        "--src dist/app.zip --build-remote true --output none",
    ]


def test_fresh_deploy_with_make(app: str, clone: Path, tmp_path: Path) -> None:
    """``make deploy`` from a clean clone, in a region offering today's models: it ends with the doctor green."""
    env, log = fake_az(tmp_path, app)
    env["ORGANIZER_KEY"] = ORGANIZER_KEY
    args = " ".join([*FAST, "--today", TODAY])
    result = subprocess.run(
        ["make", "--no-print-directory", "deploy", "RG=rg-event", "LOCATION=eastus2", f"ARGS={args}"],
        cwd=clone, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    print(result.stdout, result.stderr)
    assert result.returncode == 0, result.stdout + result.stderr
    assert commands(log) == fresh_calls(DEFAULTS)
    assert "  gpt-5.4: gpt-5.4 2026-03-05 GlobalStandard (new deployments until 2027-03-05)" in result.stdout
    create = next(c for c in calls(log) if c["argv"][:3] == ["deployment", "group", "create"])
    # Secrets reach main.bicepparam through the environment, never the command line.
    assert create["env"] == {"ORGANIZER_KEY": "set", "DEPLOYER_PRINCIPAL_ID": USER_ID}
    assert not any(ORGANIZER_KEY in " ".join(c.get("argv", [])) for c in calls(log))
    (package,) = [c["zip"] for c in calls(log) if "zip" in c]
    assert "function_app.py" in package and "requirements.txt" in package
    assert not [name for name in package if name.startswith(("tests/", "infra/", "devtools/"))]
    # The doctor ran against the app with the deployed models and found nothing wrong, the
    # reasoning model's refusal of max_tokens included: the proxy never sends it.
    doctor = result.stdout[result.stdout.rindex("doctor: ") :].splitlines()
    assert doctor[0] == f"doctor: {app}"
    assert any(line.startswith("ok") and "deployment: gpt-5.4 answers (chat" in line for line in doctor)
    assert any(line.startswith("info") and "gpt-5.4 refuses max_tokens; the proxy caps requests with "
               "max_completion_tokens" in line for line in doctor)  # fmt: skip
    assert any(line.startswith("ok") and "text-embedding-3-small answers (embeddings" in line for line in doctor)
    assert "All good." in doctor and not [line for line in doctor if line.startswith("PROBLEM")]
    assert "Organizer key (shown once" not in result.stdout  # it was given, not generated


def test_redeploy_keeps_the_organizer_key_the_app_has(app: str, clone: Path, tmp_path: Path) -> None:
    env, log = fake_az(tmp_path, app, group_exists=True, deployed=True)
    result = run_deploy(env, clone)
    print(result.stdout, result.stderr)
    assert result.returncode == 0, result.stdout + result.stderr
    assert commands(log) == redeploy_calls(DEFAULTS)
    create = next(c for c in calls(log) if c["argv"][:3] == ["deployment", "group", "create"])
    assert create["env"]["ORGANIZER_KEY"] == "set"  # the key the app already had, so it keeps working
    assert "All good." in result.stdout


def test_captured_region_deploys_the_version_asked(app: str, clone: Path, tmp_path: Path) -> None:
    """Real ``model list`` output: gpt-4o-mini 2024-07-18 was open to new deployments on the day of the capture."""
    asked = [{"name": "gpt-4o-mini", "model": "gpt-4o-mini", "version": "2024-07-18", "skuName": "GlobalStandard",
              "capacity": 10}, DEFAULTS[1]]  # fmt: skip
    set_models(clone, *asked)
    env, log = fake_az(tmp_path, app, model_lists={"eastus2": CAPTURED})
    env["ORGANIZER_KEY"] = ORGANIZER_KEY
    result = run_deploy(env, clone, today=CAPTURED_ON)
    print(result.stdout, result.stderr)
    assert result.returncode == 0, result.stdout + result.stderr
    assert commands(log) == fresh_calls(asked)
    assert "  gpt-4o-mini: gpt-4o-mini 2024-07-18 GlobalStandard (new deployments until 2025-08-16)" in result.stdout
    assert "gpt-4o-mini answers (chat" in result.stdout and "All good." in result.stdout


def test_captured_region_redeploy_moves_off_a_deprecated_version(app: str, clone: Path, tmp_path: Path) -> None:
    """gpt-35-turbo 0613 was Deprecated in the capture: the redeploy takes 0125, its newest open version."""
    set_models(clone, {"name": "gpt-35-turbo", "model": "gpt-35-turbo", "version": "0613", "skuName": "Standard",
                       "capacity": 10})  # fmt: skip
    env, log = fake_az(tmp_path, app, group_exists=True, deployed=True, model_lists={"eastus2": CAPTURED})
    result = run_deploy(env, clone, today=CAPTURED_ON)
    print(result.stdout, result.stderr)
    assert result.returncode == 0, result.stdout + result.stderr
    picked = [
        {"name": "gpt-35-turbo", "model": "gpt-35-turbo", "version": "0125", "skuName": "Standard", "capacity": 10}
    ]
    assert commands(log) == redeploy_calls(picked)
    assert (
        "  gpt-35-turbo: gpt-35-turbo 0125 Standard (new deployments until 2025-07-16; main.bicepparam says 0613, "
        "the newest that stays deployable is used)"
    ) in result.stdout
    assert "All good." in result.stdout


@pytest.mark.parametrize(
    ("region", "today", "asked", "until", "expected"),
    [
        pytest.param(
            CAPTURED,
            CAPTURED_ON,
            {
                "name": "gpt-4o-mini",
                "model": "gpt-4o-mini",
                "version": "2024-07-18",
                "skuName": "GlobalStandard",
                "capacity": 10,
            },
            "2025-09-01",
            [
                "deploy: deployment 'gpt-4o-mini': no version of gpt-4o-mini as GlobalStandard in eastus2 still "
                "takes new deployments on 2025-09-01.",
                "eastus2: gpt-4o-mini 2024-07-18 is generally available, new deployments until 2025-08-16.",
                "Offered instead (chat, GlobalStandard, open on 2025-09-01 in eastus2), newest first:",
                "  gpt-4.1-mini 2025-04-14 (new deployments until 2026-04-11)",
            ],
            id="captured-region-event-after-the-deprecation",
        ),
        pytest.param(
            TODAYS,
            TODAY,
            {
                "name": "gpt-5.2",
                "model": "gpt-5.2",
                "version": "2025-12-11",
                "skuName": "GlobalStandard",
                "capacity": 50,
            },
            None,
            [
                "deploy: deployment 'gpt-5.2': no version of gpt-5.2 as GlobalStandard in eastus2 still takes new "
                "deployments on 2027-01-02.",
                "eastus2: gpt-5.2 2025-12-11 is generally available, new deployments until 2026-12-12.",
                "  gpt-5.4-mini 2026-03-17 (new deployments until 2027-03-17)",
                "  gpt-5.4 2026-03-05 (new deployments until 2027-03-05)",
            ],
            id="the-old-default-on-2026-12-03",
        ),
    ],
)
def test_stops_before_deploying_when_no_version_stays_open(
    app: str, clone: Path, tmp_path: Path, region: list[Any], today: str, asked: dict[str, Any], until: str | None,
    expected: list[str],
) -> None:  # fmt: skip
    set_models(clone, asked)
    env, log = fake_az(tmp_path, app, model_lists={"eastus2": region})
    result = run_deploy(env, clone, *(("--until", until) if until else ()), today=today)
    print(result.stdout, result.stderr)
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    for line in expected:
        assert line in lines, line
    assert lines[-2].startswith("Set model and version of this deployment in infra/main.bicepparam")
    assert lines[-1] == "Nothing was deployed."
    assert not [c for c in commands(log) if "group create" in c or "deployment group" in c or "config-zip" in c]


def test_what_if_deploys_nothing(app: str, clone: Path, tmp_path: Path) -> None:
    env, log = fake_az(tmp_path, app, group_exists=True)
    env["ORGANIZER_KEY"] = ORGANIZER_KEY
    result = run_deploy(env, clone, "--what-if", "--prefix", "hack24")
    assert result.returncode == 0, result.stderr
    assert "Resource changes: 14 to create." in result.stdout
    what_if = commands(log)[-1]
    assert what_if == template_call("what-if", DEFAULTS) + " --parameters namePrefix=hack24"
    assert not [c for c in commands(log) if "create" in c or "config-zip" in c]


def test_refuses_clearly_without_a_role_that_may_assign_roles(app: str, clone: Path, tmp_path: Path) -> None:
    env, log = fake_az(tmp_path, app, group_exists=True, roles=[READER])
    result = run_deploy(env, clone)
    assert result.returncode == 1
    message = result.stderr.strip()
    assert message.startswith("deploy: organizer@example.com may not create role assignments on ")
    assert GROUP_SCOPE in message
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
    app: str, clone: Path, tmp_path: Path, scenario: dict[str, Any], args: tuple[str, ...], expected: str
) -> None:
    env, _ = fake_az(tmp_path, app, **scenario)
    result = run_deploy(env, clone, *args)
    assert result.returncode == 1
    assert result.stderr.startswith(expected), result.stderr


def test_a_model_that_does_not_answer_fails_the_deploy_after_retries(app: str, clone: Path, tmp_path: Path) -> None:
    env, _ = fake_az(tmp_path, app)
    env["ORGANIZER_KEY"] = ORGANIZER_KEY
    state = json.loads(Path(env["FAKE_AZ_STATE"]).read_text())
    state["outputs"]["AZURE_OPENAI_DEPLOYMENTS"] = [{"name": "gpt-5.3"}]  # deployed, but not what the app can reach
    Path(env["FAKE_AZ_STATE"]).write_text(json.dumps(state))
    result = run_deploy(env, clone)
    assert result.returncode == 1
    assert result.stdout.count("Running the doctor") == 3
    assert "PROBLEM  deployment: gpt-5.3 does not answer: 404 DeploymentNotFound" in result.stdout
