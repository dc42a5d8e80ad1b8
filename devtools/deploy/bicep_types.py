"""Azure's resource types, as the Bicep checks read them (``devtools.deploy.bicep_check``).

They come from Azure's own published definitions, the ``types.json`` files that
``Azure/bicep-types-az`` generates from the REST API specifications: the subset for the types
``infra/`` uses is kept in ``tests/data/bicep_types.json``, with the repository's commit.
``python -m devtools.deploy.bicep_check --extract GIT_DIR`` rebuilds it from a clone of that
repository (``extract``; add a type to ``TYPES`` first).
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
TYPES_FILE = ROOT / "tests" / "data" / "bicep_types.json"
TYPES_REPOSITORY = "https://github.com/Azure/bicep-types-az"

# The types infra/ uses, and the types.json each comes from in Azure/bicep-types-az.
TYPES = {
    "Microsoft.ManagedIdentity/userAssignedIdentities@2023-01-31": "msi/microsoft.managedidentity/2023-01-31",
    "Microsoft.Storage/storageAccounts@2024-01-01": "storage/microsoft.storage/2024-01-01",
    "Microsoft.Storage/storageAccounts/blobServices@2024-01-01": "storage/microsoft.storage/2024-01-01",
    "Microsoft.Storage/storageAccounts/blobServices/containers@2024-01-01": "storage/microsoft.storage/2024-01-01",
    "Microsoft.Storage/storageAccounts/tableServices@2024-01-01": "storage/microsoft.storage/2024-01-01",
    "Microsoft.Storage/storageAccounts/tableServices/tables@2024-01-01": "storage/microsoft.storage/2024-01-01",
    "Microsoft.CognitiveServices/accounts@2024-10-01": "cognitiveservices/microsoft.cognitiveservices/2024-10-01",
    "Microsoft.CognitiveServices/accounts/deployments@2024-10-01": (
        "cognitiveservices/microsoft.cognitiveservices/2024-10-01"
    ),
    "Microsoft.OperationalInsights/workspaces@2025-02-01": (
        "operationalinsights/microsoft.operationalinsights/2025-02-01"
    ),
    "Microsoft.Insights/components@2020-02-02": "applicationinsights/microsoft.insights/2020-02-02",
    "Microsoft.Insights/workbooks@2023-06-01": "applicationinsights/microsoft.insights/2023-06-01",
    "Microsoft.Web/serverfarms@2024-04-01": "web/microsoft.web/2024-04-01",
    "Microsoft.Web/sites@2024-04-01": "web/microsoft.web/2024-04-01",
    "Microsoft.Web/sites/config@2022-09-01": "web/microsoft.web/2022-09-01",
    "Microsoft.Authorization/roleAssignments@2022-04-01": "authorization/microsoft.authorization/2022-04-01",
}

# Property flags in bicep-types: https://github.com/Azure/bicep-types/blob/main/src/bicep-types/src/types.ts
REQUIRED, READ_ONLY = 1, 2


class Types:
    """Azure's resource types (the subset in tests/data/bicep_types.json), by ``Type@version``."""

    def __init__(self, data: Mapping[str, Any]) -> None:
        self.types: list[dict[str, Any]] = data["types"]
        self.resources: dict[str, int] = {k.lower(): v for k, v in data["resources"].items()}
        self.source = f"{data['repository']} at {data['commit']}"
        self.published: dict[str, list[str]] = data["published_versions"]

    @classmethod
    def load(cls, path: Path = TYPES_FILE) -> Types:
        return cls(json.loads(path.read_text()))

    def body(self, resource_type: str) -> dict[str, Any] | None:
        index = self.resources.get(resource_type.lower())
        return None if index is None else self.types[self.types[index]["body"]]

    def unknown(self, resource_type: str) -> str:
        """Why ``Type@version`` has no definition here: Azure publishes no such version, or the subset lacks it."""
        name, _, version = resource_type.partition("@")
        versions = self.published.get(name.split("/")[0].lower())
        if versions is not None and version not in versions:
            return (
                f"Azure publishes no API version {version} for {name.split('/')[0]} (its latest: "
                f"{', '.join(versions[-4:])}; {self.source})"
            )
        return (
            f"{resource_type} is not in {TYPES_FILE.name}: add it to TYPES in devtools/deploy/bicep_types.py and "
            f"rebuild "
            f"the file with --extract ({self.source})"
        )

    def at(self, index: int) -> dict[str, Any]:
        return self.types[index]


def extract(git_dir: Path) -> dict[str, Any]:
    """The subset of Azure/bicep-types-az's ``types.json`` files for ``TYPES``, references renumbered."""
    commit = _git(git_dir, "rev-parse", "HEAD").strip()
    loaded: dict[str, list[dict[str, Any]]] = {}
    out: list[dict[str, Any]] = []
    seen: dict[tuple[str, int], int] = {}

    def copy(source: str, index: int) -> int:
        if (source, index) in seen:
            return seen[(source, index)]
        seen[(source, index)] = len(out)
        out.append({})
        original = loaded[source][index]
        kept = {k: v for k, v in original.items() if k not in ("description", "functions")}
        seen_index = seen[(source, index)]
        out[seen_index] = _renumber(kept, lambda ref: copy(source, ref))
        return seen_index

    resources = {}
    for name, folder in TYPES.items():
        if folder not in loaded:
            loaded[folder] = json.loads(_git(git_dir, "show", f"HEAD:generated/{folder}/types.json"))
        index = next(i for i, t in enumerate(loaded[folder]) if t.get("$type") == "ResourceType" and t["name"] == name)
        resources[name] = copy(folder, index)
    namespaces = {name.split("/")[0].lower() for name in TYPES}
    published: dict[str, set[str]] = {namespace: set() for namespace in namespaces}
    for path in _git(git_dir, "ls-tree", "-r", "--name-only", "HEAD", "generated").splitlines():
        parts = path.split("/")
        if len(parts) == 5 and parts[4] == "types.json" and parts[2] in published:
            published[parts[2]].add(parts[3])
    return {
        "about": "Azure's resource types for the types infra/ uses, copied from the types.json files that "
        "Azure/bicep-types-az generates from the Azure REST API specifications (descriptions and resource "
        "functions left out, references renumbered). Rebuild: python -m devtools.deploy.bicep_check --extract GIT_DIR.",
        "repository": TYPES_REPOSITORY,
        "commit": commit,
        "files": {name: f"generated/{folder}/types.json" for name, folder in TYPES.items()},
        "resources": resources,
        "published_versions": {namespace: sorted(versions) for namespace, versions in sorted(published.items())},
        "types": out,
    }


def _renumber(node: Any, ref: Any) -> Any:
    if isinstance(node, dict):
        if set(node) == {"$ref"}:
            return ref(int(node["$ref"].removeprefix("#/")))
        return {k: _renumber(v, ref) for k, v in node.items() if k != "description"}
    if isinstance(node, list):
        return [_renumber(v, ref) for v in node]
    return node


def _git(git_dir: Path, *args: str) -> str:
    return subprocess.run(["git", "--git-dir", str(git_dir), *args], capture_output=True, text=True, check=True).stdout
