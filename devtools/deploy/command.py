"""Deploy the proxy to Azure with the ``az`` CLI, publish its code, and verify it with the doctor.

Usage::

    python -m devtools.deploy --resource-group RG --location LOCATION [--prefix P] [--what-if]
    make deploy RG=... LOCATION=... [PREFIX=...] [WHAT_IF=1]

The steps, each one ``az`` call (a redeploy runs the same steps and changes only what changed):

1. Prerequisites: signed in (``az account show``), Bicep present (``az bicep version``),
   and the caller may create role assignments where the template creates them (Owner,
   User Access Administrator or Role Based Access Control Administrator on the resource
   group, or on the subscription when the group does not exist yet), because the
   template grants the app's identity its data roles.
2. The model versions: each region the template deploys to (the resource group's, and
   ``openAiExtraRegions``) is asked what it offers (``az cognitiveservices model list``), and
   each deployment of ``modelDeployments`` gets the newest generally available version of its
   model that still takes new deployments on the event's last day (``--until``, default 30
   days from today), passed to the template; when none does, the deploy stops before changing
   anything and names what the region offers instead (``devtools.deploy.models``).
3. Accounts in the way (``devtools.deploy.accounts``): Azure OpenAI accounts of this deployment
   left soft-deleted by a deleted resource group (``az cognitiveservices account
   list-deleted``) would fail the deployment for 48 hours (``FlagMustBeSetForRestore``), so
   they are purged or restored with the organizer's consent (``--soft-deleted purge|restore``
   or an answer at the prompt), else the deploy stops; then the resource group is created in
   LOCATION if missing. On a redeploy, an account Microsoft has upgraded to a Foundry resource
   (kind AIServices) stops the deploy unless ``--foundry-upgraded rollback`` says to put it back.
4. The organizer key: ``ORGANIZER_KEY`` from the environment; else, on a redeploy, the one
   the app already has; else a new random one, printed once at the end. The key of the stored
   hashes of codes, ``CODE_HASH_KEY``, the same way (never printed): a new key would make every
   event's code unknown, so a redeploy keeps the app's.
5. ``az deployment group what-if`` with ``--what-if`` (and stop), else
   ``az deployment group create -f infra/main.bicep -p infra/main.bicepparam``. Secrets
   and per-user values reach ``main.bicepparam`` through environment variables
   (``readEnvironmentVariable``), so they never appear in a process list.
6. The code: ``dist/app.zip`` built by ``devtools.deploy.package`` (honouring ``.funcignore``),
   published with ``az functionapp deployment source config-zip --build-remote true``,
   so the platform installs ``requirements.txt`` for its own Linux and Python. A first
   publish can be refused (403) while the app's new Storage Blob Data Owner role applies:
   it is tried again, 15 s then doubling, up to 6 times, saying so.
7. A wait for ``/api/health`` to report storage reachable: new role assignments take a
   few minutes to apply, and until then the app's identity is refused.
8. ``python -m proxy.manage doctor --url URL --models ...``: health, organizer key, and a
   one-token request to every deployed model through the proxy; run again twice, a minute
   apart, while it finds a problem (a role assignment may still be applying).

Failures end with one line saying what to do, and exit code 1.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any

import httpx

from devtools.deploy import models as azmodels
from devtools.deploy.accounts import (
    check_foundry_upgrade,
    choose_soft_deleted_action,
    settle_soft_deleted,
    soft_deleted_accounts,
)
from devtools.deploy.az import ROOT, Az, AzFailed, DeployError
from devtools.deploy.package import build

TEMPLATE = "infra/main.bicep"
PARAMETERS = "infra/main.bicepparam"
PACKAGE = "dist/app.zip"
DEPLOYMENT_NAME = "event-proxy"
PREFIX = re.compile(r"[a-z][a-z0-9]{1,8}")
DOCTOR_ATTEMPTS = 3
EVENT_DAYS = 30  # without --until, every model must take new deployments for this many days

# Built-in roles that may create role assignments (ids from the Azure built-in roles
# reference, also listed in tests/data/azure_sources.json).
ASSIGNING_ROLES = {
    "8e3af657-a8ff-443c-a75c-2fe8c4bcb635": "Owner",
    "18d7d88d-d35e-4fb5-a5c3-7773c20a72d9": "User Access Administrator",
    "f58310d9-a9f6-439a-9e8d-f62e7b41a168": "Role Based Access Control Administrator",
}


@dataclass(frozen=True, slots=True)
class Caller:
    subscription: str
    name: str
    principal_id: str
    is_user: bool


def check_prerequisites(az: Az) -> Caller:
    try:
        account = az.json("account", "show")
    except AzFailed as exc:
        raise DeployError("Not signed in to Azure: run 'az login' (then 'az account set -s SUBSCRIPTION').") from exc
    try:
        az.run("bicep", "version")
    except AzFailed as exc:
        raise DeployError("Bicep is not installed for the az CLI: run 'az bicep install'.") from exc
    user = account["user"]
    is_user = user["type"] == "user"
    if is_user:
        principal = az.text("ad", "signed-in-user", "show", "--query", "id")
    else:
        principal = az.text("ad", "sp", "show", "--id", user["name"], "--query", "id")
    return Caller(account["id"], user["name"], principal, is_user)


def check_may_assign_roles(az: Az, caller: Caller, scope: str) -> None:
    assignments = az.json(
        "role", "assignment", "list", "--assignee", caller.principal_id, "--scope", scope,
        "--include-inherited", "--include-groups",
    )  # fmt: skip
    held = {str(a.get("roleDefinitionId", "")).rsplit("/", 1)[-1].lower() for a in assignments}
    if held & set(ASSIGNING_ROLES):
        return
    roles = ", ".join(ASSIGNING_ROLES.values())
    raise DeployError(
        f"{caller.name} may not create role assignments on {scope}, and the template must grant the app's "
        f"identity its data roles there. One of these roles is needed: {roles}. Ask an owner of the "
        f"subscription to run: az role assignment create --assignee {caller.name} "
        f"--role 'Role Based Access Control Administrator' --scope {scope}"
    )


def previous_outputs(az: Az, resource_group: str) -> dict[str, Any] | None:
    """The outputs of the last deployment, or None on a fresh resource group."""
    try:
        outputs = az.json(
            "deployment", "group", "show", "--resource-group", resource_group, "--name", DEPLOYMENT_NAME,
            "--query", "properties.outputs",
        )  # fmt: skip
    except AzFailed:
        return None
    return values(outputs) if outputs else None


def values(outputs: Mapping[str, Any]) -> dict[str, Any]:
    return {name: output["value"] for name, output in outputs.items()}


def organizer_key(
    az: Az, resource_group: str, previous: Mapping[str, Any] | None, name: str = "ORGANIZER_KEY"
) -> tuple[str, bool]:
    """The secret setting ``name`` to deploy with, and whether it is new (to be shown once)."""
    given = os.environ.get(name, "").strip()
    if given:
        return given, False
    if previous is not None:
        kept = az.text(
            "functionapp", "config", "appsettings", "list", "--resource-group", resource_group,
            "--name", previous["AZURE_FUNCTION_APP_NAME"], "--query", f"[?name=='{name}'].value | [0]",
        )  # fmt: skip
        if kept:
            return kept, False
    return secrets.token_urlsafe(32), True


def resolve_models(az: Az, location: str, until: date) -> list[dict[str, Any]]:
    """``modelDeployments`` with the newest version each region deploys on ``until`` (``devtools.deploy.models``)."""
    text = (ROOT / PARAMETERS).read_text()
    requested = azmodels.parameter(text, "modelDeployments")
    regions = [location, *azmodels.parameter(text, "openAiExtraRegions")]
    print(f"Resolving model versions in {', '.join(regions)} (open to new deployments on {until})")
    offered = {
        region: azmodels.offers(az.json("cognitiveservices", "model", "list", "--location", region))
        for region in regions
    }
    try:
        choices = azmodels.choose(requested, offered, until)
    except azmodels.NoDeployableVersion as exc:
        raise DeployError(f"{exc}\nNothing was deployed.") from exc
    for choice in choices:
        print(choice.line())
    return azmodels.resolved(choices)


PUBLISH_ATTEMPTS = 6
# What Azure answers while the app's identity cannot yet write its deployment container.
NOT_YET_AUTHORIZED = re.compile(
    r"\b403\b|Forbidden|AuthorizationPermissionMismatch|AuthorizationFailure", re.IGNORECASE
)


def publish(az: Az, group: str, app: str, interval: float) -> None:
    """Publish the package; a 403 is retried with backoff, since a first deploy's role takes minutes to apply."""
    command = ["functionapp", "deployment", "source", "config-zip", "--resource-group", group, "--name", app]
    command += ["--src", PACKAGE, "--build-remote", "true", "--output", "none"]
    for attempt in range(1, PUBLISH_ATTEMPTS + 1):
        try:
            az.run(*command)
            return
        except AzFailed as exc:
            if attempt == PUBLISH_ATTEMPTS or not NOT_YET_AUTHORIZED.search(exc.output):
                raise
            delay = interval * 2 ** (attempt - 1)
            print(
                f"  refused (403): the app's identity cannot write its deployment container yet, as a new role "
                f"assignment takes a few minutes to apply; publishing again in {delay:.0f} s "
                f"(attempt {attempt + 1} of {PUBLISH_ATTEMPTS})"
            )
            time.sleep(delay)


def wait_until_healthy(url: str, timeout: float, interval: float) -> None:
    """Poll /api/health until storage is reachable with the app's identity."""
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    with httpx.Client(timeout=30) as client:
        while True:
            try:
                answer = client.get(f"{url}/api/health")
                if answer.status_code == 200 and answer.json().get("storage") == "ok":
                    print(f"  {url}/api/health: ok")
                    return
                last = f"{answer.status_code} {answer.text[:120]}"
            except httpx.HTTPError as exc:
                last = type(exc).__name__
            if time.monotonic() > deadline:
                raise DeployError(
                    f"{url}/api/health did not report storage reachable within {timeout:.0f} s (last: {last}). "
                    "Role assignments can take up to 10 minutes: run the doctor later with "
                    f"'python -m proxy.manage doctor --url {url}'."
                )
            print(f"  waiting for the app and its role assignments ({last})")
            time.sleep(interval)


def deploy(args: argparse.Namespace, az: Az) -> int:
    if args.prefix is not None and not PREFIX.fullmatch(args.prefix):
        raise DeployError(
            f"--prefix {args.prefix!r}: use 2 to 9 lowercase letters and digits, starting with a letter "
            "(it starts every resource name, and storage account names allow nothing else)."
        )
    print("Checking prerequisites")
    caller = check_prerequisites(az)
    group = args.resource_group
    exists = bool(az.json("group", "exists", "--name", group))
    subscription_scope = f"/subscriptions/{caller.subscription}"
    check_may_assign_roles(az, caller, f"{subscription_scope}/resourceGroups/{group}" if exists else subscription_scope)
    # The template deploys to the group's region, which on a redeploy may not be --location.
    location = az.text("group", "show", "--name", group, "--query", "location") if exists else args.location
    today = args.today or date.today()
    deployments = resolve_models(az, location, args.until or today + timedelta(days=EVENT_DAYS))
    prefix = (args.prefix or azmodels.parameter((ROOT / PARAMETERS).read_text(), "namePrefix")).lower()
    deleted = soft_deleted_accounts(az, group, prefix)
    action = choose_soft_deleted_action(deleted, args.soft_deleted, group) if deleted else None
    if not exists:
        print(f"Creating resource group {group} in {args.location}")
        az.run("group", "create", "--name", group, "--location", args.location, "--output", "none")
    if action is not None and not args.what_if:
        settle_soft_deleted(az, group, deleted, action)
    previous = previous_outputs(az, group) if exists else None
    if previous is not None:
        check_foundry_upgrade(az, group, previous, args.foundry_upgraded)
    key, new_key = organizer_key(az, group, previous)
    code_hash_key, _ = organizer_key(az, group, previous, "CODE_HASH_KEY")

    template = ["--resource-group", group, "--name", DEPLOYMENT_NAME, "--template-file", TEMPLATE]
    template += ["--parameters", PARAMETERS]
    template += ["--parameters", "modelDeployments=" + json.dumps(deployments, separators=(",", ":"))]
    if args.prefix is not None:
        template += ["--parameters", f"namePrefix={args.prefix}"]
    env = {
        "ORGANIZER_KEY": key,
        "CODE_HASH_KEY": code_hash_key,
        "DEPLOYER_PRINCIPAL_ID": caller.principal_id if caller.is_user else "",
        "DEPLOYER_CAN_CALL_MODELS": "true" if args.deployer_can_call_models else "false",
    }
    if args.what_if:
        print("What would change (nothing is deployed):")
        print(az.run("deployment", "group", "what-if", *template, env=env))
        print("Run again without --what-if to deploy.")
        return 0

    print(f"Deploying {TEMPLATE} to {group} (a first deployment takes several minutes)")
    outputs = values(az.json("deployment", "group", "create", *template, env=env)["properties"]["outputs"])
    app, url = outputs["AZURE_FUNCTION_APP_NAME"], outputs["AZURE_FUNCTION_APP_URL"]

    count, size = build(ROOT, ROOT / PACKAGE)
    print(f"Publishing {PACKAGE} ({count} files, {size / 1024:.0f} KiB) to {app} with a remote build")
    publish(az, group, app, args.interval)

    print(f"Waiting for {url}")
    wait_until_healthy(url, args.wait, args.interval)

    models = ",".join(d["name"] for d in outputs["AZURE_OPENAI_DEPLOYMENTS"])
    doctor_env = {**os.environ, "ORGANIZER_KEY": key, "STORAGE_TABLE_ENDPOINT": outputs["STORAGE_TABLE_ENDPOINT"]}
    command = [sys.executable, "-m", "proxy.manage", "doctor", "--url", url, "--models", models]
    for attempt in range(1, DOCTOR_ATTEMPTS + 1):
        print("Running the doctor")
        doctor = subprocess.run(command, cwd=ROOT, env=doctor_env, check=False)
        if doctor.returncode == 0 or attempt == DOCTOR_ATTEMPTS:
            break
        # The identity's Azure OpenAI role can apply minutes after its storage roles.
        print(f"  again in {4 * args.interval:.0f} s, in case a role assignment is still being applied")
        time.sleep(4 * args.interval)
    print()
    print(f"Proxy:           {url}/api/v1  (attendees: OpenAI(base_url=..., api_key='CODE/name'))")
    print(f"Organizer API:   {url}/api/manage/events  (Authorization: Bearer ORGANIZER_KEY)")
    print(f"Pages:           {url}/api/portal (attendees), {url}/api/manage/portal (organizers)")
    print(f"Azure OpenAI:    {outputs['AZURE_OPENAI_ENDPOINT']}  (deployments: {models})")
    print(f"Organizer CLI:   STORAGE_TABLE_ENDPOINT={outputs['STORAGE_TABLE_ENDPOINT']} python -m proxy.manage ...")
    if new_key:
        print(f"Organizer key (shown once; it is also the app's ORGANIZER_KEY setting): {key}")
    return doctor.returncode


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m devtools.deploy", description=__doc__.splitlines()[0])
    parser.add_argument("--resource-group", "-g", required=True, metavar="RG")
    parser.add_argument("--location", "-l", required=True, metavar="LOCATION", help="for a new resource group")
    parser.add_argument("--prefix", help="resource name prefix, 2-9 lowercase letters and digits (default: evtproxy)")
    parser.add_argument("--what-if", action="store_true", help="show what would change, deploy nothing")
    parser.add_argument(
        "--until",
        type=date.fromisoformat,
        metavar="YYYY-MM-DD",
        help=f"the event's last day: every model version must still take new deployments then "
        f"(default: {EVENT_DAYS} days from today)",
    )
    parser.add_argument(
        "--deployer-can-call-models",
        action="store_true",
        help="also grant yourself Cognitive Services OpenAI User (to call the models directly)",
    )
    parser.add_argument(
        "--soft-deleted",
        choices=("purge", "restore"),
        help="what to do with this deployment's Azure OpenAI accounts left soft-deleted by a deleted resource group",
    )
    parser.add_argument(
        "--foundry-upgraded",
        choices=("rollback",),
        help="redeploy even though Microsoft upgraded the Azure OpenAI account to a Foundry resource (rolls it back)",
    )
    parser.add_argument("--wait", type=float, default=900.0, help="seconds to wait for the app (default: 900)")
    parser.add_argument("--interval", type=float, default=15.0, help=argparse.SUPPRESS)
    parser.add_argument("--today", type=date.fromisoformat, help=argparse.SUPPRESS)  # tests: a captured region's day
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    executable = shutil.which("az")
    if executable is None:
        print("deploy: the az CLI is not installed: https://learn.microsoft.com/cli/azure/install-azure-cli")
        return 1
    try:
        return deploy(args, Az(executable))
    except DeployError as exc:
        print(f"deploy: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
