"""The Azure OpenAI accounts a redeploy finds in a state the template would trip over.

- Soft-deleted: deleting a resource group only soft-deletes its Azure OpenAI accounts, for 48
  hours, and the template derives their names from the group, so a deployment into a group of
  the same name fails with ``FlagMustBeSetForRestore`` until they are purged or restored. Which
  of the two is the organizer's call.
- Upgraded to a Foundry resource (kind ``AIServices``) by Microsoft: the template declares an
  Azure OpenAI account, so a redeploy would roll the upgrade back; again the organizer's call.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from devtools.deploy.az import Az, AzFailed, DeployError


@dataclass(frozen=True, slots=True)
class DeletedAccount:
    name: str
    location: str
    purge_date: str


def soft_deleted_accounts(az: Az, group: str, prefix: str) -> list[DeletedAccount]:
    """This deployment's Azure OpenAI accounts that a deleted resource group left soft-deleted.

    Deleting a resource group only soft-deletes its Azure OpenAI accounts, for 48 hours, and the
    template derives their names from the group: a deployment into a group of the same name then
    fails with FlagMustBeSetForRestore until the account is purged or restored.
    """
    deleted = az.json("cognitiveservices", "account", "list-deleted")
    found = []
    for account in deleted or []:
        match = re.search(r"/resourceGroups/([^/]+)/", str(account.get("id", "")), re.IGNORECASE)
        if (
            match
            and match.group(1).lower() == group.lower()
            and str(account.get("name", "")).startswith(f"{prefix}-oai-")
        ):
            purge = str((account.get("properties") or {}).get("scheduledPurgeDate", "?"))
            found.append(DeletedAccount(account["name"], account["location"], purge))
    return found


def choose_soft_deleted_action(accounts: Sequence[DeletedAccount], given: str | None, group: str) -> str:
    """``purge`` or ``restore``, as the organizer said (--soft-deleted) or answers; else stop."""
    names = ", ".join(f"{a.name} ({a.location}, purged by Azure on {a.purge_date})" for a in accounts)
    print(f"Soft-deleted Azure OpenAI account(s) of {group} block this deployment: {names}")
    if given:
        return given
    if sys.stdin.isatty():
        answer = input("Purge them (their model deployments are gone for good) or restore them? [purge/restore/stop] ")
        if answer.strip().lower() in ("purge", "restore"):
            return answer.strip().lower()
    raise DeployError(
        f"The resource group {group} was deleted less than 48 hours ago and its Azure OpenAI account(s) are "
        f"soft-deleted under the same name(s): {names}. Run again with --soft-deleted purge (delete them for good) "
        "or --soft-deleted restore (bring them back with their deployments). Nothing was deployed."
    )


def settle_soft_deleted(az: Az, group: str, accounts: Sequence[DeletedAccount], action: str) -> None:
    for account in accounts:
        where = ["--resource-group", group, "--location", account.location, "--name", account.name]
        if action == "purge":
            print(f"Purging the soft-deleted account {account.name} ({account.location})")
            az.run("cognitiveservices", "account", "purge", *where, "--output", "none")
        else:
            print(f"Restoring the soft-deleted account {account.name} ({account.location})")
            az.run("cognitiveservices", "account", "recover", *where, "--output", "none")


def check_foundry_upgrade(az: Az, group: str, previous: Mapping[str, Any], consent: str | None) -> None:
    """Stop before a redeploy would roll back Microsoft's upgrade of the account to a Foundry resource.

    Microsoft upgrades eligible Azure OpenAI accounts to Foundry resources (kind AIServices),
    keeping name, endpoint, identity, roles and deployments. The template declares kind OpenAI
    with an API version that predates Foundry's properties, so deploying it again would put the
    account back: the proxy works either way, but Foundry projects made on the account since would
    be lost. The organizer decides (``--foundry-upgraded rollback``).
    """
    host = str(previous.get("AZURE_OPENAI_ENDPOINT", "")).removeprefix("https://").split(".", 1)[0]
    if not host:
        return
    try:
        kind = az.text(
            "cognitiveservices", "account", "show", "--resource-group", group, "--name", host, "--query", "kind"
        )
    except AzFailed:
        return  # gone or renamed: the deployment recreates it
    if kind != "AIServices" or consent == "rollback":
        if kind == "AIServices":
            print(f"Rolling {host} back from a Foundry resource to an Azure OpenAI account, as asked")
        return
    raise DeployError(
        f"Microsoft has upgraded {host} to a Foundry resource (kind AIServices). This template declares an Azure "
        "OpenAI account (kind OpenAI), so redeploying would roll the upgrade back: the proxy keeps working (same "
        "endpoint, identity, roles and model deployments), but Foundry projects made on the account since would be "
        "lost. Run again with --foundry-upgraded rollback to go ahead, or keep the upgrade by deploying the code "
        "alone (docs/deploy.md: Step by step, the config-zip line). Nothing was deployed."
    )
