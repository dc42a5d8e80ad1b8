"""A stand-in for the ``az`` CLI, for tests that run the deploy tooling and the README's commands.

Azure cannot be reached from here, so ``tests/test_deploy.py`` and ``tests/test_readme_deploy.py``
put this script on PATH as ``az``. It answers the commands they use the way the real CLI does:
JSON on stdout (``--output/-o json``, the default), ``tsv`` as the CLI prints it, ``--query``
applied with JMESPath (the library the CLI itself uses), ``ERROR: ...`` on stderr with a non-zero
exit. The world it describes is the JSON file named by ``$FAKE_AZ_STATE`` (signed in or not,
roles, resource group, deployment outputs, live and soft-deleted Azure OpenAI accounts, the
region's ``model list`` answer), which commands change as Azure would: ``group delete``
soft-deletes the accounts, ``account purge`` removes one. Each call is appended to the state's
``log`` with whether the secrets reached it through the environment (never the arguments).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any, NoReturn

import jmespath

SHORT = {"-g": "--resource-group", "-n": "--name", "-l": "--location", "-o": "--output", "-f": "--template-file",
         "-p": "--parameters", "-s": "--subscription"}  # fmt: skip
FLAGS = {"--yes", "--no-wait", "--include-inherited", "--include-groups", "--enable-id-token-issuance", "--python"}


def main(argv: list[str]) -> NoReturn:
    state_path = Path(os.environ["FAKE_AZ_STATE"])
    state = json.loads(state_path.read_text())
    record: dict[str, Any] = {"argv": argv}
    if os.environ.get("ORGANIZER_KEY"):
        record["env"] = {
            "ORGANIZER_KEY": "set" if os.environ["ORGANIZER_KEY"] == state["expected_key"] else "other",
            "DEPLOYER_PRINCIPAL_ID": os.environ.get("DEPLOYER_PRINCIPAL_ID"),
        }
    with open(state["log"], "a") as log:
        log.write(json.dumps(record) + "\n")
    words, options = parse(argv)
    try:
        value = run(state, words, options)
    except AzError as error:
        state_path.write_text(json.dumps(state))
        print(f"ERROR: {error}", file=sys.stderr)
        sys.exit(error.code)
    state_path.write_text(json.dumps(state))
    show(value, options)
    sys.exit(0)


class AzError(Exception):
    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def parse(argv: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    words: list[str] = []
    options: dict[str, list[str]] = {}
    at = 0
    while at < len(argv):
        arg = SHORT.get(argv[at], argv[at])
        if arg.startswith("--"):
            if arg in FLAGS or at + 1 == len(argv) or argv[at + 1].startswith("--"):
                options.setdefault(arg, []).append("true")
                at += 1
            else:
                options.setdefault(arg, []).append(argv[at + 1])
                at += 2
        else:
            words.append(arg)
            at += 1
    return words, options


def show(value: Any, options: dict[str, list[str]]) -> None:
    if value is None:
        return
    query = options.get("--query", [None])[-1]
    if query:
        value = jmespath.search(query, value)
    output = options.get("--output", ["json"])[-1]
    if output == "none":
        return
    if output == "tsv":
        rows = value if isinstance(value, list) else [value]
        for row in rows:
            if row is None:
                continue
            cells = list(row.values()) if isinstance(row, dict) else row if isinstance(row, list) else [row]
            print("\t".join("true" if c is True else "false" if c is False else str(c) for c in cells))
        return
    if output == "table":
        rows = value if isinstance(value, list) else [value]
        for row in rows:
            print("  ".join(str(v) for v in (row.values() if isinstance(row, dict) else [row])))
        return
    print(json.dumps(value, indent=2))


def one(options: dict[str, list[str]], name: str) -> str:
    if name not in options:
        raise AzError(f"the following arguments are required: {name}", 2)
    return options[name][-1]


def run(state: dict[str, Any], words: list[str], options: dict[str, list[str]]) -> Any:
    command = " ".join(words[:4])
    if words[:1] == ["login"]:
        state["logged_in"] = True
        return [{"id": state["subscription"], "name": "Events", "isDefault": True}]
    if not state["logged_in"]:
        raise AzError("Please run 'az login' to setup account.")
    if command.startswith("account show"):
        return {
            "id": state["subscription"],
            "name": "Events",
            "user": {"name": "organizer@example.com", "type": "user"},
        }
    if command.startswith("bicep version"):
        return "Bicep CLI version 0.38.5"
    if command.startswith("ad signed-in-user show"):
        return {"id": state["user_id"], "userPrincipalName": "organizer@example.com"}
    if command.startswith("ad app create"):
        state["entra_app"] = {
            "appId": "99999999-0000-0000-0000-00000000c11d",
            "displayName": one(options, "--display-name"),
        }
        return state["entra_app"]
    if command.startswith(("ad sp create", "ad app update")):
        return {"appId": one(options, "--id")}
    if command.startswith("ad group show"):
        return {"id": "77777777-0000-0000-0000-000000000001", "displayName": one(options, "--group")}
    if command.startswith("group exists"):
        return state["group_exists"]
    if command.startswith("group show"):
        if not state["group_exists"]:
            raise AzError(
                f"(ResourceGroupNotFound) Resource group '{one(options, '--resource-group')}' could not be found.", 3
            )
        return {"name": state["group"], "location": state["group_location"]}
    if command.startswith("group create"):
        state.update(group_exists=True, group=one(options, "--name"), group_location=one(options, "--location"))
        return {
            "name": state["group"],
            "location": state["group_location"],
            "properties": {"provisioningState": "Succeeded"},
        }
    if command.startswith("group delete"):
        state.update(group_exists=False, deployed=False)
        for account in state["accounts"]:
            state["deleted_accounts"].append({
                "id": f"/subscriptions/{state['subscription']}/providers/Microsoft.CognitiveServices/locations/"
                      f"{account['location']}/resourceGroups/{state['group']}/deletedAccounts/{account['name']}",
                "name": account["name"], "location": account["location"], "kind": "OpenAI",
                "properties": {"deletionDate": "2026-12-03T10:00:00Z", "scheduledPurgeDate": "2026-12-05T10:00:00Z"},
            })  # fmt: skip
        state["accounts"] = []
        return None
    if command.startswith("role assignment list"):
        return [{"roleDefinitionId": f"/subscriptions/x/providers/Microsoft.Authorization/roleDefinitions/{role}",
                 "scope": one(options, "--scope")} for role in state["roles"]]  # fmt: skip
    if command.startswith("cognitiveservices model list"):
        region = one(options, "--location")
        if region not in state["model_lists"]:
            raise AzError(f"(NoRegisteredProviderFound) No registered resource provider found for location '{region}'.")
        return state["model_lists"][region]
    if command.startswith("cognitiveservices usage list"):
        return [{"name": {"value": "OpenAI.GlobalStandard.gpt-5.4"}, "currentValue": 0, "limit": 1000}]
    if command.startswith("cognitiveservices account show"):
        name = one(options, "--name")
        found = [a for a in state["accounts"] if a["name"] == name]
        if not found:
            raise AzError(
                f"(ResourceNotFound) The Resource 'Microsoft.CognitiveServices/accounts/{name}' was not found.", 3
            )
        return {"name": name, "location": found[0]["location"], "kind": found[0].get("kind", "OpenAI")}
    if command.startswith("cognitiveservices account list-deleted"):
        return state["deleted_accounts"]
    if command.startswith(("cognitiveservices account purge", "cognitiveservices account recover")):
        name = one(options, "--name")
        found = [a for a in state["deleted_accounts"] if a["name"] == name]
        if not found or one(options, "--location") != found[0]["location"]:
            raise AzError(f"(ResourceNotFound) The deleted account '{name}' was not found.", 3)
        state["deleted_accounts"].remove(found[0])
        if words[2] == "recover":
            state["accounts"].append({"name": name, "location": found[0]["location"]})
        return None
    if command.startswith("functionapp list-flexconsumption-locations"):
        return [{"name": "eastus2"}, {"name": "swedencentral"}]
    if command.startswith("deployment group show"):
        if not state["deployed"]:
            raise AzError(f"(DeploymentNotFound) Deployment '{one(options, '--name')}' could not be found.", 3)
        return {"name": "event-proxy", "properties": {"outputs": outputs(state, state["deployed_models"])}}
    if command.startswith("deployment group what-if"):
        print("Resource changes: 14 to create.")
        return None
    if command.startswith("deployment group create"):
        if not state["group_exists"]:
            raise AzError(
                f"(ResourceGroupNotFound) Resource group '{one(options, '--resource-group')}' could not be found.", 3
            )
        group = one(options, "--resource-group")
        if [a for a in state["deleted_accounts"] if f"/resourceGroups/{group}/" in a["id"]]:
            raise AzError(
                "(FlagMustBeSetForRestore) An existing resource with ID '...' has been soft-deleted. To restore the "
                "resource, you must specify 'restore' to be 'true' in the property. If you don't want to restore "
                "existing resource, please purge it first."
            )
        models = [
            json.loads(p.split("=", 1)[1]) for p in options.get("--parameters", []) if p.startswith("modelDeployments=")
        ]
        state.update(deployed=True, deployed_models=models[-1] if models else state["file_models"])
        if not state["accounts"]:
            state["accounts"] = [{"name": "evtproxy-oai-abc123", "location": state["group_location"]}]
        return {"name": "event-proxy", "properties": {"provisioningState": "Succeeded",
                                                      "outputs": outputs(state, state["deployed_models"])}}  # fmt: skip
    if command.startswith("functionapp config appsettings list"):
        settings = {"ORGANIZER_KEY": state["expected_key"], "CODE_HASH_KEY": state.get("code_hash_key", "")}
        return [{"name": name, "value": value, "slotSetting": False} for name, value in settings.items()]
    if command.startswith("functionapp list"):
        deployed = state["deployed"] and one(options, "--resource-group") == state["group"]
        return [{"name": state["outputs"]["AZURE_FUNCTION_APP_NAME"]}] if deployed else []
    if command.startswith("webapp auth github update"):
        state["github_provider"] = {"clientId": one(options, "--client-id")}
        one(options, "--client-secret")
        return {"enabled": True, "registration": state["github_provider"]}
    if command.startswith("webapp auth update"):
        action = one(options, "--unauthenticated-client-action")
        state["auth"] = {"enabled": one(options, "--enabled"), "action": action}
        return {"platform": {"enabled": True}}
    if command.startswith("functionapp config appsettings set"):
        settings = dict(item.split("=", 1) for item in options.get("--settings", []))
        state.setdefault("app_settings", {}).update(settings)
        return [{"name": name, "value": None, "slotSetting": False} for name in settings]
    if command.startswith("functionapp deployment source config-zip"):
        if state.get("publish_refusals", 0):
            state["publish_refusals"] -= 1
            raise AzError(
                "Status Code: 403, Details: This request is not authorized to perform this operation using this "
                "permission. ErrorCode: AuthorizationPermissionMismatch"
            )
        if state.get("publish_error"):
            raise AzError(state["publish_error"], 3)
        names = zipfile.ZipFile(one(options, "--src")).namelist()
        with open(state["log"], "a") as log:
            log.write(json.dumps({"zip": sorted(names)}) + "\n")
        return None
    raise AzError("fake az: unexpected command " + " ".join(words), 2)


def outputs(state: dict[str, Any], models: list[dict[str, Any]]) -> dict[str, Any]:
    values = {**state["outputs"]}
    values.setdefault("AZURE_OPENAI_DEPLOYMENTS", models)  # the template outputs the parameter it was given
    return {k: {"type": "Array" if isinstance(v, list) else "String", "value": v} for k, v in values.items()}


# For the tests: a copy of the repository as a clone has it, and this script on PATH as ``az``.

ROOT = Path(__file__).resolve().parent.parent
SUBSCRIPTION = "00000000-0000-0000-0000-0000000000aa"
USER_ID = "11111111-2222-3333-4444-555555555555"
OWNER = "8e3af657-a8ff-443c-a75c-2fe8c4bcb635"


def clone_repository(tmp_path: Path) -> Path:
    """The files git tracks (and new ones it would), as a clone has them, with the shared install linked in."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout
    target = tmp_path / "repo"
    for name in listed.decode().split("\0"):
        source = ROOT / name
        if name and source.is_file() and not source.is_symlink():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)  # mtimes kept: make finds the install up to date
    for link in (".venv", "node_modules"):
        (target / link).symlink_to((ROOT / link).resolve())
    return target


def put_on_path(tmp_path: Path, scenario: dict[str, Any]) -> tuple[dict[str, str], Path]:
    """An environment whose PATH finds this script as ``az`` in the world ``scenario`` describes, and its call log."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(parents=True)
    script = bin_dir / "az"
    script.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{Path(__file__).resolve()}" "$@"\n')
    script.chmod(0o755)
    log = tmp_path / "az-calls.jsonl"
    state = {
        "log": str(log),
        "logged_in": True,
        "subscription": SUBSCRIPTION,
        "user_id": USER_ID,
        "group_exists": False,
        "group_location": "eastus2",
        "roles": [OWNER],
        "deployed": False,
        "accounts": [],
        "deleted_accounts": [],
        **scenario,
    }
    if state["group_exists"] and state["deployed"] and not state["accounts"]:
        state["accounts"] = [{"name": "evtproxy-oai-abc123", "location": state["group_location"]}]
    state_file = tmp_path / "state.json"
    state_file.write_text(json.dumps(state))
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("AZURE_", "STORAGE_", "ORGANIZER_"))}
    env = {**keep, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "FAKE_AZ_STATE": str(state_file)}
    return env, log


def calls(log: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.read_text().splitlines()]


def commands(log: Path) -> list[str]:
    """Each recorded call as a command line; the zip's content is recorded apart."""
    return ["az " + " ".join(c["argv"]) for c in calls(log) if "argv" in c]


if __name__ == "__main__":
    main(sys.argv[1:])
