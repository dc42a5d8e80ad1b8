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
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fake_az import SUBSCRIPTION, USER_ID, calls, clone_repository, commands, put_on_path
from tests.support import ORGANIZER_KEY, ROOT, app_env, start_app, start_simulator

READER = "acdd72a7-3385-48ef-bd42-f606fba81ae7"
MODEL_LISTS = json.loads((ROOT / "tests" / "data" / "az_model_list.json").read_text())
CAPTURED = MODEL_LISTS["captured"]["entries"]  # real az output
CAPTURED_ON = MODEL_LISTS["captured"]["captured_on"]
TODAYS = MODEL_LISTS["constructed"]["entries"]  # built in the same shape, for today's models
TODAY = "2026-12-03"  # the day the constructed region describes
SERVED = {"gpt-5.4": "reasoning", "text-embedding-3-small": "embeddings", "gpt-4o-mini": "chat", "gpt-35-turbo": "chat"}


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
    return clone_repository(tmp_path)


def fake_az(tmp_path: Path, app: str, **scenario: Any) -> tuple[dict[str, str], Path]:
    """The fake ``az`` on PATH, in a world where the deployment's app is ``app``."""
    outputs = {
        "AZURE_FUNCTION_APP_NAME": "evtproxy-func-abc123",
        "AZURE_FUNCTION_APP_URL": app,
        "AZURE_OPENAI_ENDPOINT": "https://evtproxy-oai-abc123.openai.azure.com/",
        "STORAGE_TABLE_ENDPOINT": "https://evtproxyst.table.core.windows.net/",
    }
    state = {"group": "rg-event", "model_lists": {"eastus2": TODAYS}, "deployed_models": DEFAULTS,
             "file_models": DEFAULTS, "expected_key": ORGANIZER_KEY, "outputs": outputs, **scenario}  # fmt: skip
    return put_on_path(tmp_path, state)


FAST = ("--interval", "0.2", "--wait", "30")


def run_deploy(env: dict[str, str], cwd: Path, *args: str, today: str = TODAY) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "devtools.deploy", "--resource-group", "rg-event", "--location", "eastus2"]
    return subprocess.run(
        [*command, *FAST, "--today", today, *args],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,  # no terminal: nothing is asked, a consent must be given as an option
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


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
        "az cognitiveservices account list-deleted --output json",
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
        "az cognitiveservices account list-deleted --output json",
        "az deployment group show --resource-group rg-event --name event-proxy --query properties.outputs "
        "--output json",
        "az cognitiveservices account show --resource-group rg-event --name evtproxy-oai-abc123 --query kind "
        "--output tsv",
        "az functionapp config appsettings list --resource-group rg-event --name evtproxy-func-abc123 "
        "--query [?name=='ORGANIZER_KEY'].value | [0] --output tsv",
        "az functionapp config appsettings list --resource-group rg-event --name evtproxy-func-abc123 "
        "--query [?name=='CODE_HASH_KEY'].value | [0] --output tsv",
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
    state["outputs"]["AZURE_OPENAI_DEPLOYMENTS"] = [{"name": "gpt-5.3"}]  # deployed, but not what the app serves
    Path(env["FAKE_AZ_STATE"]).write_text(json.dumps(state))
    result = run_deploy(env, clone)
    assert result.returncode == 1
    assert result.stdout.count("Running the doctor") == 3
    assert "PROBLEM  deployment: gpt-5.3 does not answer: 404 DeploymentNotFound" in result.stdout


def deleted_account(name: str, group: str, location: str = "eastus2") -> dict[str, Any]:
    """An entry of ``az cognitiveservices account list-deleted``, shaped as the CLI prints one."""
    return {
        "id": f"/subscriptions/{SUBSCRIPTION}/providers/Microsoft.CognitiveServices/locations/{location}/"
        f"resourceGroups/{group}/deletedAccounts/{name}",
        "name": name,
        "location": location,
        "kind": "OpenAI",
        "properties": {"deletionDate": "2026-12-03T08:00:00Z", "scheduledPurgeDate": "2026-12-05T08:00:00Z"},
    }


SOFT_DELETED = [deleted_account("evtproxy-oai-abc123", "rg-event"), deleted_account("evtproxy-oai-zzz999", "rg-other")]


def test_redeploy_after_tear_down_stops_without_consent(app: str, clone: Path, tmp_path: Path) -> None:
    """The group was deleted an hour ago: its account is soft-deleted and would fail the deployment."""
    env, log = fake_az(tmp_path, app, deleted_accounts=SOFT_DELETED)
    env["ORGANIZER_KEY"] = ORGANIZER_KEY
    result = run_deploy(env, clone)
    print(result.stdout, result.stderr)
    assert result.returncode == 1
    assert "Soft-deleted Azure OpenAI account(s) of rg-event block this deployment: evtproxy-oai-abc123 (eastus2, " \
        "purged by Azure on 2026-12-05T08:00:00Z)" in result.stdout  # fmt: skip
    assert "Run again with --soft-deleted purge" in result.stderr and "Nothing was deployed." in result.stderr
    assert "zzz999" not in result.stdout + result.stderr  # another group's account is not this deployment's
    assert not [c for c in commands(log) if "group create" in c or "deployment group" in c or "purge" in c]


@pytest.mark.parametrize("action", ["purge", "recover"])
def test_redeploy_after_tear_down_purges_or_restores_with_consent(
    app: str, clone: Path, tmp_path: Path, action: str
) -> None:
    env, log = fake_az(tmp_path, app, deleted_accounts=SOFT_DELETED)
    env["ORGANIZER_KEY"] = ORGANIZER_KEY
    result = run_deploy(env, clone, "--soft-deleted", "purge" if action == "purge" else "restore")
    print(result.stdout, result.stderr)
    assert result.returncode == 0, result.stdout + result.stderr
    expected = fresh_calls(DEFAULTS)
    settle = f"az cognitiveservices account {action} --resource-group rg-event --location eastus2 --name " \
        "evtproxy-oai-abc123 --output none"  # fmt: skip
    expected.insert(expected.index("az group create --name rg-event --location eastus2 --output none") + 1, settle)
    assert commands(log) == expected
    state = json.loads(Path(env["FAKE_AZ_STATE"]).read_text())
    assert [a["name"] for a in state["deleted_accounts"]] == ["evtproxy-oai-zzz999"]
    assert "All good." in result.stdout


def test_a_first_publish_refused_while_the_role_applies_is_retried(app: str, clone: Path, tmp_path: Path) -> None:
    """Azure answers 403 to the first two publishes (the blob role is not applied yet): the third goes through."""
    env, log = fake_az(tmp_path, app, publish_refusals=2)
    env["ORGANIZER_KEY"] = ORGANIZER_KEY
    result = run_deploy(env, clone)
    print(result.stdout, result.stderr)
    assert result.returncode == 0, result.stdout + result.stderr
    publishes = [c for c in commands(log) if "config-zip" in c]
    assert len(publishes) == 3 and commands(log)[-3:] == publishes
    assert result.stdout.count("refused (403): the app's identity cannot write its deployment container yet") == 2
    assert "publishing again in 0 s (attempt 2 of 6)" in result.stdout  # --interval 0.2 here; 15 s by default
    assert "All good." in result.stdout


def test_a_publish_refused_for_another_reason_fails_at_once(app: str, clone: Path, tmp_path: Path) -> None:
    missing = "(ResourceNotFound) The Resource 'Microsoft.Web/sites/evtproxy-func-abc123' was not found."
    env, log = fake_az(tmp_path, app, publish_error=missing)
    env["ORGANIZER_KEY"] = ORGANIZER_KEY
    result = run_deploy(env, clone)
    assert result.returncode == 1
    assert result.stderr.startswith("deploy: 'az functionapp deployment source ...' failed: ERROR: (ResourceNotFound)")
    assert len([c for c in commands(log) if "config-zip" in c]) == 1 and "refused (403)" not in result.stdout


def test_a_redeploy_does_not_roll_back_a_foundry_upgrade_unasked(app: str, clone: Path, tmp_path: Path) -> None:
    upgraded = [{"name": "evtproxy-oai-abc123", "location": "eastus2", "kind": "AIServices"}]
    env, log = fake_az(tmp_path, app, group_exists=True, deployed=True, accounts=upgraded)
    result = run_deploy(env, clone)
    assert result.returncode == 1
    assert result.stderr.startswith("deploy: Microsoft has upgraded evtproxy-oai-abc123 to a Foundry resource")
    assert "--foundry-upgraded rollback" in result.stderr and "Nothing was deployed." in result.stderr
    assert not [c for c in commands(log) if "deployment group create" in c or "config-zip" in c]
    env, log = fake_az(tmp_path / "again", app, group_exists=True, deployed=True, accounts=upgraded)
    result = run_deploy(env, clone, "--foundry-upgraded", "rollback")
    assert result.returncode == 0, result.stdout + result.stderr
    assert (
        "Rolling evtproxy-oai-abc123 back from a Foundry resource to an Azure OpenAI account, as asked" in result.stdout
    )
